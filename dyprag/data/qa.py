"""Question sets: read 2WikiMultihopQA, HotpotQA, PopQA, ComplexWebQuestions, generic or
FlashRAG jsonl into one example type, and write the generic jsonl.

    >>> from dyprag.data.qa import load_qa, write_qa_jsonl
    >>> examples = load_qa("data/2wikimultihopqa/dev.json", limit=300)  # + id_aliases.json
    >>> write_qa_jsonl(examples, "data/2wqa_dev300.jsonl")

Every loader gives ``QAExample(id, question, answers, meta)`` with ``answers`` = the gold
answer first, then its aliases, stripped and deduplicated in order. ``meta`` keeps the other
fields of the native record (question type, level, evidences, popularity, ...) except the
bulky ``context`` paragraphs of 2WQA / HotpotQA: dyprag retrieves its own passages.

Native files and where the answers come from:

    2wqa      dev.json (JSON list)        answer + aliases + demonyms of the entry of
              + id_aliases.json (jsonl)   id_aliases.json whose Q_id is the answer_id (as
                                          the official 2WikiMultihopQA evaluation does)
    hotpotqa  hotpot_*.json (JSON list)   answer
    popqa     popQA.tsv (tab-separated)   obj + possible_answers (a Python-literal list)
    cwq       ComplexWebQuestions_*.json  answers[*].answer, then answers[*].aliases
    jsonl     *.jsonl                     {"id", "question", "answers": [...], "meta": {...}}
    flashrag  *.jsonl (FlashRAG's)        {"id", "question", "golden_answers": [...],
                                          "metadata": {...}}: the Hugging Face dataset
                                          RUC-NLPIR/FlashRAG_datasets (named, never detected)

jsonl and tsv files are read line by line, so ``limit`` stops early; the JSON lists are read
whole (the standard library has no streaming JSON parser) and cut to ``limit`` before
conversion. A bad file raises ``QAFormatError`` (a ValueError) in one line naming the file
and the example; a missing one raises FileNotFoundError.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dyprag.config import QA_FORMATS as FORMATS
from dyprag.files import atomic_write_jsonl, iter_json_lines

ALIASES_FILE = "id_aliases.json"
# Left out of meta: 2WQA / HotpotQA passages are most of the file, and dyprag retrieves its own.
_DROPPED = {"context"}
_POPQA_INTS = ("s_pop", "o_pop")  # page views, the axis PopQA results are split by


class QAFormatError(ValueError):
    """A question file that cannot be read as its format: the message names file and example."""


@dataclass
class QAExample:
    """One question with its gold answers (first = canonical, then aliases)."""

    id: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _where(path: Path, index: int, raw_id: Any = None) -> str:
    return f"{path}: example {index}" + ("" if raw_id is None else f" (id {raw_id!r})")


def _record_id(path: Path, index: int, record: dict[str, Any], key: str) -> tuple[str, str]:
    """``(id, where)`` of a record of a JSON-list file; a record without ``key`` is refused."""
    where = _where(path, index, record.get(key))
    if record.get(key) is None:
        raise QAFormatError(f"{where} has no {key}")
    return str(record[key]), where


def _question(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise QAFormatError(f"{where} has no question")
    return value.strip()


def _answers(values: Iterable[Any], where: str) -> list[str]:
    """Strip, drop empties and repeats (order kept); at least one answer must remain."""
    answers: list[str] = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise QAFormatError(f"{where}: answers must be strings, got {value!r}")
        value = value.strip()
        if value and value not in answers:
            answers.append(value)
    if not answers:
        raise QAFormatError(f"{where} has no answer")
    return answers


def _as_list(value: Any) -> list[Any]:
    """A missing field is no values; a single string is one value."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, list):
        return value
    return [value]  # not a string: _answers reports it


def _check_path(path: str | os.PathLike) -> Path:
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    return src


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


def _lines(path: Path) -> Iterator[str]:
    """The file's lines, read as UTF-8 (a BOM is skipped); line ends are kept for csv."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        try:
            yield from f
        except UnicodeDecodeError as err:  # name the file, not just the codec
            raise QAFormatError(f"{path} is not UTF-8 text: {err}") from None


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads("".join(_lines(path)))
    except json.JSONDecodeError as err:
        raise QAFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise QAFormatError(f"{path} must hold a JSON list of questions, not {type(data).__name__}")
    return data


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line."""
    return iter_json_lines(_lines(path), path, error=QAFormatError)


def _records(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The objects of a JSON-list file, cut to ``limit``."""
    records = _read_json_list(path)[:limit]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise QAFormatError(f"{_where(path, index)} is a {type(record).__name__}, not a JSON object")
    return records


def _collect(examples: Iterable[QAExample], path: Path, limit: int | None) -> list[QAExample]:
    """Stop at ``limit``; refuse duplicate ids (results are keyed by id) and empty files."""
    out: list[QAExample] = []
    seen: dict[str, int] = {}  # id → its question's number in the file
    for number, example in enumerate(examples, 1):
        if example.id in seen:
            raise QAFormatError(f"{path}: id {example.id!r} is used by question {seen[example.id]} "
                                f"and again by question {number}; ids must be unique")
        seen[example.id] = number
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise QAFormatError(f"no questions in {path}")
    return out


def _meta(record: dict[str, Any], used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in used and k not in _DROPPED}


def _read_aliases(path: Path, wanted: set[str]) -> dict[str, list[str]]:
    """Aliases + demonyms of the wanted Q_ids from a 2WQA id_aliases.json (jsonl) file."""
    aliases: dict[str, list[str]] = {}
    for lineno, obj in _iter_jsonl(path):
        qid = obj.get("Q_id")
        if qid not in wanted:
            continue
        names = _as_list(obj.get("aliases")) + _as_list(obj.get("demonyms"))
        if not all(isinstance(n, str) for n in names):
            raise QAFormatError(f"{path}:{lineno}: aliases and demonyms must be lists of strings")
        aliases[qid] = names
    return aliases


def load_2wqa(path: str | os.PathLike, aliases_path: str | os.PathLike | None = None,
              limit: int | None = None) -> list[QAExample]:
    """2WikiMultihopQA ``dev.json``; aliases from ``aliases_path``, by default
    ``id_aliases.json`` beside it when that exists (only the ID-enhanced release of the data
    has the ``answer_id`` field that links the two)."""
    src = _check_path(path)
    _check_limit(limit)
    records = _records(src, limit)
    if aliases_path is None:
        beside = src.with_name(ALIASES_FILE)
        alias_src = beside if beside.is_file() else None
    else:
        alias_src = _check_path(aliases_path)
    wanted = {r["answer_id"] for r in records if isinstance(r.get("answer_id"), str)}
    aliases = _read_aliases(alias_src, wanted) if alias_src and wanted else {}

    def examples() -> Iterator[QAExample]:
        for index, r in enumerate(records):
            qid, where = _record_id(src, index, r, "_id")
            answer_id = r.get("answer_id")
            linked = aliases.get(answer_id, []) if isinstance(answer_id, str) else []
            golds = _as_list(r.get("answer")) + linked
            yield QAExample(qid, _question(r.get("question"), where),
                            _answers(golds, where), _meta(r, {"_id", "question", "answer"}))

    return _collect(examples(), src, limit)


def load_hotpotqa(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """HotpotQA ``hotpot_dev_distractor_v1.json`` (or the fullwiki dev file)."""
    src = _check_path(path)
    _check_limit(limit)

    def examples() -> Iterator[QAExample]:
        for index, r in enumerate(_records(src, limit)):
            qid, where = _record_id(src, index, r, "_id")
            yield QAExample(qid, _question(r.get("question"), where),
                            _answers(_as_list(r.get("answer")), where),
                            _meta(r, {"_id", "question", "answer"}))

    return _collect(examples(), src, limit)


def _literal_list(text: str, where: str) -> list[Any]:
    if not text.strip():
        return []
    try:
        value = ast.literal_eval(text)  # the file's lists are Python/JSON literals; never eval
    except (ValueError, SyntaxError):
        raise QAFormatError(f"{where}: possible_answers is not a list literal: {text!r}") from None
    if not isinstance(value, list):
        raise QAFormatError(f"{where}: possible_answers is not a list literal: {text!r}")
    return value


def load_popqa(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """PopQA ``popQA.tsv``: ``obj`` first, then the ``possible_answers`` list."""
    src = _check_path(path)
    _check_limit(limit)

    def rows() -> Iterator[tuple[int, list[str]]]:
        """(line number, fields) per row; csv's own errors get the file's name."""
        reader = csv.reader(_lines(src), delimiter="\t")  # pandas' quoting, which wrote the file
        try:
            for fields in reader:
                yield reader.line_num, fields
        except csv.Error as err:
            raise QAFormatError(f"{src}:{reader.line_num}: not valid TSV: {err}") from None

    def examples() -> Iterator[QAExample]:
        lines = rows()
        _, header = next(lines, (0, None))
        if header is None:
            return
        missing = {"question", "possible_answers"} - set(header)
        if missing:
            raise QAFormatError(f"{src}: header lacks the column(s) {', '.join(sorted(missing))}")
        for index, (lineno, fields) in enumerate(row for row in lines if any(row[1])):
            row = dict(zip(header, fields))
            raw_id = row.get("id") or None
            where = f"{_where(src, index, raw_id)} (line {lineno})"
            if len(fields) != len(header):
                raise QAFormatError(f"{where} has {len(fields)} fields, the header {len(header)}")
            golds = [row.get("obj")] + _literal_list(row["possible_answers"], where)
            meta: dict[str, Any] = _meta(row, {"id", "question", "possible_answers"})
            for key in _POPQA_INTS:
                if meta.get(key, "").lstrip("-").isdigit():
                    meta[key] = int(meta[key])
            yield QAExample(raw_id or str(index), _question(row["question"], where),
                            _answers(golds, where), meta)

    return _collect(examples(), src, limit)


def load_cwq(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """ComplexWebQuestions ``ComplexWebQuestions_dev.json``: every answer's name first, then
    every answer's aliases."""
    src = _check_path(path)
    _check_limit(limit)

    def examples() -> Iterator[QAExample]:
        for index, r in enumerate(_records(src, limit)):
            qid, where = _record_id(src, index, r, "ID")
            entries = _as_list(r.get("answers"))
            if not all(isinstance(e, dict) for e in entries):
                raise QAFormatError(f"{where}: answers must be objects with 'answer' and 'aliases'")
            names = [e.get("answer") for e in entries]
            aliases = [a for e in entries for a in _as_list(e.get("aliases"))]
            yield QAExample(qid, _question(r.get("question"), where),
                            _answers(names + aliases, where), _meta(r, {"ID", "question", "answers"}))

    return _collect(examples(), src, limit)


def load_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """Generic jsonl (what ``write_qa_jsonl`` writes). A missing id becomes the line number;
    ``answer`` is accepted for ``answers``; other top-level keys go into meta."""
    def read(obj: dict, where: str) -> tuple[list, dict]:
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise QAFormatError(f"{where}: meta must be a JSON object")
        extra = {k: v for k, v in obj.items() if k not in ("id", "question", "answers", "answer", "meta")}
        return _as_list(obj["answers"] if "answers" in obj else obj.get("answer")), {**extra, **meta}

    return _load_json_lines(path, limit, read)


def load_flashrag(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """FlashRAG's jsonl (the Hugging Face dataset ``RUC-NLPIR/FlashRAG_datasets``): answers
    from ``golden_answers``, meta from ``metadata``. A missing id becomes the line number."""
    def read(obj: dict, where: str) -> tuple[list, dict]:
        if "golden_answers" not in obj:
            raise QAFormatError(f"{where} has no golden_answers (not FlashRAG's format)")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise QAFormatError(f"{where}: metadata must be a JSON object")
        return _as_list(obj["golden_answers"]), metadata

    return _load_json_lines(path, limit, read)


def _load_json_lines(path: str | os.PathLike, limit: int | None,
                     read: Callable[[dict, str], tuple[list, dict]]) -> list[QAExample]:
    """One question per JSON line: ``read(obj, where)`` gives its answers and meta; the id is
    ``id`` (the line number when missing), the question ``question``."""
    src = _check_path(path)
    _check_limit(limit)

    def examples() -> Iterator[QAExample]:
        for lineno, obj in _iter_jsonl(src):
            where = f"{src}:{lineno}" + ("" if obj.get("id") is None else f" (id {obj['id']!r})")
            golds, meta = read(obj, where)
            yield QAExample(str(obj.get("id", lineno)), _question(obj.get("question"), where),
                            _answers(golds, where), meta)

    return _collect(examples(), src, limit)


_LOADERS = {"2wqa": load_2wqa, "hotpotqa": load_hotpotqa, "popqa": load_popqa, "cwq": load_cwq,
            "jsonl": load_jsonl, "flashrag": load_flashrag}


def detect_format(path: str | os.PathLike) -> str:
    """The format a file name implies; ValueError listing the choices when it implies none."""
    name = Path(path).name
    lower = name.lower()
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith(".tsv"):
        return "popqa"
    if lower.endswith(".json"):
        if lower.startswith("complexwebquestions"):
            return "cwq"
        if lower.startswith("hotpot"):
            return "hotpotqa"
        if lower == "dev.json":
            return "2wqa"
    raise ValueError(f"cannot tell the format of {name!r} from its name: pass fmt= one of "
                     f"{', '.join(FORMATS)} (names: dev.json → 2wqa, hotpot*.json → hotpotqa, "
                     f"*.tsv → popqa, ComplexWebQuestions*.json → cwq, *.jsonl → jsonl)")


def load_qa(path: str | os.PathLike, fmt: str | None = None, limit: int | None = None) -> list[QAExample]:
    """Load a question set; ``fmt`` is one of FORMATS, or None to go by the file name."""
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in _LOADERS:
        raise ValueError(f"unknown QA format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return _LOADERS[fmt](path, limit=limit)


def write_qa_jsonl(examples: Iterable[QAExample], path: str | os.PathLike) -> Path:
    """Write examples as generic jsonl through a temporary file and a rename, so ``path``
    is either the old file or the complete new one."""
    def rows() -> Iterator[dict[str, Any]]:
        count = 0
        for ex in examples:
            count += 1
            yield {"id": ex.id, "question": ex.question, "answers": ex.answers, "meta": ex.meta}
        # load_jsonl refuses an empty file, so never write one.
        if count == 0:
            raise ValueError(f"no examples to write to {path}")

    return atomic_write_jsonl(path, rows())
