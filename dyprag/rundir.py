"""A run directory, ``<run.root>/<run.name>/``: where a run's stages write, which run is the
latest, and how a rerun replaces a finished run without ever breaking it.

A run is *finished* once it holds ``eval.json``, written last together with ``config.yaml``
(both describe the finished run, so neither is written before it finishes). A first attempt
writes in place. A rerun of a finished run works in a sibling staging directory,
``.<name>.attempt/``, which starts as a hard-linked copy of the finished run (no data is
copied) without its ``config.yaml`` and ``eval.json``: its stages reuse what still matches and
rebuild the rest. Every writer replaces a file by renaming a new one over it, or unlinks it
first (``files.unshare``), so a file of the finished run is never written through a link.
When the attempt finishes, two renames make it the run. A failed or killed rerun therefore
leaves the finished run exactly as it was (``infer.py`` keeps answering with it), and its
staging directory is where the next attempt continues.

Stages and the paths they own (``--rebuild STAGE`` removes these before the run):

    data        world/                       the synthetic world (data.kind world)
    base        base/                        the world's pretrained base model
    index       index/                       FAISS / BM25 index and stored embeddings
    augment     augmented*.jsonl(.json)      rewrites and QA pairs (training, eval documents)
    bank        bank/, bank-eval/            PRAG's per-document LoRAs
    translator  translator/, lightning/      the translator and its resume checkpoint
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dyprag.files import atomic_dir

FINISHED = "eval.json"
DESCRIBES_THE_RUN = ("config.yaml", "eval.json")  # written last, when a run finishes
STAGE_PATHS: dict[str, tuple[str, ...]] = {
    "data": ("world",),
    "base": ("base",),
    "index": ("index",),
    "augment": ("augmented.jsonl", "augmented.jsonl.json",
                "augmented-eval.jsonl", "augmented-eval.jsonl.json"),
    "bank": ("bank", "bank-eval"),
    "translator": ("translator", "lightning"),
}
STAGES = tuple(STAGE_PATHS)


def run_dir(config: dict) -> Path:
    """The finished run's directory for ``config``."""
    return Path(config["run"]["root"]) / config["run"]["name"]


def is_finished(path: str | os.PathLike) -> bool:
    return (Path(path) / FINISHED).is_file()


def latest_run(root: str | os.PathLike = "checkpoints") -> Path:
    """The finished run under ``root`` whose translator was saved last (staging directories,
    whose names start with a dot, are not runs)."""
    runs = sorted((p for p in Path(root).glob("*/translator/meta.json")
                   if not p.parent.parent.name.startswith(".")
                   and is_finished(p.parent.parent)), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no finished run under {root}/ (run `python train.py` first, "
                                "or pass --run)")
    return runs[-1].parent.parent


def owning_stage(path: str | os.PathLike, final: Path) -> str | None:
    """The stage whose output ``path`` is (in the run or its staging copy), if any."""
    for base in (final, _attempt(final)):
        try:
            first = Path(path).resolve().relative_to(base.resolve()).parts[0]
        except (ValueError, IndexError):
            continue
        return next((s for s, names in STAGE_PATHS.items() if first in names), None)
    return None


def _attempt(final: Path) -> Path:
    return final.with_name(f".{final.name}.attempt")


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover(final: Path) -> None:
    """Finish or undo a publication that a crash cut between its two renames."""
    old, attempt = _old(final), _attempt(final)
    if not final.exists() and old.exists():
        os.replace(attempt if is_finished(attempt) else old, final)
    if final.exists() and old.exists():
        shutil.rmtree(old)


def begin(final: Path, rebuild: tuple[str, ...] = (), main_process: bool = True) -> Path:
    """The directory this attempt's stages write: ``final`` itself while no finished run is
    there, else the staging copy (made once, then reused by later attempts until one
    finishes). ``rebuild``: stages whose outputs are removed from it first. Only the main
    process creates or removes anything; the others of a multi-process fit only read."""
    if not main_process:
        attempt = _attempt(final)
        return attempt if attempt.exists() else final
    recover(final)
    if not is_finished(final):
        out = final
    else:
        out = _attempt(final)
        if not out.exists():
            with atomic_dir(out) as tmp:
                shutil.copytree(final, tmp, symlinks=True, copy_function=os.link,
                                ignore=lambda d, names: [n for n in names if Path(d) == final
                                                         and n in DESCRIBES_THE_RUN])
    out.mkdir(parents=True, exist_ok=True)
    for stage in rebuild:
        for name in STAGE_PATHS[stage]:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return out


def publish(out: Path, final: Path) -> None:
    """Make the finished attempt ``out`` the run at ``final`` (nothing to do when it was
    written in place): two renames, then the replaced run is removed."""
    if out == final:
        return
    old = _old(final)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(out, final)
    shutil.rmtree(old)
