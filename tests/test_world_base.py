"""dyprag.training.world_base: tokenizer, training sequences, and the cached base model round trip."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from test_world import CONFIG
from torch.testing import assert_close

from dyprag.config import PretrainConfig
from dyprag.data.world import generate_world, load_schema
from dyprag.engine.models import load_model
from dyprag.training.examples import collate, length_sorted
from dyprag.training.world_base import build_tokenizer, pretrain_base, pretraining_texts

TINY = PretrainConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            epochs=1, batch_size=8, reading_single=30, reading_multi=10, warmup_steps=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    schema = load_schema(CONFIG)
    schema["splits"] = {"pretrain": 10, "train": 4, "test": 3}
    return generate_world(schema, tmp_path_factory.mktemp("world"))


def test_word_tokenizer_round_trips_world_text():
    tok = build_tokenizer(["Idris Kael was born in Velmora.", "Question: Where? Answer:"])
    ids = tok("Idris Kael was born in Velmora.", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "Idris Kael was born in Velmora ."
    assert tok("Velmora </s>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id


def test_reading_sequences_ask_about_what_the_passages_say(world):
    examples = pretraining_texts(world, single=20, multi=10, max_passages=3,
                                 questions_per_context=2, seed=0)
    reading = [e for e in examples if e[0][0].startswith("Passage:")]
    assert len(reading) == 30
    assert [e[0][0].count("Passage:") for e in reading[:20]] == [1] * 20, "single stage first"
    for segments in reading:
        context = segments[0][0]
        for (_, _), (answer, trained) in zip(segments[1::2], segments[2::2]):
            assert trained and answer.split()[0] in context


def test_multi_passage_questions_follow_a_retrievers_order(world):
    schema = json.loads((world / "schema.json").read_text())
    names = [f"{f} {last}" for f in schema["names"]["first"] for last in schema["names"]["last"]]
    examples = pretraining_texts(world, single=0, multi=40, max_passages=3,
                                 questions_per_context=2, seed=0, gold_first=1.0)
    reading = [e for e in examples if e[0][0].startswith("Passage:")]
    assert len(reading) == 40 and any(e[0][0].count("Passage:") > 1 for e in reading)
    for segments in reading:
        first_passage = segments[0][0].split("Passage: ")[1]
        for question, _ in segments[1::2]:
            asked = [n for n in names if n in question]
            assert len(asked) == 1 and asked[0] in first_passage, (question, first_passage)


def test_collate_trains_only_marked_segments():
    tok = build_tokenizer(["a b c d e"])
    batch = collate(tok, [[("a b", False), (" c", True)], [("d", True)]])
    assert batch["labels"].tolist() == [[-100, -100, tok.convert_tokens_to_ids("c")],
                                         [tok.convert_tokens_to_ids("d"), -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_masks_by_length_when_pad_is_eos():
    tok = build_tokenizer(["a b"])
    tok.pad_token = tok.eos_token
    batch = collate(tok, [[("a", False), (" b </s>", True)], [("a", True)]])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"][0, 2] == tok.eos_token_id


def test_pretrained_base_saves_loads_and_is_cached(world, tmp_path):
    out = pretrain_base(world, tmp_path / "base", TINY)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["steps"] > 0 and meta["config"]["hidden_size"] == 32
    model, tokenizer = load_model(out)
    ids = tokenizer("Question: Where was Idris born? Answer:", return_tensors="pt",
                    add_special_tokens=False)["input_ids"]
    logits = model(ids).logits
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = pretrain_base(world, tmp_path / "base", TINY)
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp, "cache hit retrains"
    reloaded, _ = load_model(again)
    assert_close(reloaded(ids).logits, logits)
    assert torch.isfinite(logits).all()


def test_a_new_run_copies_the_base_model_pretrained_by_another(world, tmp_path, monkeypatch):
    from dyprag.training.world_base import shared_base_dir

    first = pretrain_base(world, tmp_path / "run1" / "base", TINY)
    key = json.loads((first / "pretrain.json").read_text())["fingerprint"]
    assert (shared_base_dir(key) / "model.safetensors").is_file()
    monkeypatch.setattr("pytorch_lightning.Trainer.fit",
                        lambda *a, **kw: pytest.fail("pretrained again"))
    second = pretrain_base(world, tmp_path / "run2" / "base", TINY)
    for name in ("model.safetensors", "pretrain.json", "tokenizer.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    other = dataclasses.replace(TINY, seed=1)  # another recipe is not the cached model
    with pytest.raises(pytest.fail.Exception, match="pretrained again"):
        pretrain_base(world, tmp_path / "run3" / "base", other)


def test_length_sorted_batches_hold_similar_lengths_window_by_window():
    rng = random.Random(0)
    lengths = [rng.randint(5, 180) for _ in range(1000)]
    examples = list(range(1000))  # each example is its own index
    out = length_sorted(examples, lengths, batch_size=10, window=5, rng=random.Random(0))
    assert sorted(out) == examples  # a permutation
    for start in range(0, 1000, 50):  # each window keeps its own examples (the curriculum)
        assert set(out[start:start + 50]) == set(range(start, start + 50))

    def padded(order):
        return sum(max(lengths[i] for i in order[b:b + 10]) * 10 for b in range(0, 1000, 10))

    assert padded(out) < 0.8 * padded(examples)
    assert length_sorted(examples, lengths, 10, 5, random.Random(0)) == out  # seeded


def test_the_length_window_is_part_of_the_recipe(world, tmp_path):
    off = pretrain_base(world, tmp_path / "off", dataclasses.replace(TINY, length_window=0))
    on = pretrain_base(world, tmp_path / "on", dataclasses.replace(TINY, length_window=2))
    meta = {p: json.loads((p / "pretrain.json").read_text()) for p in (off, on)}
    assert meta[off]["fingerprint"] != meta[on]["fingerprint"]
    assert meta[off]["config"]["length_window"] == 0 and meta[on]["config"]["length_window"] == 2


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    return generate_world(load_schema(CONFIG), tmp_path_factory.mktemp("default-world"))


def test_the_default_world_base_model_ships_in_the_package(default_world, tmp_path, monkeypatch):
    from dyprag.files import file_sha256 as sha256
    from dyprag.training.world_base import SHIPPED

    monkeypatch.setenv("DYPRAG_CACHE", str(tmp_path / "empty-cache"))  # a machine's first run
    monkeypatch.setattr("pytorch_lightning.Trainer.fit",
                        lambda *a, **kw: pytest.fail("pretrained again"))
    out = pretrain_base(default_world, tmp_path / "base")  # the default recipe
    assert sha256(out / "model.safetensors") == sha256(SHIPPED / "model.safetensors")
    assert (out / "pretrain.json").read_text() == (SHIPPED / "pretrain.json").read_text()
    load_model(out)  # a complete model directory


def test_another_recipe_or_a_rebuild_pretrains_rather_than_copy_the_shipped_model(
        default_world, tmp_path, monkeypatch):
    monkeypatch.setenv("DYPRAG_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("dyprag.training.world_base.pretraining_texts",  # the first step of pretraining
                        lambda *a, **kw: pytest.fail("pretrained again"))
    with pytest.raises(pytest.fail.Exception, match="pretrained again"):
        pretrain_base(default_world, tmp_path / "rebuilt", fresh=True)  # --rebuild base
    with pytest.raises(pytest.fail.Exception, match="pretrained again"):
        pretrain_base(default_world, tmp_path / "other", PretrainConfig(seed=1))
