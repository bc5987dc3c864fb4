"""Training examples: a document's training sequences and their collation into a batch.

A training sequence is ``Segments``: consecutive (text, trained) pieces; the loss is on the
tokens of the trained ones (the answer, or every token of a passage). The bank, the
translator's distillation and the world's pretraining all batch them with ``collate``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dyprag.data.augment import AugmentedDoc
from dyprag.engine.prompts import PLAIN, PromptFormat

Segments = list[tuple[str, bool]]
"""One training sequence as consecutive (text, trained) pieces: loss on the trained ones."""


@dataclass(frozen=True)
class Recipe:
    """Which training sequences a document gives (``document_examples``): the first
    ``qa_with_passage`` QA pairs asked with each text (the passage and its rewrites), the last
    ``qa_closed_book`` asked with none (the two overlap when they add up to more than the
    document's pairs), with ``text`` the texts themselves, the loss on the answers or
    (``loss_on: all``) on every token. The bank's: ``bank.bank_recipe``; the translator's:
    ``fit.translator_recipe``."""

    qa_with_passage: int
    qa_closed_book: int
    text: bool
    loss_on: str = "answer"
    spread: bool = False


def document_examples(doc: AugmentedDoc, recipe: Recipe, tokenizer,
                      fmt: PromptFormat = PLAIN) -> list[Segments]:
    """A document's training sequences (PRAG: 2 QA × {passage, rewrite} + 1 closed-book),
    asked in the run's prompt format.

    ``recipe.spread``: the QA asked with a passage differ per text (passage, each rewrite), spread
    evenly over the document's pairs, instead of the first ``qa_with_passage`` asked with
    every text. The world's pairs come attribute by attribute, so the first ones all ask one
    fact: a translator trained on them learns to answer that fact whatever a passage is asked
    (bench/RESULTS.md, issue 23)."""
    texts = [doc.text, *doc.rewrites]
    k = min(recipe.qa_with_passage, len(doc.qa))
    if recipe.spread and k:
        slots = k * len(texts)  # (text, question) pairs, each a different QA where there are enough
        picks = [doc.qa[(m * len(doc.qa)) // slots] for m in range(slots)]
        asked = [(t, picks[i * k + j]) for i, t in enumerate(texts) for j in range(k)]
    else:
        asked = [(t, qa) for qa in doc.qa[:k] for t in texts]
    closed = doc.qa[len(doc.qa) - min(recipe.qa_closed_book, len(doc.qa)):]
    examples: list[Segments] = []
    if recipe.text:
        examples += [[(t + (tokenizer.eos_token or ""), True)] for t in texts]
    examples += [[(fmt.prompt(qa["question"], [t]), False),
                  (fmt.target(qa["answer"], tokenizer), True)] for t, qa in asked]
    examples += [[(fmt.prompt(qa["question"]), False),
                  (fmt.target(qa["answer"], tokenizer), True)] for qa in closed]
    if recipe.loss_on == "all":
        examples = [[(text, True) for text, _ in ex] for ex in examples]
    return examples


Tokens = tuple[list[int], list[int]]
"""One tokenized training sequence: ``(ids, labels)``, labels -100 outside trained segments."""


def tokenize(tokenizer, examples: Sequence[Segments]) -> list[Tokens]:
    """Every example's ids and labels (the segments' texts tokenized in one batched call)."""
    texts = [text for segments in examples for text, _ in segments]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for segments in examples:
        row, label = [], []
        for _, trained in segments:
            piece = next(ids)
            row += piece
            label += piece if trained else [-100] * len(piece)
        out.append((row, label))
    return out


def pad(rows: Sequence[Tokens], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids (to the longest row); labels -100 on padding. The mask comes from
    lengths, so a pad id equal to eos is still seen."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r, _ in rows])  # (N, T)
    lab = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def collate(tokenizer, examples: Sequence[Segments]) -> dict[str, torch.Tensor]:
    """``examples`` tokenized and right-padded: ``input_ids``, ``attention_mask``, ``labels``."""
    return pad(tokenize(tokenizer, examples), tokenizer.pad_token_id)


def length_sorted(items: list, lengths: Sequence[int], batch_size: int, window: int,
                  rng: random.Random, spread: float = 0.0) -> list:
    """``items`` reordered so that each batch of ``batch_size`` holds similar lengths: sorted
    by length within consecutive windows of ``window`` batches (an order, such as a curriculum,
    moves on window by window), the batches of each window in a random order. Padding is
    what a batch of mixed lengths wastes (39% of the positions in the world's pretraining).

    ``spread``: sort by ``length · (1 + spread · u)``, ``u`` uniform in [-½, ½), so that items of
    nearly equal lengths still mix (exactly equal lengths are often one template: a batch of
    them all asks the same question)."""
    out, size = [], window * batch_size
    keys = [n * (1 + spread * (rng.random() - 0.5)) for n in lengths] if spread else lengths
    for start in range(0, len(items), size):
        rows = sorted(range(start, min(start + size, len(items))), key=keys.__getitem__)
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        rng.shuffle(batches)
        out += [items[i] for batch in batches for i in batch]
    return out
