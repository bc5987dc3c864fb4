"""Streaming corpus readers (jsonl, DPR tsv), counting, fingerprints and their errors."""

from __future__ import annotations

import gzip
import json
import shutil
import types

import pytest

from dyprag.data.corpus import (
    Passage,
    corpus_fingerprint,
    count_passages,
    iter_batches,
    iter_corpus,
    read_passages,
    write_corpus_jsonl,
)

PASSAGES = [Passage("a", "Alpha", "first passage"), Passage("b", "", "second\tpassage, with \"quotes\""),
            Passage("c", "Gamma", "third passage")]


def test_jsonl_round_trip(tmp_path):
    path = write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")
    assert list(iter_corpus(path)) == PASSAGES
    assert count_passages(path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.jsonl"]  # no temporary left behind


def test_read_passages_returns_the_asked_ones_in_corpus_order_and_stops_early(tmp_path):
    path = write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")
    assert read_passages(path, ["c", "a", "zz"]) == {"a": PASSAGES[0], "c": PASSAGES[2]}
    assert list(read_passages(path, ["c", "a"])) == ["a", "c"]
    assert read_passages(path, []) == {}
    with path.open("a") as f:  # a broken line after the asked passages is never read
        f.write('{"id": "d", "text": \n')
    assert read_passages(path, ["a", "b"]) == {"a": PASSAGES[0], "b": PASSAGES[1]}
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4"):
        read_passages(path, ["zz"])


def test_jsonl_missing_fields_and_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "no id, no title"}\n\n{"id": 7, "title": null, "text": "int id"}\n')
    assert list(iter_corpus(path)) == [Passage("1", "", "no id, no title"), Passage("7", "", "int id")]
    assert count_passages(path) == 2


def test_jsonl_is_streamed(tmp_path):
    """The first passage arrives before the reader sees the broken third line."""
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": "ok"}\n{"id": "c", "text": \n')
    stream = iter_corpus(path)
    assert isinstance(stream, types.GeneratorType)
    assert next(stream).id == "a"
    assert next(stream).id == "b"
    with pytest.raises(ValueError, match=r"corpus\.jsonl:3: not valid JSON"):
        next(stream)


def test_dpr_tsv(tmp_path):
    path = tmp_path / "psgs_w100.tsv"
    path.write_text('id\ttext\ttitle\n'
                    '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
                    '2\t"a tab\there, and a newline\nthere"\tTabs\n')
    assert list(iter_corpus(path)) == [Passage("1", "Aaron", 'Aaron ( or ; "Ahärôn") is a prophet'),
                                       Passage("2", "Tabs", "a tab\there, and a newline\nthere")]
    assert count_passages(path) == 2


def test_gzipped_jsonl(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in PASSAGES)
    assert list(iter_corpus(path)) == PASSAGES
    assert count_passages(path) == 3


@pytest.mark.parametrize("name, content, error, match", [
    ("corpus.jsonl", '{"id": "a", "text": "ok"}\n[1, 2]\n', ValueError, r"corpus\.jsonl:2: expected a JSON object"),
    ("corpus.jsonl", '{"id": "a", "title": "no text"}\n', ValueError, r"corpus\.jsonl:1: field 'text'"),
    ("corpus.jsonl", "\n\n", ValueError, r"no passages in .*corpus\.jsonl"),
    ("psgs.tsv", "id\ttext\ttitle\n", ValueError, r"no passages in .*psgs\.tsv"),
    ("psgs.tsv", "id\tbody\ttitle\n1\tx\ty\n", ValueError, r"psgs\.tsv:1: header"),
    ("psgs.tsv", "id\ttext\ttitle\n1\tonly two\n", ValueError, r"psgs\.tsv:2: 2 fields"),
    ("corpus.csv", "id,text\n", ValueError, r"unknown corpus format"),
])
def test_reader_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error, match=match):
        list(iter_corpus(path))


def test_missing_file(tmp_path):
    for fn in (lambda p: list(iter_corpus(p)), count_passages, corpus_fingerprint):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            fn(tmp_path / "nope.jsonl")


def test_fingerprint_follows_content(tmp_path):
    path = write_corpus_jsonl(PASSAGES, tmp_path / "corpus.jsonl")
    first = corpus_fingerprint(path)
    assert len(first) == 64 and first == corpus_fingerprint(path)
    shutil.copy(path, tmp_path / "copy.jsonl")
    assert corpus_fingerprint(tmp_path / "copy.jsonl") == first  # bytes, not name or mtime
    write_corpus_jsonl([*PASSAGES[:2], Passage("c", "Gamma", "third passage!")], path)
    assert corpus_fingerprint(path) != first


def test_iter_batches():
    assert [len(b) for b in iter_batches(iter(range(7)), 3)] == [3, 3, 1]
    assert list(iter_batches(iter([]), 3)) == []


def test_embedding_text():
    assert Passage("x", "Title", "body").embedding_text() == "Title\nbody"
    assert Passage("x", "", "body").embedding_text() == "body"
