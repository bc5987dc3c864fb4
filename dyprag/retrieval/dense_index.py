"""A FAISS inner-product index over passage embeddings, keyed by passage id.

``DenseIndex`` holds a FAISS index built with ``faiss.index_factory(d, factory,
METRIC_INNER_PRODUCT)`` ("Flat" = exact; "IVF4096,Flat", "HNSW32", "IVF4096,PQ64", ... =
approximate) and the passage ids in row order. Embeddings are unit vectors (``dyprag.retrieval.embed``),
so inner product is cosine similarity.

On-disk layout of ``index.save(dir)``::

    dir/index.faiss   faiss.write_index of the CPU index (IVF nprobe / HNSW efSearch included)
    dir/ids.txt       one JSON-encoded passage id per line, in row order
    dir/meta.json     {"format", "factory", "dim", "count", "embedder", "corpus_fingerprint", ...}

``meta.json`` is removed first and written last, so a directory with one is complete.
``DenseIndex.load(dir, embedder=..., corpus_fingerprint=...)`` refuses an index built with
another embedder or from another corpus: its vectors would be meaningless for the caller.

Where searches run: FAISS GPU (when the faiss build has GPUs) > exact torch matmul + top-k on
CUDA (Flat only, when torch sees a GPU but faiss does not) > FAISS CPU.

    index = DenseIndex.build(emb, ids, "IVF256,Flat", {"embedder": name, "corpus_fingerprint": fp},
                             search_params={"nprobe": 16})
    scores, ids = index.search(embedder.encode(questions), k=5)   # (Q, 5), Q lists of ≤ 5 ids
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from dyprag.config import IndexConfig
from dyprag.files import atomic_path, atomic_write_json, atomic_write_jsonl, read_json

if TYPE_CHECKING:  # imported where an index is built or read (_faiss)
    import faiss

FORMAT = "dyprag-dense-index"
INDEX_FILE, IDS_FILE, META = "index.faiss", "ids.txt", "meta.json"
_ADD_CHUNK = 65_536  # rows copied from a memmap into RAM per faiss.add call
_SEARCH_BATCH = 4_096  # queries per faiss.search call, bounding the (Q, k) buffers
_TORCH_SCORES = 1 << 28  # float32 entries of the (Q_batch, N) score matrix on the GPU path (1 GiB)


def _faiss():
    """The faiss module, imported when a dense index is built or read (a BM25-only job, on a
    machine without faiss, never needs it)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("the dense index needs faiss: pip install faiss-cpu (or a faiss GPU "
                          "build), or retrieve with index.method=bm25") from None
    return faiss


def write_ids(path: Path, ids: list[str]) -> None:
    """One JSON string per line (ids may hold tabs or newlines), temp file + rename."""
    atomic_write_jsonl(path, (str(pid) for pid in ids))


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def check_index_origin(meta: dict[str, Any], where: Path, embedder: str | None = None,
                       corpus_fingerprint: str | None = None) -> None:
    """Refuse an index whose meta.json names another embedder or corpus than the caller's."""
    problems = []
    if embedder is not None and meta.get("embedder") != embedder:
        problems.append(f"it was built with embedder {meta.get('embedder')!r}, not {embedder!r}")
    if corpus_fingerprint is not None and meta.get("corpus_fingerprint") != corpus_fingerprint:
        problems.append(f"it was built from corpus {meta.get('corpus_fingerprint')!r}, "
                        f"not {corpus_fingerprint!r} (another corpus, or the file changed)")
    if problems:
        raise ValueError(f"refusing to load {where}: " + "; ".join(problems) + ". Rebuild the index.")


def hits_to_ids(labels: np.ndarray, scores: np.ndarray, ids: np.ndarray) -> list[list[str]]:
    """Map row numbers (Q, k) to passage ids; -1 (fewer than k found) is dropped, its score set -inf."""
    missing = labels < 0
    if not missing.any():
        return ids[labels].tolist()
    scores[missing] = -np.inf
    return [ids[row[row >= 0]].tolist() for row in labels]


class DenseIndex:
    """Passage ids + a FAISS inner-product index over their embeddings."""

    def __init__(self, index: faiss.Index, ids: list[str], meta: dict[str, Any],
                 use_gpu: bool | None = None):
        assert index.ntotal == len(ids), f"index holds {index.ntotal} vectors but {len(ids)} ids"
        self.index = index  # always the CPU index: the one that is saved
        self._ids = np.array(ids, dtype=object)  # object array: one fancy-index maps (Q, k) rows to ids
        self.meta = meta
        self._gpu_index: faiss.Index | None = None
        self._torch_xb = None  # (N, d) float32 CUDA tensor, Flat only
        if use_gpu is not False:
            self._place_on_gpu(required=use_gpu is True)

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    def __len__(self) -> int:
        return self.index.ntotal

    def __repr__(self) -> str:
        where = "faiss-gpu" if self._gpu_index is not None else "torch-cuda" if self._torch_xb is not None \
            else "faiss-cpu"
        return f"DenseIndex({self.meta.get('factory')!r}, n={len(self)}, dim={self.dim}, {where})"

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: list[str], factory: str = IndexConfig.factory,
              meta: dict[str, Any] | None = None, *, search_params: dict[str, float] | None = None,
              train_size: int = 100_000, seed: int = 0, use_gpu: bool | None = None,
              show_progress: bool = False) -> DenseIndex:
        """Index ``embeddings`` (N, d) (an array or a memmap) whose row i is passage ``ids[i]``.

        Factories that need training (IVF, PQ, ...) train on ``min(N, train_size)`` rows drawn
        with ``seed``. ``search_params`` (e.g. ``{"nprobe": 16}``, ``{"efSearch": 64}``) are
        set through ``faiss.ParameterSpace`` and recorded in meta.json. ``meta`` should hold
        ``embedder`` and ``corpus_fingerprint`` so that ``load`` can check them.
        """
        faiss = _faiss()
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (N, d), got shape {embeddings.shape}")
        n, d = embeddings.shape
        if n != len(ids):
            raise ValueError(f"{n} embeddings but {len(ids)} ids")
        if n == 0:
            raise ValueError("cannot build an index over no embeddings")
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            rng = np.random.default_rng(seed)
            # sorted rows: a memmap reads them front to back instead of seeking at random
            rows = np.sort(rng.choice(n, size=min(n, train_size), replace=False))
            index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))  # (n_train, d)
        for start in tqdm(range(0, n, _ADD_CHUNK), desc="index", disable=not show_progress):
            index.add(np.ascontiguousarray(embeddings[start:start + _ADD_CHUNK], dtype=np.float32))
        for name, value in (search_params or {}).items():
            faiss.ParameterSpace().set_index_parameter(index, name, value)
        meta = {**(meta or {}), "format": FORMAT, "factory": factory, "dim": d, "count": n,
                "search_params": dict(search_params or {})}
        return cls(index, ids, meta, use_gpu=use_gpu)

    def set_search_parameter(self, name: str, value: float) -> None:
        """Change e.g. ``nprobe`` (IVF) or ``efSearch`` (HNSW) for later searches and saves."""
        faiss = _faiss()
        faiss.ParameterSpace().set_index_parameter(self.index, name, value)
        if self._gpu_index is not None:
            faiss.GpuParameterSpace().set_index_parameter(self._gpu_index, name, value)
        self.meta["search_params"] = {**self.meta.get("search_params", {}), name: value}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k passages per query: scores (Q, k) float32, best first, and Q lists of ids.

        ``k`` is capped at the index size. An approximate index may find fewer than k
        passages for a query; that row's id list is shorter and its missing scores are -inf.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, d)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {q.shape}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        k = min(k, len(self))
        if len(q) <= _SEARCH_BATCH:
            scores, labels = self._search(q, k)
        else:
            parts = [self._search(q[i:i + _SEARCH_BATCH], k) for i in range(0, len(q), _SEARCH_BATCH)]
            scores = np.concatenate([s for s, _ in parts])
            labels = np.concatenate([lab for _, lab in parts])
        return scores, hits_to_ids(labels, scores, self._ids)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and row numbers for one batch of queries."""
        if self._gpu_index is not None:
            return self._gpu_index.search(q, k)
        if self._torch_xb is not None:
            return self._torch_search(q, k)
        return self.index.search(q, k)

    def _torch_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        xb = self._torch_xb  # (N, d)
        step = max(1, _TORCH_SCORES // len(self))  # queries per matmul, so (step, N) stays ≤ 1 GiB
        scores, labels = [], []
        for i in range(0, len(q), step):
            qt = torch.from_numpy(q[i:i + step]).to(xb.device)  # (step, d)
            top = torch.topk(qt @ xb.T, k, dim=1)  # (step, N) → (step, k)
            scores.append(top.values.cpu().numpy())
            labels.append(top.indices.cpu().numpy())
        return np.concatenate(scores), np.concatenate(labels).astype(np.int64)

    def _place_on_gpu(self, required: bool) -> None:
        faiss = _faiss()
        if faiss.get_num_gpus() > 0:
            try:
                self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
                return
            except RuntimeError:  # e.g. HNSW has no GPU implementation: stay on the CPU
                if required:
                    raise
                return
        import torch

        if torch.cuda.is_available() and isinstance(self.index, faiss.IndexFlat):
            n, d = len(self), self.dim
            xb = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)  # view, no copy
            self._torch_xb = torch.from_numpy(xb).to("cuda")
        elif required:
            raise ValueError("use_gpu=True, but faiss sees no GPU and torch can only serve a Flat index "
                             f"(this one is {self.meta.get('factory')!r}, cuda={torch.cuda.is_available()})")

    def save(self, path: str | os.PathLike) -> Path:
        """Write index.faiss, ids.txt and meta.json (last) to directory ``path``."""
        faiss = _faiss()
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / META).unlink(missing_ok=True)
        with atomic_path(out / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        write_ids(out / IDS_FILE, self.ids)
        atomic_write_json(out / META, self.meta)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, embedder: str | None = None,
             corpus_fingerprint: str | None = None, use_gpu: bool | None = None) -> DenseIndex:
        """Read a directory written by ``save``; with ``embedder`` / ``corpus_fingerprint``,
        refuse (ValueError) an index built with another embedder or from another corpus."""
        faiss = _faiss()
        src = Path(path)
        meta = read_json(src / META)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{src / META}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        check_index_origin(meta, src, embedder=embedder, corpus_fingerprint=corpus_fingerprint)
        if not (src / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{src / INDEX_FILE} does not exist")
        index = faiss.read_index(str(src / INDEX_FILE))
        ids = read_ids(src / IDS_FILE)
        if not index.ntotal == len(ids) == meta.get("count"):
            raise ValueError(f"{src} is inconsistent: {index.ntotal} vectors, {len(ids)} ids, "
                             f"meta.json count {meta.get('count')}")
        return cls(index, ids, meta, use_gpu=use_gpu)
