"""BM25 retrieval through ``bm25s``, and reciprocal rank fusion for dense + sparse hybrids.

``BM25Index`` mirrors ``DenseIndex``: the same ``search`` return types (scores (Q, k), Q lists
of passage ids) and the same ``meta.json`` check on load, so a retriever can hold either or
both. Text is lowercased, split on ``\\w\\w+``, English stopwords dropped, no stemming (a
stemmer would need the PyStemmer package); the title is indexed with the text, as Pyserini
does for DPR's Wikipedia.

On-disk layout of ``index.save(dir)``: bm25s's own files (``*.index.npy``, ``vocab.index.json``,
``params.index.json``), the tokenizer's (``vocab.tokenizer.json``, ``stopwords.tokenizer.json``),
``ids.txt`` and ``meta.json`` (removed first, written last).

    bm25 = BM25Index.build("corpus.jsonl")              # records the corpus fingerprint
    scores, ids = bm25.search(["who wrote Hamlet?"], k=5)
    fused = reciprocal_rank_fusion([dense.search(q_emb, 20), bm25.search(questions, 20)], k=5)

Memory: bm25s keeps the tokenised corpus (token ids per passage) in RAM while indexing, so
BM25 over a 21M-passage corpus needs a large machine; the dense path does not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from bm25s.tokenization import Tokenized, Tokenizer

from dyprag.data.corpus import Passage, corpus_fingerprint, iter_corpus
from dyprag.files import atomic_write_json, read_json
from dyprag.retrieval.dense_index import IDS_FILE, META, check_index_origin, hits_to_ids, read_ids, write_ids

FORMAT = "dyprag-bm25-index"
STOPWORDS = "en"

Results = tuple[np.ndarray, list[list[str]]]
"""What every search returns: scores (Q, k) float32 best first (-inf where a row has fewer
than k hits), and one list of ≤ k passage ids per query."""


class BM25Index:
    """Passage ids + a bm25s index + the tokenizer whose vocabulary it was built with."""

    def __init__(self, retriever: bm25s.BM25, tokenizer: Tokenizer, ids: list[str], meta: dict[str, Any]):
        n = retriever.scores["num_docs"]
        assert n == len(ids), f"bm25 index holds {n} documents but {len(ids)} ids"
        self.retriever = retriever
        self.tokenizer = tokenizer
        self._ids = np.array(ids, dtype=object)
        self.meta = meta

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"BM25Index(n={len(self)}, vocab={len(self.tokenizer.word_to_id)})"

    @property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    @classmethod
    def build(cls, source: str | os.PathLike | Iterable[Passage], meta: dict[str, Any] | None = None, *,
              k1: float = 1.5, b: float = 0.75, show_progress: bool = False) -> BM25Index:
        """Index a corpus file (its fingerprint goes into meta) or an iterable of passages."""
        meta = dict(meta or {})
        if isinstance(source, (str, os.PathLike)):
            meta.setdefault("corpus_fingerprint", corpus_fingerprint(source))
            passages: Iterable[Passage] = iter_corpus(source)
        else:
            passages = source
        ids: list[str] = []

        def texts() -> Iterator[str]:  # records ids while the tokenizer consumes the stream
            for p in passages:
                ids.append(p.id)
                yield p.embedding_text()

        tokenizer = Tokenizer(stopwords=STOPWORDS)
        token_ids = list(tokenizer.streaming_tokenize(texts()))  # one list of vocab ids per passage
        if not ids:
            raise ValueError("no passages to index")
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(Tokenized(ids=token_ids, vocab=tokenizer.get_vocab_dict()),
                        show_progress=show_progress)
        meta.update(format=FORMAT, count=len(ids), k1=k1, b=b, stopwords=STOPWORDS, stemmer=None)
        return cls(retriever, tokenizer, ids, meta)

    def search(self, query_texts: list[str], k: int) -> Results:
        """Top-k passages per query. Passages sharing no term with a query are not hits, so a
        row may hold fewer than k ids (its missing scores are -inf)."""
        if isinstance(query_texts, str):
            raise TypeError("search takes a list of query strings, not one string")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self))
        if not query_texts:
            return np.zeros((0, k), dtype=np.float32), []
        # update_vocab=False: unknown query words are dropped; a query left empty maps to the
        # tokenizer's "" token and scores 0 everywhere.
        tokens = self.tokenizer.tokenize(list(query_texts), update_vocab=False, return_as="ids",
                                         show_progress=False)
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False)  # (Q, k) each
        labels = np.asarray(docs, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        labels[scores <= 0] = -1
        return scores, hits_to_ids(labels, scores, self._ids)

    def save(self, path: str | os.PathLike) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)
        self.retriever.save(out, show_progress=False)
        self.tokenizer.save_vocab(out)
        self.tokenizer.save_stopwords(out)
        write_ids(out / IDS_FILE, self.ids)
        atomic_write_json(out / META, self.meta)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, corpus_fingerprint: str | None = None) -> BM25Index:
        """Read a directory written by ``save``; refuse one built from another corpus."""
        src = Path(path)
        meta = read_json(src / META)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{src / META}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        check_index_origin(meta, src, corpus_fingerprint=corpus_fingerprint)
        retriever = bm25s.BM25.load(src, show_progress=False)
        tokenizer = Tokenizer(stopwords=STOPWORDS)
        tokenizer.load_vocab(src)
        tokenizer.load_stopwords(src)
        ids = read_ids(src / IDS_FILE)
        if not retriever.scores["num_docs"] == len(ids) == meta.get("count"):
            raise ValueError(f"{src} is inconsistent: {retriever.scores['num_docs']} documents, "
                             f"{len(ids)} ids, meta.json count {meta.get('count')}")
        return cls(retriever, tokenizer, ids, meta)


def reciprocal_rank_fusion(results: list[Results], k: int, c: int = 60) -> Results:
    """Fuse several rankings of the same queries: score(d) = Σ_lists 1 / (c + rank of d), rank from 1.

    Only ranks matter, so dense cosine scores and BM25 scores need no calibration
    (Cormack et al., 2009; c = 60 as there). Ties keep the order in which ids were first
    seen (earlier lists, better ranks first).
    """
    if not results:
        raise ValueError("reciprocal_rank_fusion needs at least one ranking")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n_queries = {len(ids) for _, ids in results}
    if len(n_queries) != 1:
        raise ValueError(f"rankings cover different numbers of queries: {sorted(n_queries)}")
    (q_count,) = n_queries
    scores = np.full((q_count, k), -np.inf, dtype=np.float32)  # (Q, k)
    fused_ids: list[list[str]] = []
    for q in range(q_count):
        fused: dict[str, float] = {}
        for _, ids in results:
            for rank, pid in enumerate(ids[q], start=1):
                fused[pid] = fused.get(pid, 0.0) + 1.0 / (c + rank)
        top = sorted(fused.items(), key=lambda item: -item[1])[:k]  # sorted() is stable
        fused_ids.append([pid for pid, _ in top])
        scores[q, :len(top)] = [s for _, s in top]
    return scores, fused_ids
