"""dyprag.engine.prompts: the plain and chat prompt formats, and reading answers back."""

from __future__ import annotations

import pytest

from dyprag.config import PROMPT_FORMATS
from dyprag.engine.prompts import PLAIN, PRAG_INSTRUCTION, PromptFormat, prompt_format, qa_prompt
from dyprag.training.world_base import build_tokenizer

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def tokenizer():
    return build_tokenizer(["Where was Idris Kael born? Velmora"])


def test_plain_is_the_world_format(tokenizer):
    assert PLAIN.prompt("Where?", ["P1", "P2"]) == qa_prompt("Where?", ["P1", "P2"]) == \
        "Passage: P1 Passage: P2 Question: Where? Answer:"
    assert PLAIN.target("Velmora", tokenizer) == f" Velmora{tokenizer.eos_token}"
    assert PLAIN.extract("  Velmora ") == "Velmora"


def test_chat_puts_instruction_passages_and_question_in_the_template(tokenizer):
    tokenizer.chat_template = TEMPLATE
    chat = PromptFormat("chat", tokenizer)
    closed = chat.prompt("Where was Idris Kael born?")
    assert closed.startswith("<|system|>Answer the question with a short phrase only")
    assert closed.endswith("<|user|>Question: Where was Idris Kael born?<|end|><|assistant|>")
    assert PRAG_INSTRUCTION not in closed
    both = chat.prompt("Where?", ["Idris was born in Velmora.", "Tamsin works for Halvex."])
    assert (f"<|user|>{PRAG_INSTRUCTION}\n\nPassage 1: Idris was born in Velmora.\n"
            "Passage 2: Tamsin works for Halvex.\n\nQuestion: Where?<|end|>") in both
    assert chat.target("Velmora", tokenizer) == f"Velmora{tokenizer.eos_token}"


@pytest.mark.parametrize("generation, answer", [
    ("Velmora", "Velmora"), ("Velmora.\nQuestion: next", "Velmora"),
    ("The answer is Velmora.", "Velmora"), ("Idris Kael was born in Velmora.", "Idris Kael was born in Velmora")])
def test_chat_answers_are_extracted(tokenizer, generation, answer):
    tokenizer.chat_template = TEMPLATE
    assert PromptFormat("chat", tokenizer).extract(generation) == answer


def test_auto_is_chat_exactly_when_the_tokenizer_has_a_template(tokenizer):
    assert prompt_format(tokenizer).kind == "plain"
    assert prompt_format(tokenizer, "plain").kind == "plain"
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        prompt_format(tokenizer, "chat")
    tokenizer.chat_template = TEMPLATE
    assert prompt_format(tokenizer).kind == "chat"
    assert prompt_format(tokenizer, "plain").kind == "plain"
    with pytest.raises(ValueError, match="must be one of"):
        PromptFormat("json", tokenizer)


def test_every_format_the_config_offers_asks_in_its_own_way(tokenizer):
    tokenizer.chat_template = TEMPLATE
    prompts = {kind: PromptFormat(kind, tokenizer).prompt("Where?", ["P1"]) for kind in PROMPT_FORMATS}
    assert len(set(prompts.values())) == len(PROMPT_FORMATS) >= 2, prompts
