"""dyprag.engine.prefix: a forward started at a LoRA layer from stored states equals a full one."""

from __future__ import annotations

import pytest
import torch
from conftest import PEFT_ARCHITECTURES, random_lora, tiny_model, tokens
from torch.testing import assert_close

from dyprag.engine.inject import inject_lora
from dyprag.engine.prefix import final_hidden, logits_at, states_below, supports_prefix


def _batch(n: int = 3, t: int = 7):
    ids = tokens(n, t)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding on one row
    return ids, mask


@pytest.mark.parametrize("arch", PEFT_ARCHITECTURES)
def test_states_from_the_cache_equal_a_full_forward(arch):
    model = tiny_model(arch, num_hidden_layers=4)
    ids, mask = _batch()
    injection = inject_lora(model, [2, 3])
    lora = random_lora(model, batch_size=3)
    states = states_below(model, ids, mask, 2)
    with injection.use(lora):
        full = model(input_ids=ids, attention_mask=mask).logits
        hidden = final_hidden(model, ids, mask, states, 2)
        positions = mask.bool()
        assert_close(logits_at(model, hidden, positions), full[positions])
    # Without the cache the same function runs the whole model.
    with injection.use(lora):
        assert_close(logits_at(model, final_hidden(model, ids, mask), positions), full[positions])


def test_states_below_are_the_input_of_that_layer():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert_close(states_below(model, ids, mask, 1), out.hidden_states[1])
    assert_close(states_below(model, ids, mask, 2), out.hidden_states[2])


def test_gradients_through_the_cache_equal_the_full_forwards():
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = _batch()
    inject_lora(model, [1, 2, 3])
    grads = []
    for cached in (False, True):
        lora = random_lora(model, batch_size=3).map(lambda t: t.requires_grad_(True))
        states = states_below(model, ids, mask, 1) if cached else None
        with inject_lora(model).use(lora):
            logits = logits_at(model, final_hidden(model, ids, mask, states, 1), mask.bool())
        logits.logsumexp(-1).sum().backward()
        grads.append([t.grad for _, a, b in lora.items() for t in (a, b)])
    for uncached, cached in zip(*grads):
        assert uncached.abs().sum() > 0
        assert_close(cached, uncached)


@pytest.mark.parametrize("arch", [*PEFT_ARCHITECTURES, "gemma"])
def test_the_check_accepts_plain_decoders(arch):
    assert supports_prefix(tiny_model(arch), 1)


def test_the_check_refuses_softcapped_logits():
    assert not supports_prefix(tiny_model("gemma2", head_scale=50.0), 1)


def test_lora_layers_are_checked():
    model = tiny_model("llama", num_hidden_layers=4)
    injection = inject_lora(model, [2, 3])
    assert injection.layers == [2, 3]
    with pytest.raises(ValueError, match="layers \\[2, 3\\]"):
        injection.check(random_lora(tiny_model("llama", num_hidden_layers=4)))
    with pytest.raises(ValueError, match="not \\[1, 2\\]"):
        inject_lora(model, [1, 2])
    with pytest.raises(ValueError, match="subset"):
        inject_lora(tiny_model("llama"), [5])


def test_lora_layers_specs_name_ranges_of_the_model():
    from dyprag.config import ConfigError, load_config
    from dyprag.engine.models import lora_layers

    model = tiny_model("llama", num_hidden_layers=6)
    assert lora_layers("all", model) is None
    assert lora_layers("2-4", model) == [2, 3, 4]
    assert lora_layers("4-", model) == [4, 5]
    for bad in ("3-9", "5-2"):
        with pytest.raises(ValueError, match="not a range of this model's 6 layers"):
            lora_layers(bad, model)
    with pytest.raises(ConfigError, match="model.lora_layers: must be 'all', 'A-B' or 'A-'"):
        load_config(None, ["model.lora_layers=top"])
