"""Prompt formats, and batched greedy answering (with whatever LoRA is active).

One ``PromptFormat`` per run serves every stage that asks a question: bank and translator
training examples, validation, evaluation and ``infer.py``. Two formats:

- ``plain``, the synthetic world's (its base model is pretrained on exactly this)::

      closed book:   "Question: {q} Answer:"
      with passages: "Passage: {p1} Passage: {p2} ... Question: {q} Answer:"

  target `` {answer}`` then end of sequence; the generation is the answer.
- ``chat``, for instruction-tuned models: the tokenizer's chat template around a system
  message asking for a short answer and PRAG's instruction, passages and question::

      system:    Answer the question with a short phrase only: ...
      user:      You should answer the question by referring to the knowledge provided
                 below and integrating your own knowledge.
                 Passage 1: {p1}
                 ...
                 Question: {q}
      assistant: {answer}<end of turn>

  The answer is read from the generation with ``metrics.extract_answer`` (after "The answer
  is" when present, first line, no final period).

Training sequences are ``Segments``: consecutive (text, trained) pieces, batched by ``collate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


FORMATS = ("plain", "chat")  # also dyprag.config.PROMPT_FORMATS (kept torch-free there)
PRAG_INSTRUCTION = ("You should answer the question by referring to the knowledge provided "
                    "below and integrating your own knowledge.")
SHORT_ANSWER = ("Answer the question with a short phrase only: a name, a place, a date or a "
                "number.")


@dataclass(frozen=True)
class PromptFormat:
    """How a run asks questions and reads answers: ``kind`` is one of ``FORMATS``; ``chat``
    needs a tokenizer with a chat template."""

    kind: str = "plain"
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ValueError(f"prompt format must be one of {FORMATS}, got {self.kind!r}")
        if self.kind == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template "
                             "(this one has none: use prompt.format=plain)")

    def prompt(self, question: str, passages: Sequence[str] = ()) -> str:
        """The text the model continues with its answer."""
        if self.kind == "plain":
            return qa_prompt(question, passages)
        knowledge = "".join(f"Passage {i}: {p}\n" for i, p in enumerate(passages, 1))
        user = (f"{PRAG_INSTRUCTION}\n\n{knowledge}\n" if passages else "") + f"Question: {question}"
        return self.tokenizer.apply_chat_template(
            [{"role": "system", "content": SHORT_ANSWER}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)

    def target(self, answer: str, tokenizer) -> str:
        """What the model is trained to write after ``prompt``: the answer, then the end of
        sequence (of the turn, for chat models)."""
        eos = tokenizer.eos_token or ""
        return f" {answer}{eos}" if self.kind == "plain" else f"{answer}{eos}"

    def extract(self, generation: str) -> str:
        """The answer inside a generation (what is scored)."""
        if self.kind == "plain":
            return generation.strip()
        from dyprag.metrics import extract_answer

        return extract_answer(generation)


PLAIN = PromptFormat()


def prompt_format(tokenizer, choice: str = "auto") -> PromptFormat:
    """``choice`` (``auto``, or one of ``FORMATS``) for ``tokenizer``: ``auto`` is ``chat``
    when the tokenizer has a chat template, else ``plain``."""
    if choice == "auto":
        choice = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return PromptFormat(choice, tokenizer)


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
                     batch_size: int = 64, lora: LoRA | None = None,
                     fmt: PromptFormat = PLAIN) -> list[str]:
    """Greedy answers for ``prompts`` (left-padded batches), decoded without specials and
    read with ``fmt.extract``.

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
        _check_context(model, batch["attention_mask"].sum(1), max_new_tokens, start)
        active = lora if lora is None or lora.batch_size is None else lora[start:start + batch_size]
        with injection.use(active) if injection else contextlib.nullcontext():
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
