"""DenseIndex over FAISS: exact search, save/load round trips, origin checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dyprag.retrieval.dense_index import DenseIndex, hits_to_ids

N, D = 200, 16
ORIGIN = {"embedder": "test-embedder", "corpus_fingerprint": "abc123"}


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)  # (n, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str], np.ndarray]:
    return unit_rows(N, 0), [f"doc{i}" for i in range(N)], unit_rows(7, 1)


def brute_force(emb: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ emb.T  # (Q, N)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(scores, top, axis=1), top


def test_flat_is_exact(data):
    emb, ids, queries = data
    index = DenseIndex.build(emb, ids, "Flat", ORIGIN)
    scores, hit_ids = index.search(queries, k=5)
    want_scores, want_rows = brute_force(emb, queries, 5)
    assert scores.shape == (7, 5) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert hit_ids == [[ids[j] for j in row] for row in want_rows]
    assert index.meta | ORIGIN == index.meta and index.meta["count"] == N and index.meta["dim"] == D


@pytest.mark.parametrize("factory, params", [("Flat", {}), ("IVF4,Flat", {"nprobe": 4})])
def test_save_load_round_trip(data, tmp_path, factory, params):
    emb, ids, queries = data
    index = DenseIndex.build(emb, ids, factory, ORIGIN, search_params=params)
    before = index.search(queries, k=10)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["ids.txt", "index.faiss", "meta.json"]
    loaded = DenseIndex.load(tmp_path / "idx", **ORIGIN)
    after = loaded.search(queries, k=10)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1]
    assert loaded.ids == ids and loaded.meta == index.meta
    # nprobe = nlist visits every list: IVF answers are the exact ones
    flat_scores, flat_ids = DenseIndex.build(emb, ids, "Flat").search(queries, k=10)
    np.testing.assert_allclose(after[0], flat_scores, atol=1e-5)
    assert after[1] == flat_ids


def test_memmap_input_added_in_chunks(data, tmp_path, monkeypatch):
    emb, ids, queries = data
    path = tmp_path / "emb.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=emb.shape)
    mm[:] = emb
    mm.flush()
    monkeypatch.setattr("dyprag.retrieval.dense_index._ADD_CHUNK", 64)  # 200 rows → 4 add calls
    index = DenseIndex.build(np.load(path, mmap_mode="r"), ids, "IVF4,Flat", search_params={"nprobe": 4})
    assert len(index) == N
    _, hit_ids = index.search(queries, k=3)
    assert hit_ids == DenseIndex.build(emb, ids, "Flat").search(queries, k=3)[1]


def test_load_refuses_other_origin(data, tmp_path):
    emb, ids, _ = data
    DenseIndex.build(emb, ids, "Flat", ORIGIN).save(tmp_path / "idx")
    with pytest.raises(ValueError, match="built with embedder 'test-embedder', not 'other-model'"):
        DenseIndex.load(tmp_path / "idx", embedder="other-model", corpus_fingerprint="abc123")
    with pytest.raises(ValueError, match="built from corpus 'abc123', not 'fff'"):
        DenseIndex.load(tmp_path / "idx", embedder="test-embedder", corpus_fingerprint="fff")
    with pytest.raises(FileNotFoundError, match="meta.json does not exist"):
        DenseIndex.load(tmp_path / "missing")


def test_k_capped_and_missing_hits(data):
    emb, ids, queries = data
    small = DenseIndex.build(emb[:3], ids[:3], "Flat")
    scores, hit_ids = small.search(queries, k=10)
    assert scores.shape == (7, 3) and all(len(row) == 3 for row in hit_ids)
    # nprobe=1 of 4 lists cannot return all N passages: rows come back short, padded with -inf
    ivf = DenseIndex.build(emb, ids, "IVF4,Flat", search_params={"nprobe": 1})
    scores, hit_ids = ivf.search(queries, k=N)
    for row_scores, row_ids in zip(scores, hit_ids):
        assert len(row_ids) < N and np.isfinite(row_scores[:len(row_ids)]).all()
        assert np.isneginf(row_scores[len(row_ids):]).all()


def test_search_validates_queries(data):
    emb, ids, _ = data
    index = DenseIndex.build(emb, ids)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 16\)"):
        index.search(np.zeros((2, 8), dtype=np.float32), k=1)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.zeros((2, D), dtype=np.float32), k=0)
    with pytest.raises(ValueError, match="200 embeddings but 3 ids"):
        DenseIndex.build(emb, ids[:3])


def test_hits_to_ids():
    ids = np.array(["a", "b", "c"], dtype=object)
    scores = np.array([[0.9, 0.5], [0.7, 0.1]], dtype=np.float32)
    assert hits_to_ids(np.array([[2, 0], [1, -1]]), scores, ids) == [["c", "a"], ["b"]]
    assert scores[1, 1] == -np.inf


def test_without_faiss_the_pipeline_imports_and_a_dense_index_names_the_fix():
    code = ("import sys; sys.modules['faiss'] = None\n"  # as on a machine without faiss
            "import numpy as np, train, dyprag.run.pipeline\n"
            "from dyprag.retrieval.dense_index import DenseIndex\n"
            "try:\n    DenseIndex.build(np.eye(2, dtype=np.float32), ['a', 'b'])\n"
            "except ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "needs faiss: pip install faiss-cpu" in out.stdout and "index.method=bm25" in out.stdout
