"""A run's loggers: CSV always, W&B unless disabled; the final results into both.

- CSV: ``<run>/logs/version_N/metrics.csv``, a new ``N`` for every attempt (a rerun or a resume
  adds one, nothing is deleted), and ``samples.csv`` beside it;
- W&B: ``<run>/wandb/``, one run per attempt, offline unless the user configured W&B or set
  ``wandb.mode=online``; evaluate.py's grid (``log_grid``) as a W&B run of its own beside its
  reports.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from dyprag.config import Config
from dyprag.files import atomic_write_text
from dyprag.rundir import LOGS


def wandb_mode(config: Config) -> str:
    """``wandb.mode``, else WANDB_MODE, else online only when the user has an API key; also
    made the process's W&B mode (WANDB_MODE): W&B's telemetry follows the process's settings,
    not the run's, and otherwise probes W&B's servers from an offline run."""
    mode = config.wandb.mode or os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline")
    os.environ["WANDB_MODE"] = mode
    return mode


def make_loggers(config: Config, out: Path) -> list[Logger]:
    """CSV always (a new ``logs/version_N/`` per attempt: Lightning's CSV logger deletes the
    metrics file of the directory it is given); W&B unless ``wandb.mode`` is 'disabled'.
    Offline unless asked for online or the user configured W&B (WANDB_MODE / WANDB_API_KEY),
    so nothing probes the network."""
    loggers: list[Logger] = [CSVLogger(out, name=LOGS)]
    w, mode = config.wandb, wandb_mode(config)
    if mode != "disabled":
        loggers.append(WandbLogger(project=w.project, name=w.name or config.run.name,
                                   save_dir=str(out), offline=mode != "online",
                                   config=config.to_dict()))
    return loggers


DEPENDENCE = ("dyprag_irrelevant", "delta_cosine")  # dyprag.answering.answer.document_dependence's keys


def log_results(loggers: list[Logger], results: dict) -> None:
    """Eval F1/EM/acc by mode and the translator's document dependence into every logger; the
    sample answers as a W&B table and as ``samples.csv`` beside the CSV logger's
    ``metrics.csv``."""
    metrics = {f"eval/{m}/{mode}": v for m in ("f1", "em", "acc") for mode, v in results[m].items()}
    metrics.update({f"eval/{k}": results[k] for k in DEPENDENCE if k in results})
    metrics.update({f"eval/translator_fit_f1/{k}": v
                    for k, v in results.get("translator_fit_f1", {}).items() if v is not None})
    metrics.update({f"eval/f1_by_fact/{mode}/{fact}": v
                    for mode, by in results.get("f1_by_fact", {}).items() for fact, v in by.items()})
    samples = results["samples"]
    columns = list(samples[0]) if samples else []
    for logger in loggers:
        logger.log_metrics(metrics)
        if isinstance(logger, WandbLogger) and samples:
            logger.log_table("eval/samples", columns=columns,
                             data=[[str(s[c]) for c in columns] for s in samples])
            logger.experiment.summary.update(metrics)
        logger.save()
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # flushes the run file; a later run starts a new one
    csv_dirs = [Path(logger.log_dir) for logger in loggers if isinstance(logger, CSVLogger)]
    if samples and csv_dirs:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(samples)
        atomic_write_text(csv_dirs[0] / "samples.csv", text.getvalue())


def log_grid(config: Config, out: Path, grid: dict, modes: list[str], dependence: dict) -> None:
    """evaluate.py's grid (dataset → mode → scores) as a W&B table, with F1/acc and the document
    dependence in the run's summary; its W&B files under the report directory ``out``."""
    w, mode = config.wandb, wandb_mode(config)
    if mode == "disabled":
        return
    import wandb

    with wandb.init(project=w.project, name=f"{w.name or config.run.name}-eval",
                    dir=str(out), mode=mode, job_type="eval") as wb:
        columns = ["dataset", "mode", "em", "f1", "acc", "ms_per_question"]
        rows = [[name, m, s[m]["em"], s[m]["f1"], s[m]["acc"], s[m]["ms_per_question"]]
                for name, s in grid.items() for m in modes]
        wb.log({"eval/grid": wandb.Table(columns=columns, data=rows)})
        wb.summary.update({f"eval/{key}/{name}/{m}": s[m][key] for key in ("f1", "acc")
                           for name, s in grid.items() for m in modes})
        wb.summary.update({f"eval/{key}/{name}": v for name, d in dependence.items()
                           for key, v in d.items()})
