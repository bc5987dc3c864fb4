"""Download the paper's datasets to where the configs read them.

    python -m dyprag.data fetch paper                       # all five, into data/
    python -m dyprag.data fetch 2wqa hotpotqa --to /big/disk/data

``DATASETS`` is the one table of what comes from where (URLs, destinations, published sizes
and checksums, licences); docs/datasets.md describes it for people. Each download

- goes to ``<name>.part`` beside its destination; where its sha256 is recorded, a cut
  download continues from there with an HTTP Range request when the same command is run
  again (without one, it starts over: a part of a file since changed would pass unnoticed);
  a lock held from the download through the installation keeps two fetches apart;
- is verified: its size and sha256 where the table records them, else the size the server
  announced, and then the dyprag loader that will read it (``dyprag.data.qa``, ``dyprag.data.corpus``)
  must read it;
- is put in place atomically (``files.atomic_path``): a ``.gz`` is decompressed, streaming,
  into place, a ``.zip`` gives only the files needed, and the archive is removed after (an
  interrupted decompression keeps it: the next run starts from the verified download).

A dataset whose files are all there is skipped without a request. Sources are tried in the
table's order (the publisher's first, then mirrors); one that does not answer, or answers with
another file, gives way to the next. A failure is one line on stderr and exit
status 2; a dataset none of whose sources answers within ``REACH_BUDGET`` seconds is given up,
and the line names the URL and where to put the file by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm.auto import tqdm

from dyprag.data.corpus import iter_corpus
from dyprag.data.qa import load_2wqa, load_qa
from dyprag.files import atomic_path, file_sha256, flock

CONNECT_TIMEOUT = 10.0  # seconds for one server to answer (and, once streaming, per read)
REACH_BUDGET = 25.0     # seconds for all of a dataset's sources to be tried before giving up
CHECK_QUESTIONS = 10    # the questions the loader must read from a fetched file
CHUNK = 1 << 20
_BYTES = dict(unit="B", unit_scale=True, unit_divisor=1000)  # the bars' sizes in human()'s units
USER_AGENT = "dyprag-data/0.1 (python urllib)"


@dataclass(frozen=True)
class Source:
    """One place a dataset can be downloaded from."""

    url: str
    size: int | None = None    # bytes of the download, where published
    sha256: str | None = None  # of the download, where published; None: only the size is checked
    # A .zip's members to extract, one per Dataset.files entry, matched by path or path ending.
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """A dataset's files, where they come from, and what they are."""

    files: tuple[str, ...]       # relative to --to: where the configs read them
    check: str                   # the QA format of files[0] (dyprag.data.qa), or "corpus"
    sources: tuple[Source, ...]  # tried in order: the publisher's first, then mirrors
    licence: str
    home: str
    disk: str                    # the disk the files need, and the download meanwhile


# The one table. Sizes and checksums are the publishers' (or a registry's record of the same
# URL); where none is published the field is None and the size the server announces is
# checked instead. Where each entry comes from: docs/datasets.md.
DATASETS: dict[str, Dataset] = {
    "2wqa": Dataset(
        files=("2wikimultihopqa/dev.json", "2wikimultihopqa/id_aliases.json"),
        check="2wqa",
        sources=(
            # The README of Alab-NII/2wikimultihop (the dataset with answer_id, April 7 2021
            # fix), as PRAG's and DyPRAG's READMEs give it; ?dl=1 asks Dropbox for the file.
            Source("https://www.dropbox.com/s/ms2m13252h6xubs/data_ids_april7.zip?dl=1",
                   members=("dev.json", "id_aliases.json")),
        ),
        licence="Apache-2.0",
        home="https://github.com/Alab-NII/2wikimultihop",
        disk="size not published (the zip's is shown as its download starts)",
    ),
    "hotpotqa": Dataset(
        files=("hotpotqa/hotpot_dev_distractor_v1.json",),
        check="hotpotqa",
        sources=(
            # PRAG's README; size and sha256 as huggingface/datasets' hotpot_qa recorded them.
            Source("http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json",
                   size=46_320_117,
                   sha256="4e9ecb5c8d3b719f624d66b60f8d56bf227f03914f5f0753d6fa1b359d7104ea"),
        ),
        licence="CC BY-SA 4.0",
        home="https://hotpotqa.github.io/",
        disk="46.3 MB",
    ),
    "popqa": Dataset(
        files=("popqa/popQA.tsv",),
        check="popqa",
        sources=(
            # The authors' repository (PRAG's README links its blob page; this is the raw file).
            Source("https://raw.githubusercontent.com/AlexTMallen/adaptive-retrieval/main/data/popQA.tsv"),
            # The co-author's Hugging Face copy (the same TSV, named test.tsv there).
            Source("https://huggingface.co/datasets/akariasai/PopQA/resolve/main/test.tsv"),
        ),
        licence="MIT (the authors' repository)",
        home="https://github.com/AlexTMallen/adaptive-retrieval",
        disk="5.2 MB",
    ),
    "cwq": Dataset(
        files=("cwq/ComplexWebQuestions_dev.json",),
        check="cwq",
        sources=(
            # The authors' repository alontalmor/WebAsKB (README, since "ComplexWebQuestions
            # version 1.1"): the question-answer part of the dataset in Data.zip.
            Source("https://www.dropbox.com/s/440f4096rkeo7xc/Data.zip?dl=1",
                   members=("complex_web_questions/ComplexWebQuestions_dev.json",)),
            # A copy of the file in LHRLAB/ChatKBQA.
            Source("https://raw.githubusercontent.com/LHRLAB/ChatKBQA/main/data/CWQ/origin/"
                   "ComplexWebQuestions_dev.json"),
        ),
        licence="not stated by the authors",
        home="https://www.tau-nlp.sites.tau.ac.il/compwebq",
        disk="5.5 MB, + the authors' Data.zip (size not published) while fetching",
    ),
    "dpr-wiki": Dataset(
        files=("dpr/psgs_w100.tsv",),
        check="corpus",
        sources=(
            # DPR's download_data.py; size and sha256 as huggingface/datasets' wiki_dpr recorded them.
            Source("https://dl.fbaipublicfiles.com/dpr/wikipedia_split/psgs_w100.tsv.gz",
                   size=4_694_541_059,
                   sha256="c39b020c855a2b5c25ffef3abe4a3b6f9b829ad7dbc14ec3d163d34d7c53ea8d"),
        ),
        licence="Wikipedia text: CC BY-SA 3.0; DPR's release: CC BY-NC 4.0",
        home="https://github.com/facebookresearch/DPR",
        disk="about 13 GB, + the 4.7 GB .gz while fetching",
    ),
}
PAPER = tuple(DATASETS)  # `paper`: all of them, in the table's order


class FetchError(Exception):
    """A fetch that failed; the message is one line saying what to do."""


def human(n: int | None) -> str:
    """Bytes as a short size (``46.3 MB``), or ``size unknown``."""
    if n is None:
        return "size unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _kind(url: str) -> str:
    """``gz``, ``zip`` or ``file``: what the download is, by its URL path."""
    path = urllib.parse.urlparse(url).path
    return "gz" if path.endswith(".gz") else "zip" if path.endswith(".zip") else "file"


def _by_hand(dataset: Dataset, source: Source, root: Path) -> str:
    """Where a download put by hand goes: the destination, or what to take from the archive."""
    dests = [root / f for f in dataset.files]
    kind = _kind(source.url)
    if kind == "gz":
        return f"gunzip it to {dests[0]}"
    if kind == "zip":
        return "unzip " + " and ".join(f"{m} to {d}" for m, d in zip(source.members, dests))
    return f"save it as {dests[0]}"


# ---- one download ---------------------------------------------------------------------------
def _open(url: str, offset: int, deadline: float) -> http.client.HTTPResponse:
    """GET ``url`` from byte ``offset``; TimeoutError when no answer comes by ``deadline``
    (``time.monotonic()``), even where name resolution, which no socket timeout covers, hangs."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    outcome: dict = {}

    def attempt() -> None:
        try:
            outcome["response"] = urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT)
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise TimeoutError("no answer in time")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["response"]


def _total(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The whole file's size from a response's headers (Content-Range, else Content-Length)."""
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return None if length is None else offset + int(length)


def _start(response: http.client.HTTPResponse) -> int | None:
    """The first byte a 206 response holds (``Content-Range: bytes START-END/TOTAL``)."""
    content_range = response.headers.get("Content-Range", "")
    start = content_range.removeprefix("bytes ").split("-", 1)[0]
    return int(start) if start.isdigit() else None


@contextlib.contextmanager
def _exclusive(part: Path):
    """Hold ``part``'s lock (``<part>.lock``) from its download through its installation, or
    FetchError when another fetch holds it."""
    part.parent.mkdir(parents=True, exist_ok=True)
    lock = part.with_name(part.name + ".lock")

    def refuse(_: int) -> None:
        raise FetchError(f"another fetch is writing {part}; wait for it to end")

    with flock(lock, shared=False, busy=refuse):
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while held: a later fetch takes a new one


@contextlib.contextmanager
def _appending(part: Path):
    """``part`` opened for appending; removed when it is left empty."""
    with part.open("ab") as f:
        try:
            yield f
        finally:
            if part.is_file() and part.stat().st_size == 0:
                part.unlink()


def _stream(response, f: IO[bytes], url: str, offset: int, total: int | None, label: str) -> None:
    """Append the response's body to ``f``; a cut is a FetchError that says to run again."""
    done = offset
    with tqdm(total=total, initial=offset, desc=label, disable=None, **_BYTES) as bar:
        try:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            f.flush()
            raise FetchError(f"download of {url} stopped at {human(done)} of {human(total)} "
                             f"({err}); run the same command again to resume") from None
    f.flush()
    if total is not None and done != total:
        raise FetchError(f"download of {url} stopped at {human(done)} of {human(total)} (the "
                         "connection closed); run the same command again to resume")


def _verify(part: Path, source: Source, total: int | None, label: str) -> None:
    """The downloaded ``part`` has the table's size and sha256 (a mismatch removes it)."""
    size = part.stat().st_size
    expected = source.size if source.size is not None else total
    problem = None
    if expected is not None and size != expected:
        problem = f"is {size} bytes, not {expected}"
    elif source.sha256 is not None:
        print(f"{label}: checking the sha256 of {human(size)}", flush=True)
        if (digest := file_sha256(part)) != source.sha256:
            problem = f"has sha256 {digest}, not the {source.sha256} recorded for it"
    if problem:
        part.unlink()
        raise _Refused(f"{source.url} {problem}: refused and removed (the file may have "
                       "changed at its source); nothing was written")


class _Unreachable(Exception):
    """No response from a source (refused, timed out, HTTP error): the next one is tried."""


class _Refused(FetchError):
    """A source answered with something that is not the file (another size or sha256, not
    the archive or the data dyprag reads): removed, and the next source is tried."""


def _download(source: Source, part: Path, label: str, deadline: float) -> None:
    """``source.url`` into ``part``, continuing a partial one, verified."""
    with _appending(part) as f:
        offset = f.tell()
        # Only a download whose sha256 is recorded is resumed: without one, a part written
        # before the file changed at its source would be spliced to the new one unnoticed.
        if source.sha256 is None or (source.size is not None and offset > source.size):
            f.truncate(0)
            offset = 0
        total = source.size
        if source.size is None or offset < source.size:
            try:
                response = _open(source.url, offset, deadline)
            except urllib.error.HTTPError as err:
                if err.code == 416 and offset:  # nothing after offset: done, or a stale part
                    total = _total(err, 0)
                    err.close()
                    if total != offset:
                        f.truncate(0)
                        raise _Unreachable(f"{err} (the partial download was discarded)") from None
                else:
                    err.close()
                    raise _Unreachable(str(err)) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                raise _Unreachable(str(getattr(err, "reason", err)) or type(err).__name__) from None
            else:
                with response:
                    if offset and response.status != 206:  # the server ignored the Range
                        f.truncate(0)
                        offset = 0
                    elif offset and _start(response) != offset:
                        f.truncate(0)
                        raise FetchError(f"{source.url} answered from byte {_start(response)}, "
                                         f"not {offset}: the partial download was discarded; "
                                         "run the same command again")
                    total = _total(response, offset)
                    if source.size is not None and total not in (None, source.size):
                        raise _Refused(f"{source.url} offers {total} bytes, the source table "
                                       f"records {source.size}: the file changed at its source")
                    what = "resuming at " + human(offset) + " of" if offset else "downloading"
                    print(f"{label}: {what} {human(total)} from {source.url}", flush=True)
                    _stream(response, f, source.url, offset, total, label)
        _verify(part, source, total, label)


# ---- putting the files in place ---------------------------------------------------------------
def _member(names: list[str], wanted: str, url: str) -> str:
    """The one archive member that is ``wanted`` or ends with ``/wanted``."""
    found = [n for n in names if (n == wanted or n.endswith("/" + wanted))
             and not n.startswith("__MACOSX/") and not Path(n).name.startswith("._")]
    if len(found) != 1:
        raise _Refused(f"{url} holds {len(found)} files named {wanted} ({', '.join(found[:3])}); "
                       "expected one")
    return found[0]


def _check(dataset: Dataset, paths: list[Path]) -> None:
    """The loader that will read the files reads them (the first questions or passage)."""
    try:
        if dataset.check == "corpus":
            next(iter(iter_corpus(paths[0])))
        elif dataset.check == "2wqa" and len(paths) > 1:
            load_2wqa(paths[0], aliases_path=paths[1], limit=CHECK_QUESTIONS)
        else:
            load_qa(paths[0], dataset.check, limit=CHECK_QUESTIONS)
    except (ValueError, OSError) as err:
        raise _Refused(f"the download is not {dataset.check} data as dyprag reads it: {err}") from None


def _install(dataset: Dataset, source: Source, part: Path, dests: list[Path], label: str) -> None:
    """The verified download ``part`` as the dataset's files, each renamed into place only once
    all of them are written and read back."""
    kind = _kind(source.url)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(d)) for d in dests]
        try:
            if kind == "file":
                os.replace(part, tmps[0])
            elif kind == "gz":
                with part.open("rb") as raw, tqdm.wrapattr(
                        raw, "read", total=part.stat().st_size, bytes=False, desc=f"{label} (gunzip)",
                        disable=None, **_BYTES) as counted, \
                        gzip.GzipFile(fileobj=counted) as gz, tmps[0].open("wb") as out:
                    shutil.copyfileobj(gz, out, CHUNK)
            else:
                with zipfile.ZipFile(part) as archive:
                    names = archive.namelist()
                    for member, tmp in zip(source.members, tmps, strict=True):
                        with archive.open(_member(names, member, source.url)) as src, tmp.open("wb") as out:
                            shutil.copyfileobj(src, out, CHUNK)
            _check(dataset, tmps)
        except (EOFError, gzip.BadGzipFile, zlib.error, zipfile.BadZipFile) as err:
            part.unlink(missing_ok=True)
            raise _Refused(f"{source.url} is not a valid {kind} file ({err}): removed") from None
        except _Refused:
            part.unlink(missing_ok=True)  # refused; an interrupt or a full disk keeps it
            raise
    part.unlink(missing_ok=True)


# ---- a dataset --------------------------------------------------------------------------------
def fetch(name: str, root: str | os.PathLike = "data") -> list[Path]:
    """Download dataset ``name`` of ``DATASETS`` under ``root`` unless its files are there;
    returns them. FetchError (one line) when it cannot."""
    dataset = DATASETS[name]
    root = Path(root)
    dests = [root / f for f in dataset.files]
    if all(d.is_file() for d in dests):
        print(f"{name}: already there ({', '.join(map(str, dests))})", flush=True)
        return dests
    deadline = time.monotonic() + REACH_BUDGET
    failures: list[str] = []
    for source in dataset.sources:
        name_in_url = Path(urllib.parse.urlparse(source.url).path).name
        part = dests[0].parent / f"{name_in_url}.part"
        try:
            with _exclusive(part):
                _download(source, part, name, deadline)
                _install(dataset, source, part, dests, name)
        except (_Unreachable, _Refused) as err:  # the next source, if there is one
            failures.append(f"{source.url}: {err}")
            continue
        print(f"{name}: {', '.join(map(str, dests))} ({human(sum(d.stat().st_size for d in dests))})",
              flush=True)
        return dests
    first = dataset.sources[0]
    raise FetchError(f"{name}: cannot download {'; '.join(failures)}. Download {first.url} by hand "
                     f"and {_by_hand(dataset, first, root)}")


def _help_table() -> str:
    rows = [f"  {name:9} {', '.join(d.files)}\n{'':12}disk: {d.disk}\n{'':12}licence: {d.licence}"
            for name, d in DATASETS.items()]
    return "datasets (docs/datasets.md says where each comes from):\n" + "\n".join(rows) + \
        f"\n  {'paper':9} all five: {' '.join(PAPER)}"


def main(argv: list[str] | None = None) -> int:
    description = "\n\n".join(__doc__.split("\n\n")[:2])
    parser = argparse.ArgumentParser(prog="python -m dyprag.data", description=description,
                                     epilog=_help_table(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch_parser = commands.add_parser(
        "fetch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_help_table(),
        help="download datasets (resumable, verified, atomic)",
        description="Download datasets to where the configs read them. A cut download resumes\n"
                    "when the command is run again; files already there are not downloaded.\n"
                    "A failure is one line on stderr and exit status 2 (the datasets after it\n"
                    "are not fetched).")
    fetch_parser.add_argument("names", nargs="+", metavar="NAME",
                              help=f"{', '.join(DATASETS)}, or paper (all five)")
    fetch_parser.add_argument("--to", default="data", metavar="DIR",
                              help="the directory to fetch into (default: data, where the configs' "
                                   "paths start; elsewhere, link it as data/ or override "
                                   "data.corpus, data.train_qa and data.test_qa)")
    args = parser.parse_args(argv)
    names: list[str] = []
    for name in args.names:
        if name not in DATASETS and name != "paper":
            print(f"dyprag.data: unknown dataset {name!r}: choose from {', '.join(DATASETS)}, paper",
                  file=sys.stderr)
            return 2
        names += [n for n in (PAPER if name == "paper" else (name,)) if n not in names]
    try:
        for name in names:
            fetch(name, args.to)
    except (FetchError, OSError) as err:  # OSError: a full disk, a --to that cannot be written
        print(f"dyprag.data: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dyprag.data: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a server's malformed answer, an archive dyprag cannot read
        print(f"dyprag.data: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
