"""Prompt formats: how a run asks a question and reads the answer back.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dyprag.config import PROMPT_FORMATS


def passage_context(passages: Sequence[str]) -> str:
    """``"Passage: {p1} Passage: {p2} ... "``: the part of a prompt before the question."""
    return "".join(f"Passage: {p} " for p in passages)


def qa_prompt(question: str, passages: Sequence[str] = ()) -> str:
    return f"{passage_context(passages)}Question: {question} Answer:"


PRAG_INSTRUCTION = ("You should answer the question by referring to the knowledge provided "
                    "below and integrating your own knowledge.")
SHORT_ANSWER = ("Answer the question with a short phrase only: a name, a place, a date or a "
                "number.")


@dataclass(frozen=True)
class PromptFormat:
    """How a run asks questions and reads answers: ``kind`` is one of ``config.PROMPT_FORMATS``; ``chat``
    needs a tokenizer with a chat template."""

    kind: str = "plain"
    tokenizer: Any = None

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {self.kind!r}")
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
    """``choice`` (``auto``, or one of ``PROMPT_FORMATS``) for ``tokenizer``: ``auto`` is ``chat``
    when the tokenizer has a chat template, else ``plain``."""
    if choice == "auto":
        choice = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return PromptFormat(choice, tokenizer)
