"""Prompt formats, and batched greedy answering (with whatever LoRA is active).

The synthetic world's base model is pretrained on exactly these formats, so the same
functions serve pretraining, evaluation and inference:

    closed book:   "Question: {q} Answer:"
    with passages: "Passage: {p1} Passage: {p2} ... Question: {q} Answer:"

and the target is " {answer}" followed by the end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def passage_context(passages: Sequence[str]) -> str:
    """``"Passage: {p1} Passage: {p2} ... "``: the part of a prompt before the question."""
    return "".join(f"Passage: {p} " for p in passages)


def qa_prompt(question: str, passages: Sequence[str] = ()) -> str:
    return f"{passage_context(passages)}Question: {question} Answer:"


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8,
                     batch_size: int = 64) -> list[str]:
    """Greedy answers for ``prompts`` (left-padded batches), decoded without specials."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        batch = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [a.strip() for a in answers]
