"""The embedded synthetic world: fictional entities, their bios, and questions about them.

    python -m dyprag.data.world --config configs/world.yaml --out /tmp/my-world

A world is defined by a YAML schema (``configs/world.yaml``): an entity kind, name parts,
attributes with closed value sets, bio / rewrite / question templates, and split sizes.
From a seed it writes the same files as a real dataset, so every later stage treats it like
any other corpus and QA set:

    corpus.jsonl            one bio per entity           {"id", "title", "text"}
    qa_<split>.jsonl        questions per split          {"id", "question", "answers", "meta"}
    entities.jsonl          entities with attributes, split and rewrites of their bio
    meta.json               schema fingerprint, seed, counts (written last)
    schema.json             the schema the files were generated from

Splits: ``pretrain`` entities teach the base model language, reading and closed-book recall;
``train`` entities feed the LoRA bank and the translator; ``test`` entities are held out
everywhere, so closed-book accuracy on them is at chance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dyprag.files import atomic_write_json, atomic_write_jsonl, fingerprint, is_cached, read_json

SPLITS = ("pretrain", "train", "test")
TEMPLATE_SETS = ("bio_templates", "rewrite_templates", "question_templates",
                 "augment_question_templates")


@dataclass(frozen=True)
class Entity:
    id: str
    name: str
    split: str
    attributes: dict[str, str]


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read and validate a world schema; every problem is reported in one ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"world config {path} does not exist")
    try:
        schema = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    problems = validate_schema(schema)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return schema


def validate_schema(schema: Any) -> list[str]:
    """All problems of a schema, as 'field: what is wrong' strings (empty when valid)."""
    if not isinstance(schema, dict):
        return ["the world config must be a mapping"]
    problems = []
    for key in ("seed", "entity_kind", "names", "attributes", "splits", *TEMPLATE_SETS):
        if key not in schema:
            problems.append(f"{key}: missing")
    if problems:
        return problems
    names = schema["names"]
    if not (isinstance(names, dict) and names.get("first") and names.get("last")):
        problems.append("names: needs non-empty 'first' and 'last' lists")
    attributes = schema["attributes"]
    if not isinstance(attributes, dict) or not attributes:
        return problems + ["attributes: needs at least one attribute"]
    for attr, values in attributes.items():
        try:
            if len(attribute_values(values)) < 2:
                problems.append(f"attributes.{attr}: needs at least 2 values")
        except ValueError as err:
            problems.append(f"attributes.{attr}: {err}")
    for group in TEMPLATE_SETS:
        templates = schema[group]
        if not isinstance(templates, dict):
            problems.append(f"{group}: must map each attribute to a list of templates")
            continue
        for attr in attributes:
            if not templates.get(attr):
                problems.append(f"{group}.{attr}: missing (every attribute needs templates)")
        for attr, items in templates.items():
            if attr not in attributes:
                problems.append(f"{group}.{attr}: unknown attribute")
                continue
            for template in items or []:
                fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
                if "name" not in fields or not fields <= {"name", attr}:
                    problems.append(f"{group}.{attr}: template {template!r} must use {{name}} "
                                    f"and may use only {{{attr}}}")
    splits = schema["splits"]
    if not isinstance(splits, dict) or set(splits) != set(SPLITS):
        problems.append(f"splits: needs exactly {list(SPLITS)}")
    elif isinstance(names, dict) and names.get("first") and names.get("last"):
        combos = len(set(names["first"])) * len(set(names["last"]))
        if sum(splits.values()) > combos:
            problems.append(f"splits: {sum(splits.values())} entities but only {combos} "
                            "distinct names")
    qa_overlap = _overlap(schema["question_templates"], schema["augment_question_templates"])
    if qa_overlap:
        problems.append(f"augment_question_templates: must not repeat question_templates "
                        f"({qa_overlap[0]!r})")
    return problems


def _overlap(a: dict, b: dict) -> list[str]:
    return [t for attr in a for t in (a.get(attr) or []) if t in (b.get(attr) or [])]


def attribute_values(spec: Any) -> list[str]:
    """A value set: a list, or ``{range: [lo, hi]}`` for integers lo..hi inclusive."""
    if isinstance(spec, list):
        return [str(v) for v in spec]
    if isinstance(spec, dict) and "range" in spec:
        lo, hi = spec["range"]
        return [str(v) for v in range(int(lo), int(hi) + 1)]
    raise ValueError("must be a list of values or {range: [lo, hi]}")


def make_entities(schema: dict[str, Any]) -> list[Entity]:
    """Draw every entity of every split, deterministically from ``schema['seed']``."""
    rng = random.Random(schema["seed"])
    first, last = sorted(set(schema["names"]["first"])), sorted(set(schema["names"]["last"]))
    total = sum(schema["splits"].values())
    names = rng.sample([f"{f} {s}" for f, s in itertools.product(first, last)], total)
    values = {a: attribute_values(v) for a, v in schema["attributes"].items()}
    entities, i = [], 0
    for split in SPLITS:
        for _ in range(schema["splits"][split]):
            attrs = {a: rng.choice(vs) for a, vs in values.items()}
            entities.append(Entity(f"e{i:05d}", names[i], split, attrs))
            i += 1
    return entities


def fresh_entities(schema: dict[str, Any], count: int, rng: random.Random) -> list[Entity]:
    """Entities whose names are not in the world, with random attributes.

    Reading practice for the base model: their facts cannot be memorised, so the only way to
    answer is to read the passage. Names are drawn from the combinations no world entity uses.
    """
    taken = {e.name for e in make_entities(schema)}
    first, last = sorted(set(schema["names"]["first"])), sorted(set(schema["names"]["last"]))
    free = [f"{f} {s}" for f, s in itertools.product(first, last) if f"{f} {s}" not in taken]
    if not free:
        raise ValueError("every name combination is used by the world; add name parts")
    values = {a: attribute_values(v) for a, v in schema["attributes"].items()}
    return [Entity(f"x{i:06d}", rng.choice(free), "fresh",
                   {a: rng.choice(vs) for a, vs in values.items()}) for i in range(count)]


def render(entity: Entity, templates: dict[str, list[str]], rng: random.Random) -> str:
    """One sentence per attribute from ``templates``, in shuffled order."""
    sentences = [rng.choice(templates[a]).format(name=entity.name, **{a: v})
                 for a, v in entity.attributes.items()]
    rng.shuffle(sentences)
    return " ".join(sentences)


def questions(entity: Entity, templates: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Every template question about ``entity``, in the QA jsonl format."""
    rows = []
    for attr, value in entity.attributes.items():
        for t, template in enumerate(templates[attr]):
            rows.append({"id": f"{entity.id}-{attr}-{t}",
                         "question": template.format(name=entity.name),
                         "answers": [value],
                         "meta": {"entity": entity.id, "doc_id": entity.id, "attribute": attr,
                                  "template": t}})
    return rows


def generate_world(schema: dict[str, Any], out_dir: str | Path, rewrites: int = 2) -> Path:
    """Write the world's files into ``out_dir``; skipped when they exist for this schema."""
    out = Path(out_dir)
    meta_path = out / "meta.json"
    key = fingerprint(schema)
    if is_cached(meta_path, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{schema['seed']}-text")
    entities = make_entities(schema)
    corpus, records, qa = [], [], {split: [] for split in SPLITS}
    for entity in entities:
        bio = render(entity, schema["bio_templates"], rng)
        corpus.append({"id": entity.id, "title": entity.name, "text": bio})
        records.append({"id": entity.id, "name": entity.name, "split": entity.split,
                        "attributes": entity.attributes,
                        "rewrites": [render(entity, schema["rewrite_templates"], rng)
                                     for _ in range(rewrites)]})
        qa[entity.split].extend(questions(entity, schema["question_templates"]))
    atomic_write_json(out / "schema.json", schema)
    atomic_write_jsonl(out / "corpus.jsonl", corpus)
    atomic_write_jsonl(out / "entities.jsonl", records)
    for split, rows in qa.items():
        atomic_write_jsonl(out / f"qa_{split}.jsonl", rows)
    atomic_write_json(meta_path, {
        "fingerprint": key, "seed": schema["seed"], "entity_kind": schema["entity_kind"],
        "entities": {s: schema["splits"][s] for s in SPLITS},
        "questions": {s: len(rows) for s, rows in qa.items()},
    })
    return out


def load_entities(world_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``entities.jsonl`` (id, name, split, attributes, rewrites)."""
    path = Path(world_dir) / "entities.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; generate the world first")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic world's corpus and QA files.")
    parser.add_argument("--config", default="configs/world.yaml", help="world schema (YAML)")
    parser.add_argument("--out", required=True, help="output directory (a new one)")
    args = parser.parse_args()
    out = generate_world(load_schema(args.config), args.out)
    print(json.dumps(read_json(out / "meta.json")))


if __name__ == "__main__":
    main()
