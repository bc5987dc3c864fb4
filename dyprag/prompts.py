"""Prompt formats, and batched greedy answering (with whatever LoRA is active).

The synthetic world's base model is pretrained on exactly these formats, so the same
functions serve pretraining, evaluation and inference:

    closed book:   "Question: {q} Answer:"
    with passages: "Passage: {p1} Passage: {p2} ... Question: {q} Answer:"

and the target is " {answer}" followed by the end-of-sequence token. Training sequences are
``Segments``: consecutive (text, trained) pieces, batched by ``collate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from dyprag.inject import inject_lora
from dyprag.lora import LoRA

Segments = list[tuple[str, bool]]
"""One training sequence as consecutive (text, trained) pieces: loss on the trained ones."""


def passage_context(passages: Sequence[str]) -> str:
    """``"Passage: {p1} Passage: {p2} ... "``: the part of a prompt before the question."""
    return "".join(f"Passage: {p} " for p in passages)


def qa_prompt(question: str, passages: Sequence[str] = ()) -> str:
    return f"{passage_context(passages)}Question: {question} Answer:"


def answer_target(answer: str, tokenizer) -> str:
    """What the model is trained to write after a prompt: `` {answer}`` then end of sequence."""
    return f" {answer}{tokenizer.eos_token or ''}"


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


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                     batch_size: int = 64, lora: LoRA | None = None) -> list[str]:
    """Greedy answers for ``prompts`` (left-padded batches), decoded without specials.

    ``lora``: injected while generating; one LoRA for all prompts, or a batched LoRA with
    one row per prompt (each prompt answered with its own knowledge).
    """
    device = next(model.parameters()).device
    if lora is not None and lora.batch_size not in (None, len(prompts)):
        raise ValueError(f"{len(prompts)} prompts but a batch of {lora.batch_size} LoRAs")
    injection = inject_lora(model) if lora is not None else None
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        active = lora if lora is None or lora.batch_size is None else lora[start:start + batch_size]
        with injection.use(active) if injection else contextlib.nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [a.strip() for a in answers]
