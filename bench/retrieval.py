"""Retrieval costs on a 200k-passage synthetic corpus, measured in one run.

    python bench/retrieval.py                      # CPU, defaults below (~2-4 min on 2 cores)
    python bench/retrieval.py --passages 1000000 --embed-subset 20000 --ivf IVF4096,Flat

Corpus: ``--passages`` (200k) passages of 20-40 random pseudo-words, written as jsonl to a
temporary directory and read back through ``dyprag.data.corpus`` (read and fingerprint speed are
printed). Four numbers:

- ``embed_docs_per_s``: ``Embedder.embed_corpus`` with the real packaged MiniLM over the
  first ``--embed-subset`` (2000) passages, streamed from their own jsonl file, in a fresh
  subprocess; model loading is not timed. Embedding all 200k would take well over an hour
  on 2 CPU cores, and the rate per passage does not depend on the corpus size. The random
  pseudo-words split into several word pieces each, so a passage is about as many tokens
  as a DPR 100-word passage (the mean is printed).
- ``peak_rss_mb``: ``ru_maxrss`` of that subprocess (torch + model + one chunk of passages
  and vectors; the embeddings live in a memory-mapped file). The RSS right after loading the
  model, and the peak of a second run on a file 4x smaller, are printed beside it: a
  streaming embedder's peak does not grow with the corpus.
- ``wrapper_overhead_flat`` / ``wrapper_overhead_ivf``: time of ``DenseIndex.search`` over
  time of raw ``faiss`` ``index.search`` on the very same index object and queries
  (``--queries`` at k = ``--k``), interleaved in alternating order, median ratio over
  ``--repeats`` pairs. Target ≤ 1.10. The 200k × 384 vectors here are random unit vectors,
  not MiniLM embeddings (see above); search cost depends on N, d and the factory, not on
  what the vectors mean.

The last line printed is one JSON object with exactly those four keys.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dyprag.data.corpus import Passage, corpus_fingerprint, iter_corpus, write_corpus_jsonl

DIM = 384  # all-MiniLM-L6-v2


def synthetic_passages(n: int, seed: int, vocab_size: int = 20_000) -> list[Passage]:
    """n passages of 20-40 words drawn from a vocabulary of random lowercase pseudo-words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(vocab_size)]
    lengths = rng.integers(20, 41, size=n)
    words = rng.integers(0, vocab_size, size=int(lengths.sum()))
    passages, start = [], 0
    for i, length in enumerate(lengths):
        text = " ".join(vocab[w] for w in words[start:start + length])
        passages.append(Passage(f"p{i}", vocab[words[start]].title(), text))
        start += length
    return passages


def embed_child(corpus: str, out: str) -> None:
    """Subprocess body: load the embedder, embed ``corpus``, print one JSON line of measurements."""
    from dyprag.data.corpus import iter_batches
    from dyprag.retrieval.embed import Embedder

    embedder = Embedder(device="cpu")
    embedder.encode(["warm up the kernels"] * 8)
    sample = next(iter_batches(iter_corpus(corpus), 200))
    tokens = [len(ids) for ids in embedder.model.tokenizer([p.embedding_text() for p in sample])["input_ids"]]
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB (Linux)
    start = time.perf_counter()
    emb = embedder.embed_corpus(corpus, out, show_progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"n": len(emb), "seconds": seconds, "tokens": statistics.mean(tokens),
                      "rss_loaded_mb": rss_loaded,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_embedding(corpus: Path, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, __file__, "--embed-child", str(corpus), str(out)],
                            check=False, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"embedding subprocess failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def seconds_per_call(fn: Callable[[], object], min_time: float = 0.2) -> float:
    """Mean time of one call, looping until at least ``min_time`` has passed."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def wrapper_overhead(index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float, float]:
    """(median ratio wrapper/raw, median raw seconds, median wrapper seconds), interleaved."""
    def raw() -> object:
        return index.index.search(queries, k)

    def wrapped() -> object:
        return index.search(queries, k)

    raw(), wrapped()  # warm caches and thread pools
    ratios, t_raw, t_wrapped = [], [], []
    for i in range(repeats):
        if i % 2:  # alternate the order so drift and cache effects do not favour either side
            b, a = seconds_per_call(wrapped), seconds_per_call(raw)
        else:
            a, b = seconds_per_call(raw), seconds_per_call(wrapped)
        ratios.append(b / a)
        t_raw.append(a)
        t_wrapped.append(b)
    return statistics.median(ratios), statistics.median(t_raw), statistics.median(t_wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--embed-subset", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ivf", default="IVF512,Flat")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-child", nargs=2, metavar=("CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.embed_child:
        embed_child(*args.embed_child)
        return

    import faiss

    from dyprag.retrieval.dense_index import DenseIndex

    with tempfile.TemporaryDirectory(prefix="dyprag-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        passages = synthetic_passages(args.passages, args.seed)
        corpus = write_corpus_jsonl(passages, tmp / "corpus.jsonl")
        subset = write_corpus_jsonl(passages[:args.embed_subset], tmp / "subset.jsonl")
        small = write_corpus_jsonl(passages[:args.embed_subset // 4], tmp / "small.jsonl")
        del passages
        print(f"corpus: {args.passages} passages, {corpus.stat().st_size / 2**20:.1f} MiB jsonl, "
              f"written in {time.perf_counter() - start:.1f}s")

        start = time.perf_counter()
        ids = [p.id for p in iter_corpus(corpus)]
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        corpus_fingerprint(corpus)
        print(f"iter_corpus: {len(ids) / read_s:,.0f} passages/s; "
              f"corpus_fingerprint: {time.perf_counter() - start:.2f}s")

        emb = measure_embedding(subset, tmp / "subset.npy")
        docs_per_s = emb["n"] / emb["seconds"]
        print(f"embed_corpus (MiniLM, cpu, subprocess): {emb['n']} passages of {emb['tokens']:.0f} tokens "
              f"on average in {emb['seconds']:.1f}s = {docs_per_s:.1f} passages/s")
        # Streaming check: a 4x larger file must not raise the peak by much more than its vectors.
        emb_small = measure_embedding(small, tmp / "small.npy")
        for run in (emb_small, emb):
            print(f"  RSS embedding {run['n']:>5} passages: {run['rss_loaded_mb']:.0f} MB after model load, "
                  f"peak {run['peak_rss_mb']:.0f} MB")

        rng = np.random.default_rng(args.seed)
        vectors = rng.standard_normal((args.passages, DIM), dtype=np.float32)  # (N, 384)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = rng.standard_normal((args.queries, DIM), dtype=np.float32)  # (Q, 384)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        print(f"index part: {args.passages} random unit {DIM}-d vectors, {args.queries} queries, k={args.k}, "
              f"faiss threads {faiss.omp_get_max_threads()}")

        overheads = {}
        for key, factory, params in [("flat", "Flat", {}), ("ivf", args.ivf, {"nprobe": args.nprobe})]:
            start = time.perf_counter()
            index = DenseIndex.build(vectors, ids, factory, search_params=params, use_gpu=False)
            build_s = time.perf_counter() - start
            ratio, t_raw, t_wrapped = wrapper_overhead(index, queries, args.k, args.repeats)
            overheads[key] = ratio
            print(f"{factory} {params or ''}: built in {build_s:.1f}s; search raw faiss {t_raw * 1e3:.2f} ms, "
                  f"DenseIndex {t_wrapped * 1e3:.2f} ms, ratio median {ratio:.3f} over {args.repeats} pairs")
            del index

    print(json.dumps({"embed_docs_per_s": round(docs_per_s, 1),
                      "wrapper_overhead_flat": round(overheads["flat"], 4),
                      "wrapper_overhead_ivf": round(overheads["ivf"], 4),
                      "peak_rss_mb": round(emb["peak_rss_mb"], 1)}))


if __name__ == "__main__":
    main()
