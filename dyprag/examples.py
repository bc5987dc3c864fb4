"""Training examples: a document's training sequences and their collation into a batch.

A training sequence is ``Segments``: consecutive (text, trained) pieces; the loss is on the
tokens of the trained ones (the answer, or every token of a passage). The bank, the
translator's distillation and the world's pretraining all batch them with ``collate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dyprag.augment import AugmentedDoc
from dyprag.config import BankConfig
from dyprag.prompts import PLAIN, PromptFormat

Segments = list[tuple[str, bool]]
"""One training sequence as consecutive (text, trained) pieces: loss on the trained ones."""


def document_examples(doc: AugmentedDoc, config: BankConfig, tokenizer,
                      fmt: PromptFormat = PLAIN) -> list[Segments]:
    """A document's training sequences (PRAG: 2 QA × {passage, rewrite} + 1 closed-book),
    asked in the run's prompt format."""
    texts = [doc.text, *doc.rewrites]
    with_passage = doc.qa[:config.qa_with_passage]
    closed = doc.qa[len(doc.qa) - min(config.qa_closed_book, len(doc.qa)):]
    examples: list[Segments] = []
    if config.text:
        examples += [[(t + (tokenizer.eos_token or ""), True)] for t in texts]
    for qa in with_passage:
        examples += [[(fmt.prompt(qa["question"], [t]), False),
                      (fmt.target(qa["answer"], tokenizer), True)] for t in texts]
    examples += [[(fmt.prompt(qa["question"]), False),
                  (fmt.target(qa["answer"], tokenizer), True)] for qa in closed]
    if config.loss_on == "all":
        examples = [[(text, True) for text, _ in ex] for ex in examples]
    return examples


def collate(tokenizer, examples: Sequence[Segments]) -> dict[str, torch.Tensor]:
    """Right-padded ids (to the longest example); labels are -100 outside trained segments
    and on padding. The mask comes from lengths, so a pad id equal to eos is still seen."""
    rows, labels = [], []
    for segments in examples:
        row, label = [], []
        for text, trained in segments:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            row += ids
            label += ids if trained else [-100] * len(ids)
        rows.append(row)
        labels.append(label)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (N, T)
    lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}
