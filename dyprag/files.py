"""Small file helpers shared by every stage: atomic writes, and reads with clear errors.

Every output is written to a temporary name beside its destination and renamed into place,
so an interrupted run never leaves a half-written file under the final name, and a file
hard-linked into a rerun's staging directory (``rundir``) is replaced, never written through.
A stored file that cannot be read raises ``Unreadable`` naming it. Nothing here imports torch
at import time.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class Unreadable(ValueError):
    """A stored file that exists but cannot be read (truncated, corrupt); ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path} is unreadable ({reason})")
        self.path = Path(path)


def fingerprint(data: Any) -> str:
    """A short stable hash of JSON-serialisable ``data`` (dict key order does not matter):
    the cache key that every stage stores beside its output."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_cached(meta: str | os.PathLike, key: str) -> bool:
    """A stage's output is up to date: its meta file (written last) records ``key``, the
    fingerprint of the inputs it was made from. An unreadable meta file raises ``Unreadable``."""
    meta = Path(meta)
    return meta.is_file() and read_json(meta).get("fingerprint") == key


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside ``path``, unique to this process (same suffix, so writers
    that go by it still work), renamed over ``path`` when the block ends without error and
    removed when it raises; parent directories are created. Temporaries left by killed
    processes are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path.parent, f"{path.stem}.tmp", path.suffix)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (parents created)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write one JSON value per line (UTF-8 as is), streaming, atomically; creates the parent
    directory. If ``rows`` raises, ``path`` is left as it was and no temporary file remains."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON object, with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Unreadable(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_meta(directory: str | os.PathLike, fmt: str, what: str,
              base_model: str | None = None) -> dict:
    """``directory/meta.json`` of a saved artifact (a LoRA, a bank, a translator).

    Refuses a meta.json of another ``format``, and, with ``base_model``, one that names
    another base model (``what`` names the artifact in the message).
    """
    directory = Path(directory)
    meta = read_json(directory / "meta.json")
    if meta.get("format") != fmt:
        raise ValueError(f"{directory / 'meta.json'}: format is {meta.get('format')!r}, "
                         f"expected {fmt!r}")
    if base_model is not None and meta.get("base_model") not in (None, base_model):
        raise ValueError(f"{what} {directory} was made for base model {meta['base_model']!r}, "
                         f"not {base_model!r}")
    return meta


def iter_json_lines(lines: Iterable[str], where: str | os.PathLike,
                    error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a jsonl stream.

    A line that is not JSON, or not a JSON object, raises ``error`` naming ``where`` and the
    line number. The caller opens the file (plain, gzip, BOM-aware, ...) and passes its lines.
    """
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}:{lineno}: not valid JSON: {err}") from None
        if not isinstance(obj, dict):
            raise error(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _safetensors(path: str | os.PathLike, read):
    """``read(str(path))`` of a safetensors file; ``Unreadable`` when it is truncated or
    corrupt, FileNotFoundError when it is missing."""
    from safetensors import SafetensorError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return read(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise Unreadable(path, str(err).splitlines()[0]) from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Every tensor of a safetensors file."""
    from safetensors.torch import load_file

    return _safetensors(path, lambda p: load_file(p, device=device))


def open_safetensors(path: str | os.PathLike):
    """``safe_open(path)``, for lazy reads of single tensors."""
    from safetensors import safe_open

    return _safetensors(path, lambda p: safe_open(p, "pt"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """A fresh temporary directory path beside ``path``, unique to this process (not created:
    a writer such as ``save_pretrained`` or ``copytree`` makes it), which replaces ``path``
    when the block ends without error and is removed when it raises. The replaced directory is
    renamed aside, then removed: its files are unlinked, never written through (they may be
    hard links of a finished run's). ``keep_existing``: when ``path`` exists at the end (a
    cache entry another process published meanwhile: the same content, by its key), it is
    kept and this copy dropped. Temporaries left by killed processes are removed."""
    path = Path(path)
    for kind in ("tmp", "old"):
        _sweep(path.parent, f"{path.name}.{kind}-")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_existing and path.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:  # published by another process after the check above
        shutil.rmtree(tmp, ignore_errors=True)
        if not (keep_existing and path.exists()):
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def flock(path: Path, shared: bool, busy: Callable[[int], None]):
    """Hold a ``flock`` on ``path`` (made when missing) for the ``with`` block, which gets its
    file descriptor. Where another process holds it, ``busy(fd)`` is called first: it raises,
    or the lock is waited for."""
    import fcntl  # POSIX only: imported where a lock is taken

    kind = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        if not shared:
            raise
        yield  # unlocked: in a directory this user cannot write, no writer of this user either
        return
    try:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            busy(fd)
            fcntl.flock(fd, kind)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _sweep(parent: Path, prefix: str, suffix: str = "") -> None:
    """Remove the entries ``<prefix><pid><suffix>`` of ``parent`` whose process is gone: the
    temporaries of a writer that was killed (a SIGKILL skips every ``finally``)."""
    for stale in parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        pid = stale.name[len(prefix):len(stale.name) - len(suffix)]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def linked_copy(src: str | os.PathLike, dst: str | os.PathLike, ignore=None,
                keep_existing: bool = False) -> None:
    """``src`` as a new directory ``dst``, atomically (``atomic_dir``, ``keep_existing`` as
    there), its files hard-linked where the filesystem allows, else copied; ``ignore`` as
    ``shutil.copytree``'s. Safe because every writer here replaces a file or ``unshare``s it
    first, never writes through a link."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    with atomic_dir(dst, keep_existing) as tmp:
        shutil.copytree(src, tmp, symlinks=True, copy_function=link_or_copy, ignore=ignore)


def unshare(path: str | os.PathLike) -> None:
    """Before writing into ``path`` in place (appending), give it an inode of its own when it
    is hard-linked (a rerun's staging copy shares its files with the finished run)."""
    path = Path(path)
    if path.is_file() and path.stat().st_nlink > 1:
        with atomic_path(path) as tmp:
            shutil.copyfile(path, tmp)
