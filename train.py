"""Train DyPRAG's parameter translator end to end and print F1 by mode.

    python train.py                                   # the synthetic world on a CPU (minutes)
    python train.py train.epochs=2 run.name=quick     # key=value overrides of any config field
    python train.py --config configs/llama3.2-1b-2wqa.yaml train.devices=4 train.strategy=ddp

Stages, each cached under checkpoints/<run.name>/ and skipped when its inputs are unchanged:

  1. data        the corpus and QA files (or the synthetic world, generated from data.world)
  2. base        the base LLM (from_pretrained), or the world's tiny model, pretrained here
                 once per machine (kept in ~/.cache/dyprag/models, $DYPRAG_CACHE)
  3. index       embed the corpus (sentence-transformers) into a FAISS index
  4. augment     rewrites + QA pairs per training document (LLM prompts; templates in the world)
  5. bank        one FFN LoRA per training document (PRAG), many documents per step
  6. translator  Lightning fit of the hypernetwork: L = w_lm·LM + w_kl·KL + w_mse·MSE
  7. eval        the test questions in every mode of eval.modes → table, eval.json, f1.png, W&B

Interrupted? Run the same command again: finished stages are reused, the augmentation and the
bank continue where they stopped and the fit resumes from checkpoints/<run>/lightning/last.ckpt
(exactly: the same weights as a run that was never stopped).
A rerun of a finished run works in checkpoints/.<run>.attempt/ and replaces the run only when it
finishes, so a failed rerun leaves the finished run as it was. A stored file that is unreadable
(a truncated shard or checkpoint) is named in the error with the stage that owns it: rerun with
--rebuild STAGE to make that stage again.
Outputs: config.yaml (the resolved config) and eval.json (written last), f1.png, translator/
(safetensors + meta.json), bank/, logs/version_N/metrics.csv and samples.csv (one version per
attempt), wandb/ (offline unless W&B is configured). Errors print one line on stderr and exit
with code 2 (--debug for the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

from dyprag.config import Config, dump, load_config
from dyprag.rundir import STAGES, NotARun, RunBusy, lock, refuse_non_run, run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config fields and their defaults (override any with section.key=value):\n\n"
               + dump(Config()))
    parser.add_argument("--config", help="YAML run config (see configs/); default: the "
                                         "embedded synthetic-world job")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides; values are YAML (train.lr=1e-4, "
                             "eval.modes=[vanilla,dyprag@1])")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--rebuild", action="append", default=[], choices=STAGES,
                        metavar="STAGE", help="discard this stage's stored output and make it "
                        f"again (repeatable): {', '.join(STAGES)}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    args = parser.parse_intermixed_args(argv)  # overrides before and after options
    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"error: {err}")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _fail("error: start multi-device runs with `python train.py train.devices=N "
              "train.strategy=ddp`, not torchrun: Lightning starts the other processes once "
              "the stages before the fit are cached")
    if args.print_config:
        print(dump(config), end="")
        return
    try:
        refuse_non_run(run_dir(config.run))
        with lock(run_dir(config.run)):  # one writer per run, until the run is published
            _train(config, args)
    except (RunBusy, NotARun) as err:
        _fail(f"error: {err}")


def _fail(line: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    print(line, file=sys.stderr)
    sys.exit(2)


def _train(config, args) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.model.name == "world":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: no network probes
    # Lightning's info lines (an advert, "GPU available: False"), a deprecation warning it
    # raises itself under this torch, and its note on the resume checkpoint directory are
    # noise between the stages' own progress lines.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")

    from transformers.utils import logging as hf_logging

    from dyprag.answering.report import next_steps, table
    from dyprag.run.pipeline import StageError, run

    hf_logging.disable_progress_bar()  # its loading/saving bars say nothing here

    try:
        results = run(config, tuple(args.rebuild))
    except StageError as err:
        if args.debug:
            raise err.error from None
        _fail(f"error ({err.stage} stage): {err}")
    if results is not None:
        print(table(results))
        print(next_steps(run_dir(config.run), results))


if __name__ == "__main__":
    main()
