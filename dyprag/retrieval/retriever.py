"""Retrieve passages for questions: an embedder + a dense index, BM25, or both fused.

``build_retriever`` is stage 3 of the pipeline (docs/design.md §1): embed the corpus, build the
index, keep the doc embeddings (the translator's input). It caches under ``out_dir`` and skips
each piece whose recorded inputs still match::

    out_dir/embeddings.npy   (N, dim) float32 doc embeddings, row i = passage i of the corpus
    out_dir/embeddings.json  {"embedder", "corpus_fingerprint", "count", "dim"}
    out_dir/dense/           DenseIndex (reused when embedder, corpus and factory match)
    out_dir/bm25/            BM25Index (reused when the corpus matches)
    out_dir/meta.json        {"format", "method", "embedder", "factory", "corpus_fingerprint", "count"}

Changing only the factory rebuilds the index from the stored embeddings without re-embedding;
changing the method from "dense" to "hybrid" adds BM25 and keeps the dense part.

    retriever = build_retriever("corpus.jsonl", "checkpoints/run/index", method="hybrid")
    retriever.retrieve(["who wrote Hamlet?"], k=3)   # [[(doc_id, score), ...]]
    retriever = load_retriever("checkpoints/run/index")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dyprag.config import IndexConfig, choices, shown
from dyprag.data.corpus import corpus_fingerprint, corpus_ids
from dyprag.files import atomic_write_json, read_json
from dyprag.retrieval.dense_index import META, DenseIndex
from dyprag.retrieval.embed import DEFAULT_MODEL, Embedder, EmbeddingTable
from dyprag.retrieval.sparse import BM25Index, Results, reciprocal_rank_fusion

FORMAT = "dyprag-retriever"
METHODS = choices(IndexConfig, "method")
EMBEDDINGS, EMBEDDINGS_META = "embeddings.npy", "embeddings.json"


class Retriever:
    """Questions in, ranked passage ids out, by ``method`` in {"dense", "bm25", "hybrid"}.

    "hybrid" fuses the top ``fusion_depth`` of each (at least k) with reciprocal rank fusion.
    """

    def __init__(self, method: str = IndexConfig.method, embedder: Embedder | None = None,
                 dense: DenseIndex | None = None, bm25: BM25Index | None = None,
                 embeddings: np.ndarray | None = None, fusion_depth: int = 50):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method in ("dense", "hybrid") and (embedder is None or dense is None):
            raise ValueError(f"method {method!r} needs an embedder and a dense index")
        if method in ("bm25", "hybrid") and bm25 is None:
            raise ValueError(f"method {method!r} needs a BM25 index")
        if dense is not None and embedder is not None and dense.dim != embedder.dim:
            raise ValueError(f"dense index has dim {dense.dim}, embedder {embedder.name!r} "
                             f"has {embedder.dim}")
        self.method = method
        self.embedder = embedder
        self.dense = dense
        self.bm25 = bm25
        self.embeddings = embeddings  # (N, dim) memmap of the doc embeddings, when built here
        self.fusion_depth = fusion_depth

    def embedding_table(self) -> EmbeddingTable:
        """The dense index's document vectors (rows in the index's id order), as the
        translator's input (``translator.embedding: retriever``)."""
        if self.embeddings is None or self.dense is None or self.embedder is None:
            raise ValueError("translator.embedding 'retriever' needs a dense index "
                             "(index.method dense or hybrid)")
        return EmbeddingTable(self.dense.ids, self.embeddings, self.embedder.name)

    def __repr__(self) -> str:
        return f"Retriever({self.method!r}, dense={self.dense!r}, bm25={self.bm25!r})"

    def search(self, questions: list[str], k: int) -> Results:
        """Scores (Q, k) and Q lists of ≤ k passage ids, as ``DenseIndex.search``."""
        if isinstance(questions, str):
            raise TypeError("search takes a list of questions, not one string")
        if self.method == "dense":
            return self.dense.search(self.embedder.encode(questions), k)
        if self.method == "bm25":
            return self.bm25.search(questions, k)
        depth = max(k, self.fusion_depth)
        return reciprocal_rank_fusion([self.dense.search(self.embedder.encode(questions), depth),
                                       self.bm25.search(questions, depth)], k)

    def retrieve(self, questions: list[str], k: int) -> list[list[tuple[str, float]]]:
        """Per question, up to k ``(passage id, score)`` pairs, best first."""
        scores, ids = self.search(questions, k)
        return [[(pid, float(s)) for pid, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(ids, scores)]


def _meta_matches(path: Path, expected: dict[str, Any]) -> bool:
    """True when the JSON file at ``path`` exists and agrees with every key of ``expected``."""
    if not path.is_file():
        return False
    try:
        meta = read_json(path)
    except ValueError:  # a damaged file is a cache miss, not an error
        return False
    return all(meta.get(key) == value for key, value in expected.items())


def _doc_embeddings(corpus_path: Path, out: Path, fingerprint: str, embedder: Embedder,
                    show_progress: bool) -> np.ndarray:
    """The (N, dim) memmap in out/embeddings.npy, embedding the corpus only on a cache miss."""
    expected = {"embedder": embedder.name, "corpus_fingerprint": fingerprint, "dim": embedder.dim}
    if _meta_matches(out / EMBEDDINGS_META, expected) and (out / EMBEDDINGS).is_file():
        return np.load(out / EMBEDDINGS, mmap_mode="r")
    # Drop the old record first: a crash after the new .npy lands must not pair it with stale meta.
    (out / EMBEDDINGS_META).unlink(missing_ok=True)
    emb = embedder.embed_corpus(corpus_path, out / EMBEDDINGS, show_progress=show_progress)
    atomic_write_json(out / EMBEDDINGS_META, {**expected, "count": len(emb)})
    return emb


def build_retriever(corpus_path: str | os.PathLike, out_dir: str | os.PathLike,
                    method: str = IndexConfig.method, factory: str = IndexConfig.factory,
                    embedder: Embedder | str | None = None, *,
                    search_params: dict[str, float] | None = None,
                    show_progress: bool = True) -> Retriever:
    """Build (or reuse from ``out_dir``) what ``method`` needs, and return the Retriever.

    ``embedder`` is an ``Embedder`` (shared, already loaded), a model id/path, or None for
    the packaged MiniLM. ``search_params`` (e.g. ``{"nprobe": 16}``) are applied to the dense
    index whether it was rebuilt or reused.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    corpus_path, out = Path(corpus_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = corpus_fingerprint(corpus_path)
    model = dense = bm25 = embeddings = None

    if method in ("dense", "hybrid"):
        model = embedder if isinstance(embedder, Embedder) else Embedder(embedder)
        origin = {"embedder": model.name, "corpus_fingerprint": fingerprint}
        cached = _meta_matches(out / "dense" / META, {**origin, "factory": factory})
        ids = None if cached else corpus_ids(corpus_path)  # a repeated id: refused up front
        embeddings = _doc_embeddings(corpus_path, out, fingerprint, model, show_progress)
        if cached:
            dense = DenseIndex.load(out / "dense", **origin)
            wanted = {**dense.meta.get("search_params", {}), **(search_params or {})}
            if wanted != dense.meta.get("search_params", {}):
                for name, value in wanted.items():
                    dense.set_search_parameter(name, value)
                dense.save(out / "dense")
        else:
            dense = DenseIndex.build(embeddings, ids, factory, origin, search_params=search_params,
                                     show_progress=show_progress)
            dense.save(out / "dense")

    if method in ("bm25", "hybrid"):
        if _meta_matches(out / "bm25" / META, {"corpus_fingerprint": fingerprint}):
            bm25 = BM25Index.load(out / "bm25", corpus_fingerprint=fingerprint)
        else:
            if dense is None:
                corpus_ids(corpus_path)  # refuses a repeated id before indexing
            bm25 = BM25Index.build(corpus_path, {"corpus_fingerprint": fingerprint},
                                   show_progress=show_progress)
            bm25.save(out / "bm25")

    meta = {"format": FORMAT, "method": method, "corpus_fingerprint": fingerprint,
            "embedder": model.name if model else None, "factory": factory if dense else None,
            "count": len(dense if dense is not None else bm25)}
    if not _meta_matches(out / META, meta):  # unchanged: left as it is (a rerun rewrites nothing)
        atomic_write_json(out / META, meta)
    return Retriever(method, model, dense, bm25, embeddings)


def load_retriever(out_dir: str | os.PathLike, embedder: Embedder | str | None = None,
                   use_gpu: bool | None = None) -> Retriever:
    """Reopen what ``build_retriever`` wrote, without the corpus (it may have moved).

    ``embedder`` is the one the index was built with: a loaded ``Embedder`` (shared), a model
    id/path the caller chose, or None for the packaged default. The name in the index's
    metadata is only compared, never loaded: a run directory is data, and loading a model it
    names would run whatever that model's files hold.
    """
    out = Path(out_dir)
    meta = read_json(out / META)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out / META}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    method, fingerprint = meta["method"], meta["corpus_fingerprint"]
    model = dense = bm25 = embeddings = None
    if method in ("dense", "hybrid"):
        chosen = embedder.name if isinstance(embedder, Embedder) else embedder or DEFAULT_MODEL
        if meta.get("embedder") != chosen:
            raise ValueError(f"{out} was built with embedder {shown(meta.get('embedder'))}, "
                             f"not {chosen}; a run's own embedder is loaded only when named "
                             f"(--embedder NAME)")
        model = embedder if isinstance(embedder, Embedder) else Embedder(chosen)
        dense = DenseIndex.load(out / "dense", embedder=model.name, corpus_fingerprint=fingerprint,
                                use_gpu=use_gpu)
        if (out / EMBEDDINGS).is_file():
            embeddings = np.load(out / EMBEDDINGS, mmap_mode="r")
    if method in ("bm25", "hybrid"):
        bm25 = BM25Index.load(out / "bm25", corpus_fingerprint=fingerprint)
    return Retriever(method, model, dense, bm25, embeddings)
