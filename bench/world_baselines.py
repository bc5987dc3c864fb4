"""Every mode on the synthetic world's held-out test entities, from a clean directory.

    python bench/world_baselines.py                         # ~10 min on 2 cores
    python bench/world_baselines.py --out /tmp/wb train.epochs=20   # overrides as train.py's
    python bench/world_baselines.py --out /tmp/ships data.world=configs/world-ships.yaml

1. The default ``python train.py`` job (world → base model → index → augment → bank →
   translator → eval), timed as on a machine's first run: ``train_seconds`` (from an empty
   ``--out``, with ``DYPRAG_CACHE`` set to an empty ``<out>/cache``: the base model comes from
   the package, or is pretrained for another world), then again into a new run directory
   with that cache filled: ``train_seconds_cached``.
2. Its cached stages reused to answer the test questions in every mode:
   ``vanilla``, ``rag@k`` (passages in the prompt), ``prag@k`` (the sum of the top-k bank
   LoRAs), ``prag+rag@3``, ``dyprag@k`` (the sum of the translator's LoRAs of the top-k
   documents), ``dyprag+rag@3``.
3. DyPRAG's own translator recipe (``PAPER_TRANSLATOR``: per-layer MLPs on the retriever
   embedding, trained on the bank's documents with LM + KL + MSE) on the same stages, for
   ``dyprag@1``.

Prints one JSON object as its last line: ``recall@1``, ``recall@3``, ``f1`` and ``em`` by
mode, ``dyprag_irrelevant`` (dyprag@1 F1 with another question's document in place of the
retrieved one) and ``delta_cosine`` (the mean pairwise cosine of the generated ΔW across the
test documents), ``f1_paper_translator`` (its dyprag@1), ``translator_params`` (``default``, ``paper``),
``translator_fit_f1`` (DyPRAG F1 on the augmented questions of the documents each translator
trained on, ``seen``, and of held-out ones), ``f1_by_fact`` (``{mode: {attribute: F1}}``, by
the world schema's attribute names), ``pretrain_seconds``, ``bank_seconds``,
``train_seconds``, ``train_seconds_cached``, ``stage_seconds`` (of the default job, by stage)
and ``f1_default_job`` (the default job's own table).
Targets: recall@3 ≥ 0.95, vanilla ≤ 0.15; prag@1 ≥ 0.80, prag+rag@3 ≥ rag@3; dyprag@1 ≥ 0.85
and ≥ 0.9 × prag@1, dyprag@3 ≥ 0.9 × dyprag@1; dyprag+rag@3 ≥ rag@3 + 0.05 and ≥ rag@1; every
fact's dyprag@1 ≥ 0.5 (``f1_by_fact``); the translator's held-out fit ≥ 0.9 × its seen one;
dyprag_irrelevant ≤ vanilla + 0.05; delta_cosine ≤ 0.5; train_seconds ≤ 300.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from dyprag.config import load_config
from dyprag.files import read_json
from dyprag.run.pipeline import run

PAPER_TRANSLATOR = ["translator.architecture=per_layer", "translator.embedding=retriever",
                    "data.extra_docs=0", "train.epochs=8", "train.w_kl=0.01", "train.w_mse=100"]
MODES = ["vanilla", "rag@1", "rag@3", "prag@1", "prag@3", "prag+rag@3", "dyprag@1", "dyprag@3",
         "dyprag+rag@3"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="checkpoints/world-bench", help="run root (empty)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py's")
    args = parser.parse_args()
    clean = not Path(args.out).exists()
    os.environ["DYPRAG_CACHE"] = str(Path(args.out) / "cache")  # empty: a machine's first run
    base = [f"run.root={args.out}", "run.name=world", *args.overrides]

    start = time.perf_counter()
    default = run(load_config(None, base))
    train_seconds = time.perf_counter() - start
    print(f"default train.py job: {train_seconds:.0f}s (clean directory: {clean})")
    start = time.perf_counter()
    run(load_config(None, [*base, "run.name=world-cached", "wandb.mode=disabled"]))
    train_seconds_cached = time.perf_counter() - start
    print(f"again, with the cache filled: {train_seconds_cached:.0f}s")

    results = run(load_config(None, [*base, f"eval.modes=[{','.join(MODES)}]", "wandb.mode=disabled"]))
    out = Path(args.out) / "world"
    paper = run(load_config(None, [*base, *PAPER_TRANSLATOR, "eval.modes=[dyprag@1]",
                                   "wandb.mode=disabled"]))
    print(json.dumps({
        "recall@1": round(results["recall@1"], 4), "recall@3": round(results["recall@3"], 4),
        "f1": {m: round(v, 4) for m, v in results["f1"].items()},
        "em": {m: round(v, 4) for m, v in results["em"].items()},
        "dyprag_irrelevant": round(results["dyprag_irrelevant"], 4),
        "delta_cosine": round(results["delta_cosine"], 4),
        "f1_paper_translator": {"dyprag@1": round(paper["f1"]["dyprag@1"], 4)},
        "translator_params": {"default": results["translator_params"],
                              "paper": paper["translator_params"]},
        "translator_fit_f1": {"default": results["translator_fit_f1"],
                              "paper": paper["translator_fit_f1"]},
        "f1_by_fact": {m: {a: round(v, 4) for a, v in by.items()}
                       for m, by in results.get("f1_by_fact", {}).items()},
        "pretrain_seconds": read_json(out / "base" / "pretrain.json")["seconds"],
        "bank_seconds": read_json(out / "bank" / "meta.json")["train_seconds"],
        "train_seconds": round(train_seconds, 1),
        "train_seconds_cached": round(train_seconds_cached, 1), "stage_seconds": default["stage_seconds"],
        "f1_default_job": default["f1"], "clean": clean}))


if __name__ == "__main__":
    main()
