"""Atomic writes under concurrency: two processes writing one path each publish a whole copy,
a cache entry another process published first is kept, and a killed writer's temporaries go."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dyprag.files import atomic_dir, atomic_write_text

WRITER = """
import sys, time
from pathlib import Path
from dyprag.files import atomic_dir, atomic_write_text
kind, target, go, tag = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
while not go.exists():
    time.sleep(0.005)
if kind == "file":
    for _ in range(200):
        atomic_write_text(target, tag * 50_000)
else:
    for _ in range(20):
        with atomic_dir(target, keep_existing=True) as tmp:
            tmp.mkdir(parents=True)
            for i in range(20):
                (tmp / f"part{i}").write_text(tag * 1000)
            time.sleep(0.01)
"""


def race(kind: str, target: Path, tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Start two real writers of ``target``; release them together; wait for both."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target), str(go), tag],
                              stderr=subprocess.PIPE, text=True) for tag in "ab"]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        p.wait(timeout=120)
    return procs


def test_two_processes_writing_one_file_each_publish_a_whole_copy(tmp_path):
    target = tmp_path / "out" / "meta.json"
    procs = race("file", target, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert target.read_text() in ("a" * 50_000, "b" * 50_000)
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]  # no temporaries


def test_two_processes_publishing_one_cache_entry_keep_one_whole_copy(tmp_path):
    target = tmp_path / "cache" / "model"
    procs = race("dir", target, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    texts = {p.read_text() for p in target.iterdir()}
    assert len(list(target.iterdir())) == 20 and texts in ({"a" * 1000}, {"b" * 1000})
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_copy_published_meanwhile_is_kept_or_replaced_as_asked(tmp_path):
    target = tmp_path / "entry"
    for keep, expected in ((True, "theirs"), (False, "mine")):
        with atomic_dir(target, keep_existing=keep) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text("mine")
            atomic_write_text(target / "f", "theirs")  # another process publishes first
        assert (target / "f").read_text() == expected
        assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
        (target / "f").unlink()
        target.rmdir()


def test_the_temporaries_of_a_killed_writer_are_removed_and_a_live_ones_kept(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"entry.tmp-{dead}", f"entry.old-{dead}", f"entry.tmp-{live.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights").write_text("x")
        (tmp_path / f"meta.tmp{dead}.json").write_text("x")  # atomic_path's, killed
        (tmp_path / f"meta.tmp{live.pid}.json").write_text("x")
        with atomic_dir(tmp_path / "entry") as tmp:
            tmp.mkdir()
        atomic_write_text(tmp_path / "meta.json", "{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "entry", f"entry.tmp-{live.pid}", "meta.json", f"meta.tmp{live.pid}.json"]
    finally:
        live.kill()
        live.wait()
