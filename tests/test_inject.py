"""dyprag.engine.inject: hooks, broadcast / per-sample / merged modes, gradients, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PEFT_ARCHITECTURES, random_lora, tiny_model, tokens
from peft_oracle import peft_twin
from torch.testing import assert_close

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, combine


@pytest.mark.parametrize("arch", PEFT_ARCHITECTURES)
def test_logits_match_peft(arch):
    model = tiny_model(arch)
    lora = random_lora(model)
    ids = tokens(2, 9)
    with inject_lora(model).use(lora):
        ours = model(ids).logits
    theirs = peft_twin(model, lora)(ids).logits
    assert_close(ours, theirs)
    assert not torch.allclose(ours, model(ids).logits), "the LoRA must change the logits"


def test_zero_b_gives_base_logits_exactly(arch):
    model = tiny_model(arch)
    ids = tokens(2, 9)
    base = model(ids).logits
    lora = random_lora(model)
    lora = LoRA(lora.A, {k: torch.zeros_like(b) for k, b in lora.B.items()}, lora.alpha)
    with inject_lora(model).use(lora):
        assert torch.equal(model(ids).logits, base)


def test_no_active_lora_leaves_model_unchanged(arch):
    model = tiny_model(arch)
    ids = tokens(2, 9)
    base = model(ids).logits
    injection = inject_lora(model)
    with injection.use(random_lora(model)):
        pass
    assert torch.equal(model(ids).logits, base)
    assert inject_lora(model) is injection, "injecting twice returns the same injection"


def test_per_sample_rows_equal_each_sample_alone(arch):
    model = tiny_model(arch)
    injection = inject_lora(model)
    batch = random_lora(model, batch_size=3)
    ids = tokens(3, 8)
    with injection.use(batch):
        together = model(ids).logits
    for b in range(3):
        with injection.use(batch[b]):
            assert_close(together[b], model(ids[b:b + 1]).logits[0])


def test_broadcast_equals_per_sample_with_copies():
    model = tiny_model()
    injection = inject_lora(model)
    lora = random_lora(model)
    ids = tokens(3, 8)
    with injection.use(lora):
        broadcast = model(ids).logits
    with injection.use(LoRA.stack([lora] * 3)):
        assert_close(model(ids).logits, broadcast)


def test_nested_use_restores_outer_lora():
    model = tiny_model()
    injection = inject_lora(model)
    outer, inner = random_lora(model, seed=1), random_lora(model, seed=2)
    ids = tokens(1, 6)
    with injection.use(outer):
        expected = model(ids).logits
        with injection.use(inner):
            assert not torch.allclose(model(ids).logits, expected)
        assert torch.equal(model(ids).logits, expected)


def test_partial_modules_on_fused_model():
    """A LoRA on `up` alone changes only the up half of Phi-3's fused gate_up_proj."""
    model = tiny_model("phi3")
    injection = inject_lora(model)
    full = random_lora(model)
    up_only = LoRA({k: a for k, a in full.A.items() if k[1] == "up"},
                   {k: b for k, b in full.B.items() if k[1] == "up"}, full.alpha)
    zero_rest = LoRA(full.A, {k: b if k[1] == "up" else torch.zeros_like(b)
                              for k, b in full.B.items()}, full.alpha)
    ids = tokens(2, 7)
    with injection.use(up_only):
        partial = model(ids).logits
    with injection.use(zero_rest):
        assert_close(partial, model(ids).logits)


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                          do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_batch_with_per_sample_loras_equals_each_alone(num_beams):
    model = tiny_model("qwen2", head_scale=8.0)
    injection = inject_lora(model)
    loras = random_lora(model, batch_size=4, std=0.5)
    ids = tokens(4, 10)
    with injection.use(loras):
        together = _generate(model, ids, num_beams=num_beams)
    alone = []
    for b in range(4):
        with injection.use(loras[b]):
            alone.append(_generate(model, ids[b:b + 1], num_beams=num_beams)[0])
    assert torch.equal(together, torch.stack(alone))
    assert len({tuple(row.tolist()) for row in together[:, 10:]}) > 1, "LoRAs must matter"


@pytest.mark.parametrize("batch_size", [None, 3])
def test_last_only_leaves_every_earlier_position_to_the_base_model(batch_size):
    model = tiny_model()
    injection = inject_lora(model)
    lora = random_lora(model, batch_size=batch_size)
    ids = tokens(3, 8)
    base = model(ids, output_hidden_states=True).hidden_states[-1]
    with injection.use(lora):
        full = model(ids).logits
    with injection.use(lora, last_only=True):
        out = model(ids, output_hidden_states=True)
    assert_close(out.hidden_states[-1][:, :-1], base[:, :-1])
    assert not torch.allclose(out.hidden_states[-1][:, -1], base[:, -1])
    # The last position sees the base model's keys and values of the prompt, not the LoRA's.
    assert not torch.allclose(out.logits[:, -1], full[:, -1])


def test_last_only_generate_reads_the_prompt_with_the_base_model():
    """With a KV cache the prompt is read once by the base model and the LoRA acts where the
    answer is produced: the prompt's last position and every new token."""
    model = tiny_model("qwen2", head_scale=8.0)
    injection = inject_lora(model)
    loras = random_lora(model, batch_size=2, std=0.5)
    ids = tokens(2, 10)

    def generate():
        out = _generate(model, ids, return_dict_in_generate=True, output_logits=True)
        return out.sequences, out.logits

    with injection.use(loras, last_only=True):
        generated, logits = generate()
    with injection.use(loras):
        assert not torch.allclose(generate()[1][1], logits[1]), "the positions must matter"
    # The second new token by hand: positions 0..8 cached by the base model, 9 and 10 with
    # the LoRA.
    with torch.no_grad():
        cache = model(generated[:, :9], use_cache=True).past_key_values
        with injection.use(loras):
            step = model(generated[:, 9:11], cache=cache, use_cache=True).logits
    assert_close(step[:, -1], logits[1])


def test_merge_matches_unmerged_and_unmerge_is_bit_exact(arch):
    model = tiny_model(arch)
    injection = inject_lora(model)
    lora = random_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = tokens(2, 8)
    with injection.use(lora):
        hooked = model(ids).logits
    with injection.merged(lora):
        assert injection.is_merged
        assert_close(model(ids).logits, hooked)
        with pytest.raises(RuntimeError, match="already merged"):
            injection.merge(lora)
    assert not injection.is_merged
    injection.unmerge()  # idempotent
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_combined_lora_equals_deltas_added_one_by_one():
    """Injecting combine([x, y, z], w) == merging w_i-weighted deltas into the weights."""
    model = tiny_model()
    injection = inject_lora(model)
    loras = [random_lora(model, seed=s) for s in (1, 2, 3)]
    weights = [0.5, 1.0, 2.0]
    ids = tokens(2, 8)
    with injection.use(combine(loras, weights)):
        combined = model(ids).logits
    reference = copy.deepcopy(model)
    inject_lora(reference).remove()
    targets = {(t.layer, t.module): t for t in inject_lora(reference).targets.values()}
    with torch.no_grad():
        for lora, w in zip(loras, weights):
            for key in lora.keys:
                targets[key].linear.weight[targets[key].rows] += w * lora.delta(key)
    assert_close(combined, reference(ids).logits)


def test_gradient_reaches_a_and_b_only():
    model = tiny_model()
    injection = inject_lora(model)
    lora = random_lora(model, batch_size=2).map(lambda t: t.clone().requires_grad_(True))
    with injection.use(lora):
        model(tokens(2, 6)).logits.pow(2).mean().backward()
    for _, a, b in lora.items():
        assert a.grad is not None and a.grad.abs().sum() > 0
        assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def _bad(lora: LoRA, key, which: str, tensor) -> LoRA:
    A, B = dict(lora.A), dict(lora.B)
    (A if which == "A" else B)[key] = tensor
    return LoRA(A, B, lora.alpha)


def test_bad_input_names_layer_module_and_shapes():
    model = tiny_model()
    injection = inject_lora(model)
    lora = random_lora(model)
    key = (1, "up")  # in 32, out 48
    with pytest.raises(ValueError, match=r"layer 1 module up: A has shape \(3, 32\), expected \(2, 32\)"):
        _bad(lora, key, "A", torch.zeros(3, 32))  # wrong rank
    with pytest.raises(ValueError, match=r"layer 1 module up: expected A \(2, 32\) and B \(48, 2\), "
                                         r"got A \(2, 31\) and B \(48, 2\)"):
        injection.check(_bad(lora, key, "A", torch.zeros(2, 31)))  # wrong in_features
    with pytest.raises(ValueError, match=r"layers \[0\] but this model takes LoRAs on layers \[0, 1\]"):
        injection.check(LoRA({k: a for k, a in lora.A.items() if k[0] == 0},
                             {k: b for k, b in lora.B.items() if k[0] == 0}, lora.alpha))
    with pytest.raises(ValueError, match=r"layer 0 module gate: LoRA is torch.float64, expected torch.float32"):
        with injection.use(lora.to(dtype=torch.float64)):
            pass
    with pytest.raises(ValueError, match=r"layer 0 module gate: LoRA is on meta, expected cpu"):
        injection.check(lora.to(device="meta"))
    with pytest.raises(ValueError, match=r"per-sample LoRA has 3 samples"):
        with injection.use(random_lora(model, batch_size=3)):
            model(tokens(2, 5))
    with pytest.raises(ValueError, match=r"merge takes one LoRA, got a batch of 3"):
        injection.merge(random_lora(model, batch_size=3))


def test_deepcopy_of_injected_model_is_independent():
    model = tiny_model()
    injection = inject_lora(model)
    twin = copy.deepcopy(model)
    ids = tokens(1, 6)
    base = twin(ids).logits
    with injection.use(random_lora(model)):
        assert torch.equal(twin(ids).logits, base), "the copy must not see the original's LoRA"
        with inject_lora(twin).use(random_lora(twin)):
            changed = twin(ids).logits
    assert not torch.allclose(changed, base)
    inject_lora(twin).remove()
    with injection.use(random_lora(model)):
        assert not torch.allclose(model(ids).logits, base), "removing the copy's hooks kept ours"


def test_gradients_equal_those_of_formed_delta_weights(arch):
    """d loss / d(A, B) through the hooks == through W + s·BA put into the weights."""
    model = tiny_model(arch)
    injection = inject_lora(model)
    lora = random_lora(model).map(lambda t: t.clone().requires_grad_(True))
    ids = tokens(2, 7)
    with injection.use(lora):
        model(ids).logits.pow(2).mean().backward()
    hooked = [t.grad.clone() for _, a, b in lora.items() for t in (a, b)]

    ref = lora.map(lambda t: t.detach().clone().requires_grad_(True))
    weights = {}
    for key, target in injection.targets.items():
        name = f"{target.name}.weight"
        base = weights.get(name, target.linear.weight)
        pad = torch.zeros_like(base)
        pad[target.rows] = ref.delta(key)
        weights[name] = base + pad
    torch.func.functional_call(model, weights, (ids,)).logits.pow(2).mean().backward()
    formed = [t.grad for _, a, b in ref.items() for t in (a, b)]
    for got, want in zip(hooked, formed):
        assert_close(got, want)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_bf16_autocast_with_fp32_lora(batch_size):
    """Mixed precision: fp32 model and LoRA under bf16 autocast; grads arrive in fp32."""
    model = tiny_model()
    injection = inject_lora(model)
    lora = random_lora(model, batch_size=batch_size).map(lambda t: t.clone().requires_grad_(True))
    ids = tokens(2, 6)
    with injection.use(lora):
        reference = model(ids).logits.detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    assert_close(logits.float(), reference, atol=0.1, rtol=0.05)
    logits.float().pow(2).mean().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32
               for _, a, b in lora.items() for t in (a, b))
