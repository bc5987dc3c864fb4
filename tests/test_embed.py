"""The sentence-transformers embedder: unit float32 rows, and embed_corpus's memmap."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_corpus import PASSAGES, minilm

from dyprag.corpus import write_corpus_jsonl
from dyprag.embed import DEFAULT_MODEL, Embedder


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
