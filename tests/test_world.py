"""dyprag.data.world: schema validation, deterministic generation, splits and file formats."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml

from dyprag.data.qa import load_qa
from dyprag.data.world import fresh_entities, generate_world, load_entities, load_schema, make_entities

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "world.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    small = load_schema(CONFIG)
    small["splits"] = {"pretrain": 20, "train": 8, "test": 5}
    return small


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_same_files_other_seed_other_files(schema, tmp_path):
    generate_world(schema, tmp_path / "a")
    generate_world(copy.deepcopy(schema), tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    generate_world({**schema, "seed": 1}, tmp_path / "c")
    assert _files(tmp_path / "a")["corpus.jsonl"] != _files(tmp_path / "c")["corpus.jsonl"]


def test_splits_are_disjoint_and_questions_answerable_from_the_bio(schema, tmp_path):
    out = generate_world(schema, tmp_path / "w")
    entities = load_entities(out)
    assert [sum(e["split"] == s for e in entities) for s in ("pretrain", "train", "test")] == [20, 8, 5]
    assert len({e["name"] for e in entities}) == len(entities), "one entity per name"
    corpus = {row["id"]: row for row in map(json.loads, (out / "corpus.jsonl").open())}
    test = load_qa(out / "qa_test.jsonl")
    assert len(test) == 5 * sum(len(t) for t in schema["question_templates"].values())
    for qa in test:
        doc = corpus[qa.meta["doc_id"]]
        assert doc["title"] in qa.question and qa.answers[0] in doc["text"]


def test_regenerating_is_skipped_when_schema_unchanged(schema, tmp_path):
    out = generate_world(schema, tmp_path / "w")
    stamp = (out / "corpus.jsonl").stat().st_mtime_ns
    generate_world(schema, out)
    assert (out / "corpus.jsonl").stat().st_mtime_ns == stamp


def test_fresh_entities_never_reuse_world_names(schema):
    world = {e.name for e in make_entities(schema)}
    fresh = fresh_entities(schema, 200, random.Random(0))
    assert not world & {e.name for e in fresh}


def test_invalid_schema_lists_every_problem(tmp_path):
    bad = yaml.safe_load(CONFIG.read_text())
    del bad["seed"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="seed: missing"):
        load_schema(path)
    bad = yaml.safe_load(CONFIG.read_text())
    bad["bio_templates"]["city"] = ["{name} likes {year}."]
    bad["attributes"]["field"] = ["only-one"]
    bad["augment_question_templates"]["year"] = bad["question_templates"]["year"]
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError) as err:
        load_schema(path)
    message = str(err.value)
    assert "attributes.field: needs at least 2 values" in message
    assert "bio_templates.city: template '{name} likes {year}.'" in message
    assert "augment_question_templates: must not repeat question_templates" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_schema(tmp_path / "missing.yaml")
