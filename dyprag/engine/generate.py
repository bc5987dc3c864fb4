"""Batched greedy answering, with whatever LoRA is injected (one for all prompts, or one per
prompt)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from dyprag.config import EvalConfig
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.engine.prompts import PLAIN, PromptFormat


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str],
                     max_new_tokens: int = EvalConfig.max_new_tokens,
                     batch_size: int = EvalConfig.batch_size, lora: LoRA | None = None,
                     fmt: PromptFormat = PLAIN, last_only: bool = False) -> list[str]:
    """Greedy answers for ``prompts`` (left-padded batches), decoded without specials and
    read with ``fmt.extract``.

    ``lora``: injected while generating; one LoRA for all prompts, or a batched LoRA with
    one row per prompt (each prompt answered with its own knowledge). ``last_only``: the
    prompt is read by the base model and the LoRA acts only where the answer is produced
    (``LoRAInjection.use``).
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
        _check_context(model, batch["attention_mask"].sum(1), max_new_tokens, start)
        active = lora if lora is None or lora.batch_size is None else lora[start:start + batch_size]
        with injection.use(active, last_only) if injection else contextlib.nullcontext():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, new tokens)
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [fmt.extract(a) for a in answers]


def _check_context(model, lengths, max_new_tokens: int, offset: int = 0) -> None:
    """Refuse prompts that with their answer would not fit the model's context (past it,
    positions are out of range and answers are garbage, with only a warning)."""
    context = getattr(model.config, "max_position_embeddings", None)
    longest = int(lengths.argmax())
    if context and int(lengths[longest]) + max_new_tokens > context:
        raise ValueError(f"prompt {offset + longest + 1} is {int(lengths[longest])} tokens; with "
                         f"{max_new_tokens} new tokens it exceeds the model's context of {context} "
                         "tokens (put fewer passages in the prompt: a smaller k)")
