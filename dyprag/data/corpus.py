"""Read retrieval corpora as a stream of passages, and fingerprint them.

Two on-disk formats (docs/design.md §5), chosen by file name; either may be gzipped (``.gz``):

- jsonl: one ``{"id": str, "title": str, "text": str}`` object per line. ``title`` may be
  missing (empty title); a missing ``id`` becomes the 1-based line number, which is stable
  as long as the file does not change (and the fingerprint below says when it does).
- tsv: DPR's ``psgs_w100.tsv``, a header ``id<TAB>text<TAB>title`` then one passage per row,
  fields quoted the csv way (DPR's own loader uses ``csv.reader(delimiter="\\t")``).

Everything streams: a 21M-passage Wikipedia dump is never held in memory, only one line (or
one batch, for the callers that batch) at a time.

    for passage in iter_corpus("psgs_w100.tsv"):
        ...
    n = count_passages("corpus.jsonl")
    fp = corpus_fingerprint("corpus.jsonl")   # sha256 of the bytes: the cache key of an index
"""

from __future__ import annotations

import csv
import gzip
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dyprag.files import atomic_write_jsonl, file_sha256, iter_json_lines

FORMATS = ("jsonl", "tsv")


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of text: a DPR 100-word passage, a bio, a paragraph."""

    id: str
    title: str
    text: str

    def embedding_text(self) -> str:
        """What the embedder sees: the title on its own line when there is one (as DPR does)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


def corpus_format(path: str | os.PathLike) -> str:
    """``"jsonl"`` or ``"tsv"`` from the file name (``.jsonl``, ``.json``, ``.tsv``, each +``.gz``)."""
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    raise ValueError(f"{path}: unknown corpus format; name the file *.jsonl or *.tsv (optionally .gz)")


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return path


def _open_text(path: Path) -> IO[str]:
    # newline="" lets the csv module see the raw line ends, as its docs require.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _iter_jsonl(path: Path) -> Iterator[Passage]:
    with _open_text(path) as f:
        for lineno, row in iter_json_lines(f, path):
            text = row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field 'text' must be a string")  # noqa: TRY004
            title = row.get("title") or ""
            pid = row.get("id")
            yield Passage(id=str(lineno) if pid is None else str(pid), title=str(title), text=text)


def _iter_tsv(path: Path) -> Iterator[Passage]:
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader, None)
            if header is None:
                return
            columns = {name.strip().lower(): i for i, name in enumerate(header)}
            if "text" not in columns:
                raise ValueError(f"{path}:1: header must name the columns, e.g. 'id\\ttext\\ttitle'; "
                                 f"got {header!r}")
            i_id, i_text, i_title = columns.get("id"), columns["text"], columns.get("title")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{reader.line_num}: {len(row)} fields, header has "
                                     f"{len(header)}")
                pid = row[i_id] if i_id is not None else str(reader.line_num)
                title = row[i_title] if i_title is not None else ""
                yield Passage(id=pid, title=title, text=row[i_text])
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: {err}") from None


def iter_corpus(path: str | os.PathLike) -> Iterator[Passage]:
    """Yield every passage of a jsonl or DPR-tsv corpus, reading one line at a time.

    Raises FileNotFoundError for a missing file, ValueError naming file and line for a
    malformed line, and ValueError ``"no passages in ..."`` for an empty corpus (raised when
    the stream ends, so a consumer may already have seen nothing).
    """
    path = _check_file(path)
    reader = _iter_jsonl if corpus_format(path) == "jsonl" else _iter_tsv
    n = 0
    try:
        for passage in reader(path):
            n += 1
            yield passage
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # these name no file
        raise ValueError(f"{path}: truncated or not gzip after passage {n} ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text after passage {n} ({err})") from None
    if n == 0:
        raise ValueError(f"no passages in {path}")


def corpus_ids(path: str | os.PathLike) -> list[str]:
    """Every passage id, in corpus order; an id used twice is a ``ValueError`` naming it and
    both passages (an index holding it twice would show one passage's text for the other)."""
    ids: list[str] = []
    first: dict[str, int] = {}
    for number, passage in enumerate(iter_corpus(path), 1):
        if passage.id in first:
            raise ValueError(f"{path}: passage id {passage.id!r} is used by passage "
                             f"{first[passage.id]} and again by passage {number}; ids must be unique")
        first[passage.id] = number
        ids.append(passage.id)
    return ids


def read_passages(path: str | os.PathLike, ids: Iterable[str]) -> dict[str, Passage]:
    """The passages of ``ids`` that the corpus holds, by id in corpus order: one pass that
    stops once all are found, holding only those (a DPR corpus has 21M passages)."""
    wanted, found = set(ids), {}
    for passage in iter_corpus(path) if wanted else ():
        if passage.id in wanted and passage.id not in found:
            found[passage.id] = passage
            if len(found) == len(wanted):
                break
    return found


def iter_batches(passages: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    """Group a passage stream into lists of ``size`` (the last one shorter)."""
    assert size > 0, f"batch size must be positive, got {size}"
    batch: list[Passage] = []
    for passage in passages:
        batch.append(passage)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_passages(path: str | os.PathLike) -> int:
    """Number of passages, without parsing each one where the format allows.

    jsonl: non-blank lines, counted over raw bytes (a malformed line still counts; the
    reader reports it). tsv: csv rows after the header, since a quoted field may hold a newline.
    """
    path = _check_file(path)
    if corpus_format(path) == "jsonl":
        opener = gzip.open if path.name.endswith(".gz") else open
        n = 0
        with opener(path, "rb") as f:
            for line in f:
                n += bool(line.strip())
    else:
        with _open_text(path) as f:
            n = max(0, sum(1 for row in csv.reader(f, delimiter="\t") if row) - 1)
    if n == 0:
        raise ValueError(f"no passages in {path}")
    return n


def corpus_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex) of the file's bytes, read in 1 MiB chunks: the identity of a corpus.

    Indexes record it and refuse to load against another corpus. Hashing the bytes rather
    than the name or mtime means a copied corpus still matches and an edited one never does.
    """
    return file_sha256(_check_file(path))


def write_corpus_jsonl(passages: Iterable[Passage], path: str | os.PathLike) -> Path:
    """Write passages as jsonl through a temporary file and a rename; returns the path."""
    return atomic_write_jsonl(path, ({"id": p.id, "title": p.title, "text": p.text}
                                     for p in passages))
