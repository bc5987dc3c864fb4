"""A run directory, ``<run.root>/<run.name>/``: what is where (the corpus, the questions and
their test split, the base model, the stored document embeddings), which run is the latest,
and how a rerun replaces a finished run without ever breaking it. The stages that write a run
(``dyprag.run.pipeline``) and the code that reads one (``dyprag.run.trained_run``, ``evaluate.py``)
both go through here.

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
    translator  translator/, lightning/      the translator; its resume checkpoint (until saved)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dyprag.config import DataConfig, RunConfig
from dyprag.data.qa import QAExample, load_qa
from dyprag.files import atomic_write_json, flock, linked_copy, read_json

if TYPE_CHECKING:
    from dyprag.retrieval.embed import EmbeddingTable

# What each stage writes, by name inside the run directory.
WORLD, BASE, INDEX = "world", "base", "index"
AUGMENTED, AUGMENTED_EVAL = "augmented.jsonl", "augmented-eval.jsonl"  # + ".json" markers
BANK, BANK_EVAL = "bank", "bank-eval"  # training documents' LoRAs; the test documents'
TRANSLATOR, CHECKPOINTS = "translator", "lightning"
CONFIG, FINISHED, PLOT = "config.yaml", "eval.json", "f1.png"
REPORTS = "eval"  # evaluate.py's reports on the run (report.md, predictions.jsonl, ...)
# Written last when a run finishes, or about the finished run: a rerun's staging copy leaves
# them out, so a rerun never publishes another translator's reports.
DESCRIBES_THE_RUN = (CONFIG, FINISHED, PLOT, REPORTS)
LOGS, WANDB = "logs", "wandb"  # dyprag.run.loggers
# Says that a directory is a dyprag run (written when its first attempt begins): only a run is
# ever written into or deleted from. A run written before the marker existed holds only the
# names below and is recognised by them.
MARKER = "dyprag-run.json"
STAGE_PATHS: dict[str, tuple[str, ...]] = {
    "data": (WORLD,),
    "base": (BASE,),
    "index": (INDEX,),
    "augment": (AUGMENTED, f"{AUGMENTED}.json", AUGMENTED_EVAL, f"{AUGMENTED_EVAL}.json"),
    "bank": (BANK, BANK_EVAL),
    "translator": (TRANSLATOR, CHECKPOINTS),
}
STAGES = tuple(STAGE_PATHS)
_RUN_NAMES = {MARKER, LOGS, WANDB, *DESCRIBES_THE_RUN, *(n for ns in STAGE_PATHS.values() for n in ns)}


# infer.py's and evaluate.py's --embedder.
EMBEDDER_HELP = ("the model id or path of the run's embedder, when it is not the packaged "
                 "all-MiniLM-L6-v2: a run's metadata names its embedder, but only one you name "
                 "is loaded (a run directory is data, not code)")


def run_dir(run: RunConfig) -> Path:
    """The finished run's directory, ``run.root/run.name``; where it is a symlink, the
    directory it points to (a rerun's staging copy and publication happen beside that one,
    and the link stays)."""
    return _target(Path(run.root) / run.name)


def _target(run: Path) -> Path:
    """``run``, or the directory it points to when it is a symlink."""
    return run.resolve() if run.is_symlink() else run


class NotARun(ValueError):
    """A directory where a run would go that holds something else."""


def refuse_non_run(final: Path) -> None:
    """Raise ``NotARun`` unless ``final`` is missing, empty, or a dyprag run: nothing is ever
    written into or deleted from another directory."""
    if not final.exists():
        return
    if not final.is_dir():
        raise NotARun(f"{final} is a file, not a run directory: choose another run.name")
    entries = set(os.listdir(final))
    if not entries or MARKER in entries or entries <= _RUN_NAMES:
        return
    others = ", ".join(sorted(entries - _RUN_NAMES)[:3])
    raise NotARun(f"{final} is not a dyprag run (no {MARKER}; it holds {others}), so nothing "
                  "is written into it: choose another run.name or run.root (a run of an older "
                  f"dyprag: add an empty {MARKER})")


class RunBusy(OSError):
    """Another process is writing the run."""


@contextlib.contextmanager
def reading(run: Path):
    """Read the run for the ``with`` block: ``publish`` waits until no process reads it, and
    this waits while one publishes, so a reader never sees a run half-replaced or missing
    (a shared ``flock`` on ``.<name>.readers`` beside it). Where there is no run to read,
    nothing is locked or made."""
    run = _target(Path(run))
    if not (run.exists() or _old(run).exists()):  # .old: between a publication's renames
        yield
        return
    with flock(_beside(run, "readers"), shared=True, busy=lambda fd: None):
        yield


def _beside(run: Path, what: str) -> Path:
    """``.<name>.<what>`` beside the run (where a symlinked run points)."""
    run = _target(run)
    run.parent.mkdir(parents=True, exist_ok=True)
    return run.parent / f".{run.name}.{what}"


@contextlib.contextmanager
def lock(run: Path):
    """Hold the run's writer lock (``flock`` on ``.<name>.lock`` beside it) for the ``with``
    block, or raise ``RunBusy`` naming the process that holds it. The other ranks of a
    multi-device fit (``LOCAL_RANK`` > 0) work under rank 0's."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return

    def refuse(fd: int) -> None:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise RunBusy(f"run {run} is being written by process {holder}; wait for it to end or "
                      "use another run.name") from None  # not the BlockingIOError behind it

    with flock(_beside(run, "lock"), shared=False, busy=refuse) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield


# ---- what a run holds -------------------------------------------------------------------------
def corpus_path(data: DataConfig, run: Path) -> Path:
    """The corpus the run retrieves from: the world's (generated into the run) or
    ``data.corpus``."""
    return run / WORLD / "corpus.jsonl" if data.kind == "world" else Path(data.corpus)


def questions(data: DataConfig, run: Path) -> tuple[list[QAExample], list[QAExample]]:
    """The run's ``(training, test)`` questions: the world's splits, or ``data.train_qa`` and
    ``data.test_qa`` (the first ``data.train_questions`` / ``data.test_questions``). When the
    two are one file (PRAG's dev sets), its first ``test_questions`` test and the next
    ``train_questions`` train."""
    n_train, n_test = data.train_questions, data.test_questions
    if data.kind == "world":
        return (load_qa(run / WORLD / "qa_train.jsonl", limit=n_train),
                load_qa(run / WORLD / "qa_test.jsonl", limit=n_test))
    for key in ("corpus", "train_qa", "test_qa"):
        if not Path(getattr(data, key)).is_file():
            raise FileNotFoundError(f"data.{key}: {getattr(data, key)} does not exist")
    if Path(data.train_qa).resolve() == Path(data.test_qa).resolve():
        if n_test is None:
            raise ValueError("data.test_questions: required when train_qa and test_qa are "
                             "the same file (the first ones test, the rest train)")
        every = load_qa(data.test_qa, data.qa_format, None if n_train is None else n_test + n_train)
        return every[n_test:], every[:n_test]
    return (load_qa(data.train_qa, data.qa_format, n_train),
            load_qa(data.test_qa, data.qa_format, n_test))


def first(test: list[QAExample], limit: int | None) -> list[QAExample]:
    """The evaluated questions of a test split: its first ``limit`` (``eval.limit``, or
    evaluate.py's ``--limit``), never a training question."""
    return test[:limit] if limit else test


def world_model_id(base: Path) -> str:
    """The id banks and translators record for the world's pretrained model in ``base``."""
    return f"world:{read_json(base / 'pretrain.json')['fingerprint']}"


def base_model(name: str, run: Path) -> tuple[str, str]:
    """``(path or hub id to load, model id recorded in banks and checkpoints)`` of
    ``model.name``: the world's model pretrained into ``run/base``, or the name itself."""
    if name == "world":
        return str(run / BASE), world_model_id(run / BASE)
    return name, name


def embedding_files(run: Path, source: str) -> tuple[Path, Path]:
    """``(vectors .npy, meta .json)`` of the ``llm`` or ``tokens`` document embeddings stored
    beside the index."""
    return run / INDEX / f"{source}-embeddings.npy", run / INDEX / f"{source}-embeddings.json"


def read_embeddings(run: Path, source: str) -> EmbeddingTable:
    """The ``llm`` or ``tokens`` document embeddings stored in the run (memory-mapped)."""
    import numpy as np

    from dyprag.retrieval.embed import EmbeddingTable

    vectors, meta = embedding_files(run, source)
    meta = read_json(meta)
    return EmbeddingTable(meta["ids"], np.load(vectors, mmap_mode="r"), meta["embedder"])


def is_finished(path: str | os.PathLike) -> bool:
    return (Path(path) / FINISHED).is_file()


def latest_run(root: str | os.PathLike = RunConfig.root) -> Path:
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
    refuse_non_run(final)
    recover(final)
    if not is_finished(final):
        out = final
    else:
        out = _attempt(final)
        if not out.exists():
            linked_copy(final, out, ignore=lambda d, names: [
                n for n in names if Path(d) == final and n in DESCRIBES_THE_RUN])
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        atomic_write_json(out / MARKER, {"format": MARKER})
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
    def wait(_: int) -> None:
        print(f"[dyprag] waiting for the processes reading {final} (infer.py, evaluate.py) to "
              "end before replacing it", flush=True)

    with flock(_beside(final, "readers"), shared=False, busy=wait):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(out, final)
        shutil.rmtree(old)
