"""Document augmentation: rewrites and question-answer pairs per document (PRAG's data).

    python -m dyprag.data.augment --world /tmp/my-world --out /tmp/my-world/augmented.jsonl

Each training document becomes one jsonl record (docs/design.md §5)::

    {"doc_id", "text", "rewrites": [str], "qa": [{"question", "answer"}], "error": str?}

Two augmenters share one interface (``augment(passages) -> records``):

- ``LLMAugmenter``: a real LLM writes a rewrite and QA pairs (chat template when the tokenizer
  has one; one worked example first; ``Question: … / Answer: …`` lines or a JSON list), batched.
  Pairs whose answer is not in the passage are dropped. A reply with no usable pair is
  retried a *bounded* number of times (sampling, so a retry can differ); after that the
  document keeps its rewrites, gets no QA and an ``error`` (with the reply's start), and is
  counted as failed. The reference code retries until the model complies, which can loop
  forever.
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
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from dyprag.config import AugmentConfig
from dyprag.data.corpus import Passage, iter_corpus
from dyprag.data.world import load_entities
from dyprag.files import read_json, unshare


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
    from dyprag.data.world import fresh_entities, render

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
    "Write {n} questions that the passage below answers, each followed by its short answer "
    "copied from the passage, in this format:\nQuestion: ...\nAnswer: ...\n\nPassage: {passage}")
# One worked example shown before the real request (a user turn and the assistant's reply):
# without it SmolLM2-135M-Instruct wrote questions without answers, or prose, never JSON.
QA_EXAMPLE = (
    "Ada Lovelace was born in London in 1815. She worked with Charles Babbage on the "
    "Analytical Engine.",
    "Question: Where was Ada Lovelace born?\nAnswer: London\n"
    "Question: In which year was Ada Lovelace born?\nAnswer: 1815\n"
    "Question: Who did Ada Lovelace work with?\nAnswer: Charles Babbage")

Generate = Callable[[list[str], bool, str], list[str]]
"""(prompts, sample, task) → one completion per prompt; greedy when ``sample`` is False;
``task`` is "rewrite" or "qa" (a QA completion may stop once it holds enough pairs)."""
Chat = Callable[[list[dict[str, str]]], str]
"""Messages ({"role", "content"}) → the prompt text the model continues."""

_QUESTION = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:question|q)\s*\d*\s*[:.]\s*(.*?)\s*$", re.I)
_ANSWER = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:answer|a)\s*\d*\s*[:.]\s*(.*?)\s*$", re.I)
_INLINE = re.compile(r"\s(?:answer|a)\s*:\s*", re.I)  # "Question: …? Answer: …" on one line


def _pairs_from_lines(reply: str) -> list[tuple[str, str]]:
    """``Question: …`` / ``Answer: …`` pairs (also ``Q:``/``A:``, numbered, or both on one
    line), in order."""
    pairs, question = [], None
    for line in reply.splitlines():
        if (q := _QUESTION.match(line)) is not None:
            question = q[1]
            inline = _INLINE.split(question, maxsplit=1)
            if len(inline) == 2:
                pairs.append((inline[0].strip(), inline[1].strip()))
                question = None
        elif (a := _ANSWER.match(line)) is not None and question is not None:
            pairs.append((question, a[1]))
            question = None
    return pairs


def _pairs_from_json(reply: str) -> list[tuple[str, str]] | None:
    """The pairs of the first JSON list in ``reply``; None when there is no such list."""
    start, end = reply.find("["), reply.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        items = json.loads(reply[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list):
        return None
    return [(item["question"], str(item["answer"])) for item in items
            if isinstance(item, dict) and isinstance(item.get("question"), str)
            and isinstance(item.get("answer"), (str, int, float))]


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_qa(reply: str, n: int, passage: str | None = None) -> list[dict[str, str]]:
    """Up to ``n`` ``{question, answer}`` pairs from an LLM's reply: a JSON list, or
    ``Question: …`` / ``Answer: …`` lines (what small chat models write).

    Pairs with an empty side are dropped, and so are repeats of a question. With ``passage``,
    so are answers that are not in it (after lowercasing and dropping punctuation) and
    answers the question already contains: the pair must teach a fact of the document.
    Raises ``ValueError`` saying what is wrong when no usable pair is left.
    """
    found = _pairs_from_json(reply)
    if not found:
        found = _pairs_from_lines(reply)
    if not found:
        raise ValueError("no JSON list and no 'Question: … Answer: …' lines in the reply")
    pairs, seen = [], set()
    text = f" {_plain(passage)} " if passage is not None else None
    for question, answer in found:
        question, answer = question.strip(), answer.strip().removesuffix(".").strip()
        plain = _plain(answer)
        if not question or not plain or question.lower() in seen:
            continue
        if text is not None and (f" {plain} " not in text or plain in _plain(question)):
            continue
        seen.add(question.lower())
        pairs.append({"question": question, "answer": answer})
    if not pairs:
        reason = " found in the passage" if passage is not None else ""
        raise ValueError(f"{len(found)} pairs in the reply, none with a usable answer{reason}")
    return pairs[:n]


def plain_chat(messages: list[dict[str, str]]) -> str:
    """Messages as plain text, for a model without a chat template."""
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


class LLMAugmenter:
    """Rewrites and QA pairs written by an LLM through ``generate`` (see ``from_model``)."""

    def __init__(self, generate: Generate, rewrites: int = AugmentConfig.rewrites,
                 questions: int = AugmentConfig.questions,
                 max_retries: int = AugmentConfig.max_retries, chat: Chat | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be ≥ 0, got {max_retries}")
        self.generate, self.rewrites, self.questions = generate, rewrites, questions
        self.max_retries = max_retries
        self.chat = chat or plain_chat

    @classmethod
    def from_model(cls, model, tokenizer, max_new_tokens: int = 256,
                   batch_size: int = AugmentConfig.batch_size,
                   seed: int = 0, **kwargs: Any) -> LLMAugmenter:
        """Batched ``generate`` of a Hugging Face model; the chat template when it has one.

        Generation stops at the end-of-sequence token, and a QA reply also once it holds
        ``questions`` complete answer lines (small models go on repeating pairs until
        ``max_new_tokens`` otherwise).
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class PairsDone(StoppingCriteria):
            def __init__(self, start: int):
                self.start = start

            def __call__(self, input_ids, scores, **_) -> torch.Tensor:
                texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
                done = [sum(bool(_ANSWER.match(line)) for line in t.split("\n")[:-1])
                        >= augmenter.questions for t in texts]
                return torch.tensor(done, device=input_ids.device)

        def generate(prompts: list[str], sample: bool, task: str) -> list[str]:
            torch.manual_seed(seed)
            out = []
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                  padding_side="left", add_special_tokens=False)
                batch = batch.to(next(model.parameters()).device)
                width = batch["input_ids"].shape[1]
                stop = StoppingCriteriaList([PairsDone(width)]) if task == "qa" else None
                with torch.no_grad():
                    ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=sample,
                                         temperature=0.7 if sample else None, top_p=None,
                                         top_k=None, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id,
                                         stopping_criteria=stop)
                out += tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)
            return out

        chat = None
        if getattr(tokenizer, "chat_template", None):
            chat = lambda messages: tokenizer.apply_chat_template(  # noqa: E731
                messages, tokenize=False, add_generation_prompt=True)
        augmenter = cls(generate, chat=chat, **kwargs)
        return augmenter

    def qa_prompt(self, passage: str) -> str:
        """The QA request for ``passage``, after one worked example."""
        example, reply = QA_EXAMPLE
        return self.chat([
            {"role": "user", "content": QA_PROMPT.format(n=3, passage=example)},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": QA_PROMPT.format(n=self.questions, passage=passage)}])

    def augment(self, passages: Sequence[Passage]) -> list[AugmentedDoc]:
        texts = [p.text for p in passages]
        rewrite_prompts = [self.chat([{"role": "user", "content": REWRITE_PROMPT.format(passage=t)}])
                           for t in texts for _ in range(self.rewrites)]
        rewrites = [r.strip() for r in self.generate(rewrite_prompts, self.rewrites > 1, "rewrite")]
        records = [AugmentedDoc(p.id, p.text, [r for r in rewrites[i * self.rewrites:
                                                                    (i + 1) * self.rewrites] if r])
                   for i, p in enumerate(passages)]
        pending = list(range(len(passages)))
        errors: dict[int, str] = {}
        for attempt in range(1 + self.max_retries):
            if not pending:
                break
            prompts = [self.qa_prompt(texts[i]) for i in pending]
            still = []
            for i, reply in zip(pending, self.generate(prompts, attempt > 0, "qa")):
                try:
                    records[i].qa = parse_qa(reply, self.questions, texts[i])
                except ValueError as err:
                    errors[i] = f"{err}; reply began {reply[:80]!r}"
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
    done = {r.doc_id for r in read_augmented(out)} if out.is_file() else set()
    stats = AugmentStats()
    todo = []
    for p in passages:
        if p.id in done:
            stats.cached += 1
        else:
            todo.append(p)
    if not todo:
        if not out.exists():
            out.touch()
        return stats
    unshare(out)  # appended to in place: not through a link to a finished run's copy
    _complete_prefix(out)
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
    parser.add_argument("--world", required=True, help="world directory (python -m dyprag.data.world)")
    parser.add_argument("--out", default=None, help="jsonl (default: <world>/augmented.jsonl)")
    args = parser.parse_args()
    world = Path(args.world)
    stats = augment_corpus(iter_corpus(world / "corpus.jsonl"), TemplateAugmenter(world),
                           args.out or world / "augmented.jsonl")
    print(json.dumps(asdict(stats)))


if __name__ == "__main__":
    main()
