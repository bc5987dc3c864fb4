"""Answer questions in every RAG mode and score them (train.py's eval stage; bench; infer).

Modes, each with the top ``k`` retrieved documents of the question (``"mode@k"``):

- ``vanilla``: closed book;
- ``rag@k``: the passages in the prompt;
- ``prag@k``: no passage; the sum of the documents' bank LoRAs injected (PRAG);
- ``dyprag@k``: no passage; the sum of the translator's LoRAs of the documents (DyPRAG);
- ``prag+rag@k``, ``dyprag+rag@k``: both.

Each question gets its own LoRA (per-sample injection), so a whole batch of questions is
answered in one ``generate``. Combining k documents is a weighted sum of their deltas (rank
concatenation; ``KnowledgeConfig``: weight 1 each, or a softmax of the retrieval scores),
never DyPRAG's averaging of A and B.

``document_dependence`` measures whether the translator reads its input: DyPRAG with another
question's document in place of the retrieved one, and how alike the generated deltas are.
``evaluate_questions`` is the one evaluation that train.py's eval stage and evaluate.py run:
every mode's scores and answers, F1 by fact, and the document dependence.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dyprag.config import EvalConfig, KnowledgeConfig, parse_mode
from dyprag.data.qa import QAExample
from dyprag.engine.generate import generate_answers
from dyprag.engine.lora import LoRA, delta_cosines, sum_groups
from dyprag.engine.prompts import PLAIN, PromptFormat
from dyprag.metrics import f1_by_fact, score
from dyprag.retrieval.embed import EmbeddingTable
from dyprag.training.bank import BankSet, LoRABank
from dyprag.training.translator import ParameterTranslator

Hits = Sequence[Sequence[str]]
"""Per question, the retrieved document ids, best first."""
Scores = Sequence[Sequence[float]]
"""Per question, the retrieval scores of its ``Hits``."""


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
    config: KnowledgeConfig = field(default_factory=KnowledgeConfig)  # how LoRAs are applied


def document_weights(config: KnowledgeConfig, k: int, n: int,
                     scores: Scores | None = None) -> torch.Tensor | None:
    """Each of ``n`` questions' weights of its top-k documents, ``(n, k)`` (``None``: weight
    1 each). ``softmax`` weights sum to ``config.scale``."""
    if config.combine == "sum" or k == 1:
        return None if config.scale == 1 else torch.full((n, k), config.scale)
    if scores is None or len(scores) != n:
        raise ValueError("knowledge.combine=softmax weighs the documents by their retrieval "
                         "scores: pass each question's scores")
    s = torch.tensor([list(x[:k]) for x in scores], dtype=torch.float64)
    return (torch.softmax(s / config.temperature, -1) * config.scale).float()


@torch.no_grad()
def translated(translator: ParameterTranslator, embeddings: EmbeddingTable, hits: Hits,
               k: int, weights: torch.Tensor | None = None) -> LoRA:
    """DyPRAG's knowledge per question: the (``weights``-weighted) sum of the generated
    deltas of its top-k documents, batched over questions: ``(N, k·r, in)``, ``(N, out, k·r)``."""
    device = next(translator.parameters()).device
    flat = [d for h in hits for d in h[:k]]  # question-major: q0d0, q0d1, ..., q1d0, ...
    assert len(flat) == k * len(hits), f"every question needs {k} documents"
    return sum_groups(translator(embeddings.get(flat).to(device)).detach(), k, weights)


def mode_lora(mode: str, hits: Hits, knowledge: Knowledge,
              scores: Scores | None = None) -> LoRA | None:
    name, k = parse_mode(mode)
    if not name.startswith(("prag", "dyprag")):
        return None
    weights = document_weights(knowledge.config, k, len(hits), scores)
    if name.startswith("prag"):
        if knowledge.bank is None:
            raise ValueError(f"mode {mode} needs a LoRA bank")
        return knowledge.bank.combined([list(h[:k]) for h in hits], knowledge.missing_ok,
                                       weights)
    if knowledge.translator is None or knowledge.embeddings is None:
        raise ValueError(f"mode {mode} needs a translator and document embeddings")
    return translated(knowledge.translator, knowledge.embeddings, hits, k, weights)


def mode_prompts(mode: str, questions: Sequence[str], hits: Hits,
                 passages: Mapping[str, str], fmt: PromptFormat = PLAIN) -> list[str]:
    name, k = parse_mode(mode)
    in_prompt = k if name in ("rag", "prag+rag", "dyprag+rag") else 0
    return [fmt.prompt(q, [passages[d] for d in h[:in_prompt]]) for q, h in zip(questions, hits)]


def answer(model, tokenizer, mode: str, questions: Sequence[str], hits: Hits,
           knowledge: Knowledge, max_new_tokens: int = EvalConfig.max_new_tokens,
           batch_size: int = EvalConfig.batch_size,
           fmt: PromptFormat = PLAIN, scores: Scores | None = None) -> list[str]:
    """Greedy answers to ``questions`` in ``mode``; LoRAs are built one batch at a time
    (a real model's per-question LoRAs are large). ``scores``: the retrieval scores of
    ``hits`` (needed by ``knowledge.config.combine == "softmax"``)."""
    if len(hits) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(hits)} retrieval results")
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        q, h = questions[start:start + batch_size], hits[start:start + batch_size]
        lora = mode_lora(mode, h, knowledge,
                         None if scores is None else scores[start:start + batch_size])
        if lora is not None:
            lora = lora.to(next(model.parameters()).device, next(model.parameters()).dtype)
        answers += generate_answers(model, tokenizer,
                                    mode_prompts(mode, q, h, knowledge.passages, fmt),
                                    max_new_tokens, batch_size, lora=lora, fmt=fmt,
                                    last_only=knowledge.config.inject == "answer")
    return answers


def evaluate(model, tokenizer, modes: Sequence[str], questions: Sequence[str],
             golds: Sequence[Sequence[str]], hits: Hits, knowledge: Knowledge,
             max_new_tokens: int = EvalConfig.max_new_tokens,
             batch_size: int = EvalConfig.batch_size, progress=None,
             fmt: PromptFormat = PLAIN, scores: Scores | None = None
             ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Scores (``{mode: {"em", "f1", "acc", "n", "ms_per_question"}}``: batched wall time, knowledge
    included) and predictions (``{mode: [answer]}``)."""
    results, predictions = {}, {}
    for mode in modes:
        start = time.perf_counter()
        predictions[mode] = answer(model, tokenizer, mode, questions, hits, knowledge,
                                   max_new_tokens, batch_size, fmt, scores)
        seconds = time.perf_counter() - start
        results[mode] = {**score(predictions[mode], golds),
                         "ms_per_question": 1000 * seconds / max(1, len(questions))}
        if progress is not None:
            progress(mode, results[mode])
    return results, predictions


def irrelevant_hits(hits: Hits, seed: int = 0) -> list[list[str]]:
    """Per question, one document retrieved first for another question and not among its own
    retrieved ones (drawn from ``seed``): a document about something else."""
    pool = sorted({h[0] for h in hits})
    rng = random.Random(seed)
    out = []
    for h in hits:
        others = [d for d in pool if d not in h]
        if not others:
            raise ValueError("an irrelevant document needs questions about at least two "
                             "documents")
        out.append([rng.choice(others)])
    return out


MAX_COSINE_DOCS = 256  # documents whose pairwise ΔW cosines are averaged


def document_dependence(model, tokenizer, questions: Sequence[str],
                        golds: Sequence[Sequence[str]], hits: Hits, knowledge: Knowledge,
                        max_new_tokens: int = EvalConfig.max_new_tokens,
                        batch_size: int = EvalConfig.batch_size,
                        fmt: PromptFormat = PLAIN, seed: int = 0) -> dict[str, float]:
    """Does the translator read its document? ``dyprag_irrelevant``: F1 of ``dyprag@1`` with
    another question's document (``irrelevant_hits``; near the closed book when it does);
    ``delta_cosine``: the mean pairwise cosine similarity of the generated ΔW of the questions'
    top documents (the first ``MAX_COSINE_DOCS``; near 1 when it ignores its input).
    Empty when the questions are not about at least two documents (nothing to swap in)."""
    try:
        wrong = irrelevant_hits(hits, seed)
    except ValueError:
        return {}
    predictions = answer(model, tokenizer, "dyprag@1", questions, wrong, knowledge,
                         max_new_tokens, batch_size, fmt)
    docs = sorted({h[0] for h in hits})[:MAX_COSINE_DOCS]
    cosines = delta_cosines(translated(knowledge.translator, knowledge.embeddings,
                                       [[d] for d in docs], 1))
    n = len(docs)
    off_diagonal = (cosines.sum() - cosines.diagonal().sum()) / max(1, n * (n - 1))
    return {"dyprag_irrelevant": score(predictions, golds)["f1"],
            "delta_cosine": float(off_diagonal)}


@dataclass
class Evaluation:
    """What ``evaluate_questions`` measured on a set of questions."""

    grid: dict[str, dict]                  # mode → em, f1, acc, n, ms_per_question
    predictions: dict[str, list[str]]      # mode → the answer to each question
    by_fact: dict[str, dict[str, float]]   # mode → fact → F1 ({}: the questions name none)
    dependence: dict[str, float]           # document_dependence ({}: no DyPRAG mode)


def reads_translator(modes: Sequence[str]) -> bool:
    """Whether any of ``modes`` is a DyPRAG mode (the translator's LoRAs, its embeddings)."""
    return any(parse_mode(m)[0].startswith("dyprag") for m in modes)


def evaluate_questions(model, tokenizer, modes: Sequence[str], examples: Sequence[QAExample],
                       hits: Hits, knowledge: Knowledge, ev: EvalConfig, fmt: PromptFormat,
                       seed: int, scores: Scores | None = None, progress=None) -> Evaluation:
    """Every mode of ``modes`` on ``examples`` (``evaluate``), their F1 by fact and, with a
    DyPRAG mode, the translator's ``document_dependence``. ``progress(step, scores)`` follows
    each mode, then the document dependence."""
    questions = [qa.question for qa in examples]
    golds = [qa.answers for qa in examples]
    grid, predictions = evaluate(model, tokenizer, modes, questions, golds, hits, knowledge,
                                 ev.max_new_tokens, ev.batch_size, progress, fmt, scores)
    dependence = {}
    if reads_translator(modes):
        dependence = document_dependence(model, tokenizer, questions, golds, hits, knowledge,
                                         ev.max_new_tokens, ev.batch_size, fmt, seed)
        if progress is not None:
            progress("document dependence", dependence)
    return Evaluation(grid, predictions, f1_by_fact(predictions, golds,
                                                    [qa.meta for qa in examples]), dependence)
