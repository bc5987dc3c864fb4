"""Document augmentation: rewrites and question-answer pairs per document (PRAG's data).

    python -m dyprag.augment --world checkpoints/world --out checkpoints/world/augmented.jsonl

Each training document becomes one jsonl record (DESIGN.md §5)::

    {"doc_id", "text", "rewrites": [str], "qa": [{"question", "answer"}], "error": str?}

Two augmenters share one interface (``augment(passages) -> records``):

- ``LLMAugmenter``: a real LLM writes a rewrite and a JSON list of QA pairs (chat template when
  the tokenizer has one), batched. A reply that is not a valid QA list is retried a *bounded*
  number of times (sampling, so a retry can differ); after that the document keeps its
  rewrites, gets no QA and an ``error``, and is counted as failed. The reference code retries
  until the model complies, which can loop forever.
- ``TemplateAugmenter``: the synthetic world's rewrites and its ``augment_question_templates``,
  whose phrasings are disjoint from the test questions' (checked), so scores measure injected
  knowledge rather than a memorised question string.

``augment_corpus`` caches records in a jsonl file and resumes: documents already in it are
skipped, and a line cut short by a killed run is dropped before appending.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from dyprag.corpus import Passage, iter_corpus
from dyprag.files import read_json
from dyprag.world import load_entities


@dataclass
class AugmentedDoc:
    doc_id: str
    text: str
    rewrites: list[str] = field(default_factory=list)
    qa: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        if self.error is None:
            del record["error"]
        return record


class Augmenter(Protocol):
    def augment(self, passages: Sequence[Passage]) -> list[AugmentedDoc]: ...


# ---- the synthetic world ---------------------------------------------------------------------
class TemplateAugmenter:
    """Rewrites and QA pairs of the synthetic world in ``world_dir`` from its templates."""

    def __init__(self, world_dir: str | Path):
        world = Path(world_dir)
        schema = read_json(world / "schema.json")
        templates = schema["augment_question_templates"]
        clash = {t for ts in templates.values() for t in ts} & {
            t for ts in schema["question_templates"].values() for t in ts}
        if clash:
            raise ValueError(f"{world / 'schema.json'}: augmentation questions repeat test "
                             f"questions {sorted(clash)}; make them disjoint")
        self.templates = templates
        self.entities = {e["id"]: e for e in load_entities(world)}

    def augment(self, passages: Sequence[Passage]) -> list[AugmentedDoc]:
        records = []
        for p in passages:
            entity = self.entities.get(p.id)
            if entity is None:
                raise KeyError(f"document {p.id!r} is not an entity of this world")
            qa = _template_qa(self.templates, entity["name"], entity["attributes"])
            records.append(AugmentedDoc(p.id, p.text, list(entity["rewrites"]), qa))
        return records


def _template_qa(templates: dict[str, list[str]], name: str,
                 attributes: dict[str, str]) -> list[dict[str, str]]:
    """One QA pair per attribute and augmentation question template."""
    return [{"question": t.format(name=name), "answer": value}
            for attr, value in attributes.items() for t in templates[attr]]


def fresh_documents(world_dir: str | Path, count: int, seed: int) -> list[AugmentedDoc]:
    """``count`` bios of fresh people (names and facts not in the world), augmented like
    ``TemplateAugmenter`` does: extra documents for the translator's LM term (no bank LoRA)."""
    from dyprag.world import fresh_entities, render

    schema = read_json(Path(world_dir) / "schema.json")
    rng = random.Random(f"{seed}-extra-documents")
    docs = []
    for entity in fresh_entities(schema, count, rng):
        qa = _template_qa(schema["augment_question_templates"], entity.name, entity.attributes)
        docs.append(AugmentedDoc(f"extra-{entity.id}", render(entity, schema["bio_templates"], rng),
                                 [render(entity, schema["rewrite_templates"], rng)
                                  for _ in range(2)], qa))
    return docs


# ---- a real LLM ----------------------------------------------------------------------------------
REWRITE_PROMPT = (
    "Rewrite the passage below in different words. Keep every name, place, date, number and "
    "technical term exactly as written, and keep all of its facts.\n\nPassage: {passage}\n\n"
    "Rewritten passage:")
QA_PROMPT = (
    "Write {n} questions that the passage below answers, each with a short answer taken from "
    "the passage. Reply with a JSON list only, like "
    '[{{"question": "...", "answer": "..."}}].\n\nPassage: {passage}\n\nJSON:')

Generate = Callable[[list[str], bool], list[str]]
"""(prompts, sample) → one completion per prompt; greedy when ``sample`` is False."""


def parse_qa(reply: str, n: int) -> list[dict[str, str]]:
    """The first JSON list in ``reply`` as up to ``n`` ``{question, answer}`` pairs.

    Raises ``ValueError`` saying what is wrong when there is no usable pair.
    """
    start, end = reply.find("["), reply.rfind("]")
    if start < 0 or end <= start:
        raise ValueError("no JSON list in the reply")
    try:
        items = json.loads(reply[start:end + 1])
    except json.JSONDecodeError as err:
        raise ValueError(f"the JSON list does not parse: {err.msg}") from None
    pairs = [{"question": item["question"].strip(), "answer": str(item["answer"]).strip()}
             for item in items
             if isinstance(item, dict) and isinstance(item.get("question"), str)
             and isinstance(item.get("answer"), (str, int, float))
             and item["question"].strip() and str(item["answer"]).strip()]
    if not pairs:
        raise ValueError("the JSON list holds no {question, answer} object")
    return pairs[:n]


class LLMAugmenter:
    """Rewrites and QA pairs written by an LLM through ``generate`` (see ``from_model``)."""

    def __init__(self, generate: Generate, rewrites: int = 1, questions: int = 3,
                 max_retries: int = 2, chat: Callable[[str], str] | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be ≥ 0, got {max_retries}")
        self.generate, self.rewrites, self.questions = generate, rewrites, questions
        self.max_retries = max_retries
        self.chat = chat or (lambda text: text)

    @classmethod
    def from_model(cls, model, tokenizer, max_new_tokens: int = 384, batch_size: int = 8,
                   seed: int = 0, **kwargs: Any) -> LLMAugmenter:
        """Batched ``generate`` of a Hugging Face model; the chat template when it has one."""
        import torch

        def generate(prompts: list[str], sample: bool) -> list[str]:
            torch.manual_seed(seed)
            out = []
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                  padding_side="left", add_special_tokens=False)
                batch = batch.to(next(model.parameters()).device)
                with torch.no_grad():
                    ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                                         temperature=0.7 if sample else None, top_p=None,
                                         top_k=None, pad_token_id=tokenizer.pad_token_id)
                out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                              skip_special_tokens=True)
            return out

        chat = None
        if getattr(tokenizer, "chat_template", None):
            chat = lambda text: tokenizer.apply_chat_template(  # noqa: E731
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return cls(generate, chat=chat, **kwargs)

    def augment(self, passages: Sequence[Passage]) -> list[AugmentedDoc]:
        texts = [p.text for p in passages]
        rewrite_prompts = [self.chat(REWRITE_PROMPT.format(passage=t))
                           for t in texts for _ in range(self.rewrites)]
        rewrites = [r.strip() for r in self.generate(rewrite_prompts, self.rewrites > 1)]
        records = [AugmentedDoc(p.id, p.text, [r for r in rewrites[i * self.rewrites:
                                                                    (i + 1) * self.rewrites] if r])
                   for i, p in enumerate(passages)]
        pending = list(range(len(passages)))
        errors: dict[int, str] = {}
        for attempt in range(1 + self.max_retries):
            if not pending:
                break
            prompts = [self.chat(QA_PROMPT.format(n=self.questions, passage=texts[i]))
                       for i in pending]
            still = []
            for i, reply in zip(pending, self.generate(prompts, attempt > 0)):
                try:
                    records[i].qa = parse_qa(reply, self.questions)
                except ValueError as err:
                    errors[i] = str(err)
                    still.append(i)
            pending = still
        for i in pending:
            records[i].error = f"no QA pairs after {1 + self.max_retries} attempts: {errors[i]}"
        return records


# ---- the cached, resumable run ------------------------------------------------------------------
@dataclass
class AugmentStats:
    written: int = 0
    cached: int = 0
    failed: int = 0


def read_augmented(path: str | Path) -> list[AugmentedDoc]:
    """The complete records of an augmentation file (a line cut short is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"augmentation file {path} does not exist")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(AugmentedDoc(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not an augmentation record") from None
    return records


def _complete_prefix(path: Path) -> None:
    """Cut a trailing partial line (a run killed mid-write) so appends start clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)


def augment_corpus(passages: Iterable[Passage], augmenter: Augmenter, out: str | Path,
                   batch_size: int = 32, progress: bool = True) -> AugmentStats:
    """Augment every passage not yet in ``out`` (jsonl), appending one flushed batch at a time."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _complete_prefix(out)
    done = {r.doc_id for r in read_augmented(out)} if out.is_file() else set()
    stats = AugmentStats()
    todo = []
    for p in passages:
        if p.id in done:
            stats.cached += 1
        else:
            todo.append(p)
    with open(out, "a") as f, tqdm(total=len(todo), desc="augment", unit="doc",
                                   disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            records = augmenter.augment(todo[i:i + batch_size])
            f.write("".join(json.dumps(r.to_json()) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
            stats.written += len(records)
            stats.failed += sum(r.error is not None for r in records)
            bar.update(len(records))
            bar.set_postfix(failed=stats.failed)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description="Augment the synthetic world's documents "
                                                 "(rewrites + QA pairs) for bank training.")
    parser.add_argument("--world", default="checkpoints/world", help="world directory")
    parser.add_argument("--out", default=None, help="jsonl (default: <world>/augmented.jsonl)")
    args = parser.parse_args()
    world = Path(args.world)
    stats = augment_corpus(iter_corpus(world / "corpus.jsonl"), TemplateAugmenter(world),
                           args.out or world / "augmented.jsonl")
    print(json.dumps(asdict(stats)))


if __name__ == "__main__":
    main()
