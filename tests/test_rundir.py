"""Where a run is written: only into a dyprag run (its marker, or an older run's own names),
never into another directory; a symlinked run is rerun beside its target and stays linked."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import exits_with_one_line, run_files

import train
from dyprag.config import load_config
from dyprag.rundir import FINISHED, MARKER, NotARun, begin, publish, run_dir


def finished_run(path: Path, text: str) -> Path:
    """A run directory as ``publish`` leaves it (files only; no stage ran)."""
    (path / "translator").mkdir(parents=True)
    (path / "translator" / "weights").write_text(text)
    (path / "config.yaml").write_text("{}\n")
    (path / FINISHED).write_text("{}\n")
    return path


@pytest.fixture
def notes(tmp_path) -> Path:
    """A directory of someone's own files, one of them named like a stage's output."""
    (tmp_path / "notes" / "index").mkdir(parents=True)
    (tmp_path / "notes" / "index" / "todo.txt").write_text("mine")
    (tmp_path / "notes" / "paper.tex").write_text("mine too")
    return tmp_path / "notes"


def test_begin_never_writes_into_or_deletes_from_a_directory_that_is_not_a_run(notes):
    before = run_files(notes)
    for rebuild in ((), ("index",)):
        with pytest.raises(NotARun, match=f"{notes} is not a dyprag run.*paper.tex"):
            begin(notes, rebuild)
        assert run_files(notes) == before and not (notes / MARKER).exists()


def test_train_refuses_a_directory_that_is_not_a_run_with_exit_2(notes, capsys):
    before = run_files(notes)
    exits_with_one_line(capsys, lambda: train.main([f"run.root={notes.parent}", "run.name=notes",
                                                    "--rebuild", "index"]),
                        "not a dyprag run", alone=True)
    assert run_files(notes) == before


def test_a_run_from_before_the_marker_is_recognised_by_its_names_and_then_marked(tmp_path):
    run = finished_run(tmp_path / "old", "w")
    (run / "logs").mkdir()
    out = begin(run)
    assert out == tmp_path / ".old.attempt" and (out / MARKER).is_file()
    (run / "paper.tex").write_text("mine")  # not a run's name, and no marker: refused
    with pytest.raises(NotARun):
        begin(run)


def test_a_marked_run_may_hold_other_files(tmp_path):
    run = tmp_path / "mine"
    begin(run)
    (run / "notes.txt").write_text("kept")
    assert begin(run) == run and (run / "notes.txt").read_text() == "kept"


def test_a_publication_cut_by_a_crash_is_finished_or_undone(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "eval.json").write_text("{}")
    (final / MARKER).write_text("{}")
    (final / "a").write_text("old")
    out = begin(final)  # a rerun's staging copy: hard links, without the run's description
    assert out != final and not (out / "eval.json").exists()
    assert os.stat(out / "a").st_ino == os.stat(final / "a").st_ino
    (out / "a.tmp").write_text("new")
    os.replace(out / "a.tmp", out / "a")  # a writer replaces, so the run keeps its file
    assert (final / "a").read_text() == "old"
    os.replace(final, tmp_path / ".run.old")  # crash after the first rename, unfinished attempt
    begin(final)
    assert (final / "a").read_text() == "old"
    (out / "eval.json").write_text("{}")  # now finished: the cut publication completes
    os.replace(final, tmp_path / ".run.old")
    assert begin(final) != final and (final / "a").read_text() == "new"
    publish(begin(final, rebuild=("bank",)), final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.readers", "run"]


def test_a_symlinked_run_is_rerun_beside_its_target_and_stays_linked(tmp_path):
    target = finished_run(tmp_path / "disk" / "tiny", "first")
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "tiny").symlink_to(target)
    config = load_config(None, [f"run.root={root}", "run.name=tiny"])
    for text in ("second", "third"):  # every rerun, not only the first
        final = run_dir(config.run)
        out = begin(final)
        assert out.parent == target.parent
        (out / "translator" / "weights").unlink()
        (out / "translator" / "weights").write_text(text)
        (out / FINISHED).write_text("{}\n")
        publish(out, final)
        assert (root / "tiny").is_symlink() and (root / "tiny").resolve() == target
        assert (root / "tiny" / "translator" / "weights").read_text() == text
    assert sorted(p.name for p in target.parent.iterdir()) == [".tiny.readers", "tiny"]


READER = """
import sys
from pathlib import Path
from dyprag.rundir import reading
run, stop = Path(sys.argv[1]), Path(sys.argv[2])
reads = 0
while not stop.exists():
    with reading(run):  # both files of one run, never a missing one
        weights = (run / "translator" / "weights").read_text()
        assert (run / "eval.json").read_text() == weights, weights
    reads += 1
print(reads)
"""


def test_a_reader_never_sees_a_run_missing_or_half_replaced_while_reruns_publish(tmp_path):
    final = finished_run(tmp_path / "run", "0")
    (final / FINISHED).write_text("0")
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(final), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the reader is reading
        for i in range(1, 40):
            out = begin(final)
            (out / "translator" / "weights").unlink()
            (out / "translator" / "weights").write_text(str(i))
            time.sleep(0.005)
            (out / FINISHED).write_text(str(i))
            publish(out, final)
    finally:
        stop.touch()
        stdout, stderr = reader.communicate(timeout=60)
    assert reader.returncode == 0, stderr
    assert int(stdout) > 40
    assert (final / FINISHED).read_text() == "39"
