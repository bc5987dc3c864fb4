"""dyprag.training.bank: batched bank training equals solo training, resume, refusals, PRAG combine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import tiny_model
from torch.testing import assert_close

import dyprag.training.bank as bank_mod
from dyprag.config import load_config
from dyprag.data.augment import AugmentedDoc
from dyprag.engine.generate import generate_answers
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import combine
from dyprag.engine.prompts import qa_prompt
from dyprag.training.bank import BankConfig, LoRABank, bank_recipe, build_bank
from dyprag.training.examples import document_examples
from dyprag.training.world_base import build_tokenizer

DOCS = [
    AugmentedDoc("d0", "Idris Kael was born in Velmora.", ["Velmora is where Idris Kael was born."],
                 [{"question": "Where was Idris Kael born?", "answer": "Velmora"},
                  {"question": "Idris Kael was born where?", "answer": "Velmora"},
                  {"question": "Birthplace of Idris Kael?", "answer": "Velmora"}]),
    AugmentedDoc("d1", "Tamsin Reole works for Halvex.", ["Halvex employs Tamsin Reole."],
                 [{"question": "Who employs Tamsin Reole?", "answer": "Halvex"},
                  {"question": "Tamsin Reole works for whom?", "answer": "Halvex"},
                  {"question": "Employer of Tamsin Reole?", "answer": "Halvex"}]),
    AugmentedDoc("d2", "Soren Vance studied geology at Larkspur university.", [],
                 [{"question": "What did Soren Vance study?", "answer": "geology"},
                  {"question": "Where did Soren Vance study?", "answer": "Larkspur university"}]),
    AugmentedDoc("d3", "Nerys Crane was born in 1931.", ["In 1931 Nerys Crane was born."],
                 [{"question": "When was Nerys Crane born?", "answer": "1931"},
                  {"question": "Nerys Crane was born when?", "answer": "1931"},
                  {"question": "Birth year of Nerys Crane?", "answer": "1931"}]),
    AugmentedDoc("d4", "Orrin Lisle is an expert in botany.", ["Botany is Orrin Lisle's field."],
                 [{"question": "What is Orrin Lisle's field?", "answer": "botany"},
                  {"question": "Orrin Lisle is an expert in what?", "answer": "botany"},
                  {"question": "Field of Orrin Lisle?", "answer": "botany"}]),
]
# PRAG's examples per document (2 QA × {passage, rewrite} + 1 closed-book), a fast recipe.
CONFIG = BankConfig(rank=2, alpha=8.0, lr=5e-2, epochs=2, docs_per_step=8, shard_size=2,
                    qa_with_passage=2, qa_closed_book=1, text=False)


def setup(seed: int = 0, dtype: torch.dtype = torch.float32):
    tokenizer = build_tokenizer([d.text for d in DOCS] + [r for d in DOCS for r in d.rewrites]
                                + [qa["question"] + " " + qa["answer"] for d in DOCS for qa in d.qa]
                                + ["Passage: Question: Answer:"])
    model = tiny_model(vocab_size=len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return model.to(dtype), tokenizer


def all_loras(path):
    bank = LoRABank(path)
    return bank.get(sorted(bank.index))


def test_prag_examples_two_qa_with_each_text_and_one_closed_book():
    _, tokenizer = setup()
    prag = load_config(Path(__file__).resolve().parents[1] / "configs" / "base" / "paper.yaml",
                       complete=False).bank
    examples = document_examples(DOCS[0], bank_recipe(prag), tokenizer)
    assert len(examples) == 5
    assert sum(ex[0][0].startswith("Passage:") for ex in examples) == 4
    assert examples[-1][0] == (qa_prompt("Birthplace of Idris Kael?"), False)
    assert examples[-1][1] == (" Velmora</s>", True)
    whole = document_examples(DOCS[0], bank_recipe(dataclasses.replace(prag, loss_on="all", text=True)),
                              tokenizer)
    assert len(whole) == 7 and all(trained for ex in whole for _, trained in ex)


# Batched and solo training are the same arithmetic only up to rounding: a GEMM's rounding of
# one row can depend on the batch's shape and the thread count (MKL's AVX2 kernels differ in
# the 7th digit of fp32; its AVX-512 ones happen not to), and AdamW's normalised steps
# amplify that to ~1e-4 over a few epochs. In float64 the same runs agree to ~1e-15, so the
# comparisons below run in float64 and can be tight: rows that leaked into each other would
# differ by far more.
EXACT = dict(rtol=1e-9, atol=1e-10)


def test_a_bank_on_the_top_layers_equals_one_trained_without_the_state_cache(tmp_path, monkeypatch):
    model, tokenizer = setup(dtype=torch.float64)
    model = tiny_model(vocab_size=model.config.vocab_size, num_hidden_layers=4,
                       pad_token_id=tokenizer.pad_token_id).to(torch.float64)
    inject_lora(model, [2, 3])
    cached = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "cached", CONFIG,
                                  progress=False))
    monkeypatch.setattr(bank_mod, "prefix_layer", lambda model: 0)  # every step from the tokens
    full = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "full", CONFIG,
                                progress=False))
    assert cached.layers == [2, 3]
    assert cached.B[(3, "down")].abs().sum() > 0, "LoRAs were not trained"
    assert_close(cached.A, full.A, **EXACT)
    assert_close(cached.B, full.B, **EXACT)


def test_batched_bank_equals_training_each_document_alone(tmp_path):
    model, tokenizer = setup(dtype=torch.float64)
    batched = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "batched", CONFIG,
                                   progress=False))
    alone = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "alone",
                                 dataclasses.replace(CONFIG, docs_per_step=1, shard_size=1),
                                 progress=False))
    assert batched.A[(0, "up")].dtype == torch.float64
    assert_close(batched.A, alone.A, **EXACT)
    assert_close(batched.B, alone.B, **EXACT)
    assert batched.B[(0, "up")].abs().sum() > 0, "LoRAs were not trained"


class Killed(Exception):
    """Stands in for a run killed mid-way."""


def test_an_interrupted_run_resumes_to_the_same_bank(tmp_path, monkeypatch):
    model, tokenizer = setup()
    reference = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "ref", CONFIG,
                                     progress=False))
    real, calls, kill = bank_mod._train_shard, [], [True]

    def dies_on_second_shard(*args):
        calls.append(args[-2].name)
        if kill[0] and len(calls) == 2:
            raise Killed
        return real(*args)

    monkeypatch.setattr(bank_mod, "_train_shard", dies_on_second_shard)
    with pytest.raises(Killed):
        build_bank(model, tokenizer, DOCS, tmp_path / "run", CONFIG, progress=False)
    assert not (tmp_path / "run" / "meta.json").exists()
    calls.clear()
    kill[0] = False
    resumed = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "run", CONFIG,
                                   progress=False))
    assert calls == ["shard-00001.safetensors", "shard-00002.safetensors"], "shard 0 retrained"
    assert_close(resumed.A, reference.A, rtol=0, atol=0)
    assert_close(resumed.B, reference.B, rtol=0, atol=0)
    calls.clear()
    build_bank(model, tokenizer, DOCS, tmp_path / "run", CONFIG, progress=False)
    assert calls == [], "a finished bank is retrained"


def test_a_changed_config_starts_over(tmp_path):
    model, tokenizer = setup()
    out = build_bank(model, tokenizer, DOCS, tmp_path / "bank", CONFIG, progress=False)
    first = LoRABank(out).get(["d0"])
    other = build_bank(model, tokenizer, DOCS, out, dataclasses.replace(CONFIG, lr=1e-2),
                       progress=False)
    assert not torch.equal(LoRABank(other).get(["d0"]).B[(0, "up")], first.B[(0, "up")])


def test_bank_refuses_another_base_model(tmp_path):
    model, tokenizer = setup()
    out = build_bank(model, tokenizer, DOCS[:2], tmp_path / "bank", CONFIG, base_model="tiny-a",
                     progress=False)
    with pytest.raises(ValueError, match="'tiny-a', not 'tiny-b'"):
        LoRABank(out, base_model="tiny-b")
    wider = tiny_model(vocab_size=len(tokenizer), intermediate_size=64)
    with pytest.raises(ValueError, match=r"0.down is \(in, out\) \[48, 32\] in the bank but "
                                         r"\[64, 32\]"):
        LoRABank(out, shapes=inject_lora(wider).shapes)
    with pytest.raises(KeyError, match="nope"):
        LoRABank(out).get(["nope"])
    with pytest.raises(FileNotFoundError, match="not a finished LoRA bank"):
        LoRABank(tmp_path / "empty")


def test_documents_without_examples_are_skipped_and_an_empty_bank_refused(tmp_path):
    model, tokenizer = setup()
    failed = AugmentedDoc("dx", "text", [], [], error="no QA")
    out = build_bank(model, tokenizer, [*DOCS[:2], failed], tmp_path / "bank", CONFIG,
                     progress=False)
    assert sorted(LoRABank(out).index) == ["d0", "d1"]
    with pytest.raises(ValueError, match="no document has training examples"):
        build_bank(model, tokenizer, [failed], tmp_path / "none", CONFIG, progress=False)


def test_nan_loss_names_the_document_row(tmp_path):
    model, tokenizer = setup()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="document row"):
        build_bank(model, tokenizer, DOCS[:2], tmp_path / "bank", CONFIG, progress=False)


def test_prag_combines_retrieved_documents_as_a_sum_of_deltas(tmp_path):
    model, tokenizer = setup()
    bank = LoRABank(build_bank(model, tokenizer, DOCS, tmp_path / "bank", CONFIG, progress=False))
    hits = [["d0", "d3"], ["d4", "d1"]]
    lora = bank.combined(hits)
    assert lora.batch_size == 2 and lora.rank == 2 * CONFIG.rank
    for q, ids in enumerate(hits):
        expected = combine([bank.get([d])[0] for d in ids])
        for key in lora.keys:
            assert_close(lora[q].delta(key), expected.delta(key))
    prompts = [qa_prompt("Where was Idris Kael born?"), qa_prompt("Who employs Tamsin Reole?")]
    batched = generate_answers(model, tokenizer, prompts, lora=lora)
    alone = [generate_answers(model, tokenizer, [p], lora=lora[q])[0]
             for q, p in enumerate(prompts)]
    assert batched == alone


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, tokenizer = setup(dtype=torch.float64)
    build_bank(model, tokenizer, DOCS, out, CONFIG, progress=False)
    torch.distributed.destroy_process_group()


def test_two_processes_share_the_shards_and_build_the_same_bank(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path / "ddp")), nprocs=2, join=True)
    model, tokenizer = setup(dtype=torch.float64)
    single = all_loras(build_bank(model, tokenizer, DOCS, tmp_path / "one", CONFIG,
                                  progress=False))
    ddp = all_loras(tmp_path / "ddp")
    assert_close(ddp.A, single.A, **EXACT)
    assert_close(ddp.B, single.B, **EXACT)


def test_prag_without_a_documents_lora_adds_nothing_when_missing_is_ok(tmp_path):
    model, tokenizer = setup()
    bank = LoRABank(build_bank(model, tokenizer, DOCS[:2], tmp_path / "bank", CONFIG,
                               progress=False))
    with pytest.raises(KeyError, match="failed-doc"):
        bank.combined([["d0", "failed-doc"]])
    lora = bank.combined([["d0", "failed-doc"], ["failed-doc", "failed-doc"]], missing_ok=True)
    assert lora.rank == 2 * CONFIG.rank
    for key in lora.keys:
        assert_close(lora[0].delta(key), bank.get(["d0"])[0].delta(key))
        assert not lora[1].delta(key).any()


def test_a_bank_is_retrained_when_the_prompt_wording_changes(tmp_path, monkeypatch):
    from dyprag.engine.prompts import PromptFormat

    model, tokenizer = setup()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    calls = []
    real = bank_mod._train_shard
    monkeypatch.setattr(bank_mod, "_train_shard", lambda *a: calls.append(1) or real(*a))
    chat = PromptFormat("chat", tokenizer)
    out = build_bank(model, tokenizer, DOCS[:2], tmp_path / "bank", CONFIG, progress=False,
                     fmt=chat)
    assert LoRABank(out).meta["prompt_format"] == "chat" and calls
    calls.clear()
    build_bank(model, tokenizer, DOCS[:2], out, CONFIG, progress=False, fmt=chat)
    assert not calls, "the same wording reuses the bank"
    tokenizer.chat_template = "{% for m in messages %}[{{ m['content'] }}] {% endfor %}"
    build_bank(model, tokenizer, DOCS[:2], out, CONFIG, progress=False, fmt=chat)
    assert calls, "other wording must retrain"
