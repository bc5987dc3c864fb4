"""dyprag.answer: per-mode prompts and knowledge, DyPRAG's sum of generated deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch.testing import assert_close

from dyprag.answer import EmbeddingTable, Knowledge, answer, mode_prompts, translated
from dyprag.config import parse_mode
from dyprag.generate import generate_answers
from dyprag.inject import inject_lora
from dyprag.lora import combine
from dyprag.prompts import qa_prompt
from dyprag.translator import ParameterTranslator
from dyprag.world_base import build_tokenizer

PASSAGES = {"a": "Idris was born in Velmora .", "b": "Tamsin works for Halvex .",
            "c": "Orrin studied at Aldergate ."}
HITS = [["a", "b"], ["c", "a"]]
QUESTIONS = ["Where was Idris born?", "Where did Orrin study?"]


def setup():
    tokenizer = build_tokenizer([*PASSAGES.values(), *QUESTIONS, "Passage: Question: Answer:"])
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       head_scale=8.0)
    torch.manual_seed(0)
    translator = ParameterTranslator(inject_lora(model).shapes, embed_dim=6, rank=2, alpha=4.0)
    with torch.no_grad():  # nonzero B: generated deltas that change answers
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    table = EmbeddingTable(list(PASSAGES), np.random.default_rng(0).normal(size=(3, 6)))
    return model, tokenizer, translator, table


def test_modes_parse_and_bad_ones_are_named():
    assert parse_mode("vanilla") == ("vanilla", 0)
    assert parse_mode("dyprag+rag@3") == ("dyprag+rag", 3)
    for bad in ("dyprag", "rag@0", "vanilla@1", "magic@2"):
        with pytest.raises(ValueError, match="mode|vanilla"):
            parse_mode(bad)


def test_only_rag_modes_put_passages_in_the_prompt():
    assert mode_prompts("vanilla", QUESTIONS, HITS, PASSAGES)[0] == qa_prompt(QUESTIONS[0])
    assert mode_prompts("dyprag@2", QUESTIONS, HITS, PASSAGES)[0] == qa_prompt(QUESTIONS[0])
    expected = qa_prompt(QUESTIONS[1], [PASSAGES["c"], PASSAGES["a"]])
    assert mode_prompts("rag@2", QUESTIONS, HITS, PASSAGES)[1] == expected
    assert mode_prompts("dyprag+rag@2", QUESTIONS, HITS, PASSAGES)[1] == expected
    assert mode_prompts("rag@1", QUESTIONS, HITS, PASSAGES)[1] == qa_prompt(QUESTIONS[1],
                                                                              [PASSAGES["c"]])


def test_dyprag_knowledge_is_the_sum_of_each_documents_generated_delta():
    _, _, translator, table = setup()
    lora = translated(translator, table, HITS, k=2)
    for q, docs in enumerate(HITS):
        alone = [translator(table.get([d])) for d in docs]
        expected = combine(alone)
        for key in lora.keys:
            assert_close(lora[q].delta(key), expected[0].delta(key), rtol=1e-4, atol=1e-4)


def test_answers_in_dyprag_mode_use_each_questions_own_lora():
    model, tokenizer, translator, table = setup()
    knowledge = Knowledge(PASSAGES, translator=translator, embeddings=table)
    got = answer(model, tokenizer, "dyprag@1", QUESTIONS, HITS, knowledge, batch_size=1)
    for q, docs in enumerate(HITS):
        alone = generate_answers(model, tokenizer, [qa_prompt(QUESTIONS[q])],
                                 lora=translator(table.get(docs[:1])).detach()[0])
        assert got[q] == alone[0]


def test_modes_without_their_knowledge_are_refused():
    model, tokenizer, _, _ = setup()
    with pytest.raises(ValueError, match="bank"):
        answer(model, tokenizer, "prag@1", QUESTIONS, HITS, Knowledge(PASSAGES))
    with pytest.raises(ValueError, match="translator"):
        answer(model, tokenizer, "dyprag@1", QUESTIONS, HITS, Knowledge(PASSAGES))


def test_embedding_table_names_missing_documents():
    _, _, _, table = setup()
    with pytest.raises(KeyError, match="zz"):
        table.get(["a", "zz"])
