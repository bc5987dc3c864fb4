"""BM25 through bm25s (search, save/load, origin check) and reciprocal rank fusion."""

from __future__ import annotations

import numpy as np
import pytest
from retrieval_corpus import BM25_QUESTIONS, PASSAGES

from dyprag.data.corpus import corpus_fingerprint, write_corpus_jsonl
from dyprag.retrieval.sparse import BM25Index, reciprocal_rank_fusion


@pytest.fixture
def corpus(tmp_path):
    return write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")


def test_bm25_finds_the_passage(corpus):
    index = BM25Index.build(corpus)
    assert index.meta["corpus_fingerprint"] == corpus_fingerprint(corpus) and len(index) == len(PASSAGES)
    scores, ids = index.search(list(BM25_QUESTIONS), k=3)
    assert scores.shape == (len(BM25_QUESTIONS), 3) and scores.dtype == np.float32
    assert [row[0] for row in ids] == list(BM25_QUESTIONS.values())
    for row_scores, row_ids in zip(scores, ids):  # best first; -inf after the last hit
        assert (np.diff(row_scores[:len(row_ids)]) <= 0).all() and np.isneginf(row_scores[len(row_ids):]).all()


def test_no_shared_term_means_no_hit():
    index = BM25Index.build(PASSAGES)  # an iterable of passages works too
    scores, ids = index.search(["zzz qqq", "the of and"], k=2)  # unknown words; only stopwords
    assert ids == [[], []] and np.isneginf(scores).all()


def test_save_load_round_trip(corpus, tmp_path):
    index = BM25Index.build(corpus)
    questions = list(BM25_QUESTIONS)
    before = index.search(questions, k=4)
    index.save(tmp_path / "bm25")
    fingerprint = corpus_fingerprint(corpus)
    loaded = BM25Index.load(tmp_path / "bm25", corpus_fingerprint=fingerprint)
    after = loaded.search(questions, k=4)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1] and loaded.ids == index.ids
    with pytest.raises(ValueError, match="built from corpus .* not 'other'"):
        BM25Index.load(tmp_path / "bm25", corpus_fingerprint="other")


def test_rrf_order():
    dense = (np.array([[0.9, 0.8, 0.7]]), [["a", "b", "c"]])
    sparse = (np.array([[12.0, 11.0, 10.0]]), [["b", "d", "a"]])
    scores, ids = reciprocal_rank_fusion([dense, sparse], k=4, c=60)
    # b: 1/62 + 1/61 > a: 1/61 + 1/63 > d: 1/62 > c: 1/63; the raw scores play no part
    assert ids == [["b", "a", "d", "c"]]
    np.testing.assert_allclose(scores[0], [1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], rtol=1e-6)


def test_rrf_short_rows_and_ties():
    first = (np.zeros((2, 2)), [["a", "b"], ["x"]])
    second = (np.zeros((2, 2)), [["b", "a"], []])
    scores, ids = reciprocal_rank_fusion([first, second], k=3)
    assert ids == [["a", "b"], ["x"]]  # a and b tie: first seen wins
    assert scores.shape == (2, 3) and np.isneginf(scores[0, 2]) and np.isneginf(scores[1, 1:]).all()
    with pytest.raises(ValueError, match="different numbers of queries"):
        reciprocal_rank_fusion([first, (np.zeros((1, 1)), [["a"]])], k=1)
