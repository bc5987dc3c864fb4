"""dyprag.answering.answer: per-mode prompts and knowledge, DyPRAG's sum of generated deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch.testing import assert_close

from dyprag.answering.answer import (
    EmbeddingTable,
    Knowledge,
    answer,
    document_dependence,
    document_weights,
    evaluate,
    irrelevant_hits,
    mode_lora,
    mode_prompts,
    translated,
)
from dyprag.config import KnowledgeConfig, parse_mode
from dyprag.engine.generate import generate_answers
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, combine
from dyprag.engine.prompts import qa_prompt
from dyprag.training.translator import ParameterTranslator
from dyprag.training.world_base import build_tokenizer

PASSAGES = {"a": "Idris was born in Velmora .", "b": "Tamsin works for Halvex .",
            "c": "Orrin studied at Aldergate ."}
HITS = [["a", "b"], ["c", "a"]]
QUESTIONS = ["Where was Idris born?", "Where did Orrin study?"]


def setup():
    tokenizer = build_tokenizer([*PASSAGES.values(), *QUESTIONS, "Passage: Question: Answer:"])
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       head_scale=8.0)
    torch.manual_seed(0)
    translator = ParameterTranslator(inject_lora(model).shapes, embed_dim=6, rank=2, alpha=4.0,
                                     architecture="per_layer")
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
    got = answer(model, tokenizer, "dyprag@1", QUESTIONS, HITS, knowledge, batch_size=2)

    def alone(question: str, doc: str) -> str:
        return generate_answers(model, tokenizer, [qa_prompt(question)],
                                lora=translator(table.get([doc])).detach()[0])[0]

    assert got == [alone(q, docs[0]) for q, docs in zip(QUESTIONS, HITS)]
    # the documents' LoRAs answer differently, so a batch that swapped them would show
    assert got != [alone(q, docs[0]) for q, docs in zip(QUESTIONS, HITS[::-1])]


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


def test_softmax_weights_sum_to_one_and_follow_the_scores():
    config = KnowledgeConfig(combine="softmax", temperature=0.1)
    w = document_weights(config, 3, 2, [[0.9, 0.5, 0.1], [0.4, 0.4, 0.4]])
    assert_close(w.sum(-1), torch.ones(2))
    assert w[0, 0] > 0.95 and w[0, 1] > w[0, 2]
    assert_close(w[1], torch.full((3,), 1 / 3))
    scaled = document_weights(KnowledgeConfig(combine="softmax", scale=0.5), 3, 1, [[1, 0, 0]])
    assert_close(scaled.sum(), torch.tensor(0.5))
    assert document_weights(KnowledgeConfig(combine="sum"), 3, 2) is None  # the plain sum
    with pytest.raises(ValueError, match="retrieval scores"):
        document_weights(config, 3, 2)


def test_softmax_combination_weighs_each_documents_delta():
    _, _, translator, table = setup()
    knowledge = Knowledge(PASSAGES, translator=translator, embeddings=table,
                          config=KnowledgeConfig(combine="softmax", temperature=0.5))
    scores = [[0.8, 0.3], [0.6, 0.1]]
    lora = mode_lora("dyprag@2", HITS, knowledge, scores)
    for q, docs in enumerate(HITS):
        w = torch.softmax(torch.tensor(scores[q]) / 0.5, 0)
        expected = combine([translator(table.get([d])) for d in docs], w)
        for key in lora.keys:
            assert_close(lora[q].delta(key), expected[0].delta(key), rtol=1e-4, atol=1e-4)


def test_answer_injection_and_scale_reach_the_generation():
    """inject=answer answers as generate_answers with last_only, and the scale multiplies
    each delta (a small one: this translator's deltas are large enough to saturate)."""
    model, tokenizer, translator, table = setup()

    def knowledge(**config):
        return Knowledge(PASSAGES, translator=translator, embeddings=table,
                         config=KnowledgeConfig(scale=0.003, **config))

    got = answer(model, tokenizer, "dyprag@1", QUESTIONS, HITS, knowledge(inject="answer"))
    lora = translated(translator, table, HITS, 1)
    lora = LoRA(lora.A, {k: 0.003 * b for k, b in lora.B.items()}, lora.alpha)
    prompts = [qa_prompt(q) for q in QUESTIONS]
    assert got == generate_answers(model, tokenizer, prompts, lora=lora, last_only=True)
    assert got != answer(model, tokenizer, "dyprag@1", QUESTIONS, HITS, knowledge())
    assert got != answer(model, tokenizer, "vanilla", QUESTIONS, HITS, knowledge())


def test_irrelevant_hits_are_other_questions_documents():
    hits = [["a", "b"], ["b", "c"], ["c", "a"], ["a", "c"]]
    wrong = irrelevant_hits(hits, seed=3)
    assert [len(w) for w in wrong] == [1] * 4
    for h, (w,) in zip(hits, wrong):
        assert w not in h and w in {"a", "b", "c"}
    assert wrong == irrelevant_hits(hits, seed=3)
    with pytest.raises(ValueError, match="two"):
        irrelevant_hits([["a"], ["a"]])


def test_document_dependence_reports_irrelevant_f1_and_delta_cosine():
    model, tokenizer, translator, table = setup()
    knowledge = Knowledge(PASSAGES, translator=translator, embeddings=table)
    hits = [["a"], ["c"], ["b"]]
    questions = [*QUESTIONS, "Who employs Tamsin?"]
    golds = [["Velmora"], ["Aldergate"], ["Halvex"]]
    got = document_dependence(model, tokenizer, questions, golds, hits, knowledge)
    assert set(got) == {"dyprag_irrelevant", "delta_cosine"}
    assert 0 <= got["dyprag_irrelevant"] <= 1
    assert -1 <= got["delta_cosine"] < 0.99  # random translator weights: distinct deltas
    with torch.no_grad():  # a translator that ignores its input: every ΔW the same
        for name, p in translator.named_parameters():
            if p.dim() > 1 and p.shape[-1] == table.get(["a"]).shape[-1]:
                p.zero_()
    same = document_dependence(model, tokenizer, questions, golds, hits, knowledge)
    assert same["delta_cosine"] > 0.999


def test_document_dependence_is_empty_for_questions_about_one_document():
    model, tokenizer, translator, table = setup()
    knowledge = Knowledge(PASSAGES, translator=translator, embeddings=table)
    assert document_dependence(model, tokenizer, QUESTIONS, [["Velmora"], ["Velmora"]],
                               [["a"], ["a"]], knowledge) == {}


def test_evaluate_scores_every_mode_with_em_f1_and_acc(monkeypatch):
    import dyprag.answering.answer

    said = {"vanilla": ["He was born in Velmora.", "Aldergate"],
            "rag@1": ["Velmora", "Orrin studied at Halvex."]}
    monkeypatch.setattr(dyprag.answering.answer, "answer", lambda model, tokenizer, mode, *args: said[mode])
    golds = [["Velmora"], ["Aldergate", "Aldergate College"]]
    shown = {}
    grid, predictions = evaluate(None, None, ["vanilla", "rag@1"], QUESTIONS, golds, HITS,
                                 Knowledge(PASSAGES), progress=lambda m, s: shown.update({m: s}))
    assert predictions == said and shown == grid
    assert {k: grid["vanilla"][k] for k in ("em", "acc", "n")} == {"em": 0.5, "acc": 1.0, "n": 2}
    assert {k: grid["rag@1"][k] for k in ("em", "acc", "n")} == {"em": 0.5, "acc": 0.5, "n": 2}
    assert grid["vanilla"]["f1"] == pytest.approx((1 / 3 + 1) / 2)  # P=1/5 R=1, then exact
    assert all(set(s) == {"em", "f1", "acc", "n", "ms_per_question"} for s in grid.values())
