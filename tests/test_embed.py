"""The sentence-transformers embedder: unit float32 rows, and embed_corpus's memmap."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_corpus import PASSAGES, minilm

from dyprag.data.corpus import write_corpus_jsonl
from dyprag.retrieval.embed import DEFAULT_MODEL, Embedder


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return minilm()


def test_default_model(embedder):
    assert embedder.name == DEFAULT_MODEL
    assert embedder.dim == 384


def test_encode_unit_float32_deterministic(embedder):
    texts = [p.embedding_text() for p in PASSAGES]
    emb = embedder.encode(texts)
    assert emb.shape == (len(texts), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(embedder.encode(texts), emb)
    # a row does not depend on which other texts share its batch (up to padding round-off)
    np.testing.assert_allclose(embedder.encode(texts[2:3])[0], emb[2], atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of strings"):
        embedder.encode("one string")


def test_embed_corpus_matches_encode(embedder, tmp_path):
    corpus = write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")
    out = tmp_path / "emb" / "embeddings.npy"
    emb = embedder.embed_corpus(corpus, out, show_progress=False)
    assert isinstance(emb, np.memmap) and emb.shape == (len(PASSAGES), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, embedder.encode([p.embedding_text() for p in PASSAGES]), atol=1e-5)
    np.testing.assert_array_equal(np.load(out), emb)
    assert sorted(p.name for p in out.parent.iterdir()) == ["embeddings.npy"]  # temporary renamed away


def test_llm_embedder_takes_the_last_real_tokens_state_and_fills_a_corpus_file(tmp_path):
    import torch
    from conftest import tiny_model

    from dyprag.data.corpus import Passage, write_corpus_jsonl
    from dyprag.retrieval.embed import LLMEmbedder
    from dyprag.training.world_base import build_tokenizer

    texts = ["Idris Kael was born in Velmora .", "Velmora", "Tamsin Reole works for Halvex ."]
    tokenizer = build_tokenizer(texts)
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    embedder = LLMEmbedder(model, tokenizer, "tiny", batch_size=3)
    batched = embedder.encode(texts)
    assert batched.shape == (3, model.config.hidden_size) and embedder.name == "llm:tiny"
    for i, text in enumerate(texts):  # padding does not change a row
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            alone = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(batched[i], alone.numpy(), rtol=1e-4, atol=1e-5)
    corpus = tmp_path / "corpus.jsonl"
    write_corpus_jsonl([Passage(f"d{i}", "", t) for i, t in enumerate(texts)], corpus)
    stored = embedder.embed_corpus(corpus, tmp_path / "llm.npy", show_progress=False)
    np.testing.assert_allclose(stored, batched, rtol=1e-5, atol=1e-6)


def test_token_mean_embedder_is_the_mean_input_embedding_of_each_passage():
    import torch
    from conftest import tiny_model

    from dyprag.retrieval.embed import TokenMeanEmbedder
    from dyprag.training.world_base import build_tokenizer

    texts = ["Idris Kael was born in Velmora .", "Velmora"]
    tokenizer = build_tokenizer(texts)
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    embedder = TokenMeanEmbedder(model, tokenizer, "tiny")
    got = embedder.encode(texts)
    assert embedder.name == "tokens:tiny" and got.shape == (2, model.config.hidden_size)
    for row, text in zip(got, texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = model.get_input_embeddings().weight[torch.tensor(ids)].mean(0)
        np.testing.assert_allclose(row, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
