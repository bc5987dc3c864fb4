"""Answer questions in every RAG mode and score them (train.py's eval stage; bench; infer).

Modes, each with the top ``k`` retrieved documents of the question (``"mode@k"``):

- ``vanilla``: closed book;
- ``rag@k``: the passages in the prompt;
- ``prag@k``: no passage; the sum of the documents' bank LoRAs injected (PRAG);
- ``dyprag@k``: no passage; the sum of the translator's LoRAs of the documents (DyPRAG);
- ``prag+rag@k``, ``dyprag+rag@k``: both.

Each question gets its own LoRA (per-sample injection), so a whole batch of questions is
answered in one ``generate``. Combining k documents is the sum of their deltas (rank
concatenation), never DyPRAG's averaging of A and B.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dyprag.bank import BankSet, LoRABank
from dyprag.config import parse_mode
from dyprag.embed import EmbeddingTable
from dyprag.generate import generate_answers
from dyprag.lora import LoRA, sum_groups
from dyprag.metrics import score
from dyprag.prompts import PLAIN, PromptFormat
from dyprag.translator import ParameterTranslator

Hits = Sequence[Sequence[str]]
"""Per question, the retrieved document ids, best first."""


@dataclass
class Knowledge:
    """Where each mode's knowledge comes from; ``bank`` / ``translator`` only for its modes."""

    passages: Mapping[str, str]
    bank: LoRABank | BankSet | None = None
    translator: ParameterTranslator | None = None
    embeddings: EmbeddingTable | None = None
    # PRAG modes: a retrieved document without a bank LoRA (its augmentation wrote no QA
    # pair) adds nothing instead of being an error (train.py's eval of every test question).
    missing_ok: bool = False


@torch.no_grad()
def translated(translator: ParameterTranslator, embeddings: EmbeddingTable, hits: Hits,
               k: int) -> LoRA:
    """DyPRAG's knowledge per question: the sum of the generated deltas of its top-k
    documents, batched over questions: ``(N, k·r, in)``, ``(N, out, k·r)``."""
    device = next(translator.parameters()).device
    flat = [d for h in hits for d in h[:k]]  # question-major: q0d0, q0d1, ..., q1d0, ...
    assert len(flat) == k * len(hits), f"every question needs {k} documents"
    return sum_groups(translator(embeddings.get(flat).to(device)).detach(), k)


def mode_lora(mode: str, hits: Hits, knowledge: Knowledge) -> LoRA | None:
    name, k = parse_mode(mode)
    if name.startswith("prag"):
        if knowledge.bank is None:
            raise ValueError(f"mode {mode} needs a LoRA bank")
        return knowledge.bank.combined([list(h[:k]) for h in hits], knowledge.missing_ok)
    if name.startswith("dyprag"):
        if knowledge.translator is None or knowledge.embeddings is None:
            raise ValueError(f"mode {mode} needs a translator and document embeddings")
        return translated(knowledge.translator, knowledge.embeddings, hits, k)
    return None


def mode_prompts(mode: str, questions: Sequence[str], hits: Hits,
                 passages: Mapping[str, str], fmt: PromptFormat = PLAIN) -> list[str]:
    name, k = parse_mode(mode)
    in_prompt = k if name in ("rag", "prag+rag", "dyprag+rag") else 0
    return [fmt.prompt(q, [passages[d] for d in h[:in_prompt]]) for q, h in zip(questions, hits)]


def answer(model, tokenizer, mode: str, questions: Sequence[str], hits: Hits,
           knowledge: Knowledge, max_new_tokens: int = 8, batch_size: int = 64,
           fmt: PromptFormat = PLAIN) -> list[str]:
    """Greedy answers to ``questions`` in ``mode``; LoRAs are built one batch at a time
    (a real model's per-question LoRAs are large)."""
    if len(hits) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(hits)} retrieval results")
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        q, h = questions[start:start + batch_size], hits[start:start + batch_size]
        lora = mode_lora(mode, h, knowledge)
        if lora is not None:
            lora = lora.to(next(model.parameters()).device, next(model.parameters()).dtype)
        answers += generate_answers(model, tokenizer,
                                    mode_prompts(mode, q, h, knowledge.passages, fmt),
                                    max_new_tokens, batch_size, lora=lora, fmt=fmt)
    return answers


def evaluate(model, tokenizer, modes: Sequence[str], questions: Sequence[str],
             golds: Sequence[Sequence[str]], hits: Hits, knowledge: Knowledge,
             max_new_tokens: int = 8, batch_size: int = 64, progress=None,
             fmt: PromptFormat = PLAIN) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Scores (``{mode: {"em", "f1", "n", "ms_per_question"}}``: batched wall time, knowledge
    included) and predictions (``{mode: [answer]}``)."""
    scores, predictions = {}, {}
    for mode in modes:
        start = time.perf_counter()
        predictions[mode] = answer(model, tokenizer, mode, questions, hits, knowledge,
                                   max_new_tokens, batch_size, fmt)
        seconds = time.perf_counter() - start
        scores[mode] = {**score(predictions[mode], golds),
                        "ms_per_question": 1000 * seconds / max(1, len(questions))}
        if progress is not None:
            progress(mode, scores[mode])
    return scores, predictions
