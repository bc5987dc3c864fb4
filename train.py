"""Train DyPRAG's parameter translator end to end and print F1 by mode.

    python train.py                                   # the synthetic world on a CPU (minutes)
    python train.py train.epochs=2 run.name=quick     # key=value overrides of any config field
    python train.py --config configs/llama3.2-1b-2wqa.yaml train.devices=4 train.strategy=ddp

Stages, each cached under checkpoints/<run.name>/ and skipped when its inputs are unchanged:

  1. data        the corpus and QA files (or the synthetic world, generated from data.world)
  2. base        the base LLM (from_pretrained), or the world's tiny model, pretrained here
  3. index       embed the corpus (sentence-transformers) into a FAISS index
  4. augment     rewrites + QA pairs per training document (LLM prompts; templates in the world)
  5. bank        one FFN LoRA per training document (PRAG), many documents per step
  6. translator  Lightning fit of the hypernetwork: L = w_lm·LM + w_kl·KL + w_mse·MSE
  7. eval        the test questions in every mode of eval.modes → table, eval.json, W&B

Interrupted? Run the same command again: finished stages are reused, the augmentation and the
bank continue where they stopped and the fit resumes from checkpoints/<run>/lightning/last.ckpt.
Outputs: config.yaml (the resolved config), translator/ (safetensors + meta.json), bank/,
logs/metrics.csv, logs/samples.csv, wandb/ (offline unless W&B is configured), eval.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from dyprag.config import DEFAULTS, dump, load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config fields and their defaults (override any with section.key=value):\n\n"
               + dump(DEFAULTS))
    parser.add_argument("--config", help="YAML run config (see configs/); default: the "
                                         "embedded synthetic-world job")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides; values are YAML (train.lr=1e-4, "
                             "eval.modes=[vanilla,dyprag@1])")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        sys.exit("error: start multi-device runs with `python train.py train.devices=N "
                 "train.strategy=ddp`, not torchrun: Lightning starts the other processes once "
                 "the stages before the fit are cached")
    if args.print_config:
        print(dump(config), end="")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config["model"]["name"] == "world":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: no network probes
    # Lightning's info lines (an advert, "GPU available: False"), a deprecation warning it
    # raises itself under this torch, and its note on the resume checkpoint directory are
    # noise between the stages' own progress lines.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")

    from dyprag.pipeline import run, table

    results = run(config)
    if results is not None:
        print(table(results))


if __name__ == "__main__":
    main()
