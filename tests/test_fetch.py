"""``python -m dyprag.data fetch``: downloads from a local HTTP server (no network) of small
files in each real format, with the source table's URLs pointed at it."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dyprag import rundir
from dyprag.config import load_config
from dyprag.data import fetch
from dyprag.data.corpus import iter_corpus
from dyprag.data.qa import load_qa

ROOT = Path(__file__).resolve().parents[1]

TWOWIKI = [
    {"_id": f"w{i}", "type": "inference", "question": f"Who is the mother of person {i}?",
     "answer": f"Mother {i}", "answer_id": f"Q{i}", "context": [["P", ["P is a person."]]],
     "supporting_facts": [], "evidences": []} for i in range(4)]
ALIASES = "".join(json.dumps({"Q_id": f"Q{i}", "aliases": [f"Mum {i}"], "demonyms": []}) + "\n"
                  for i in range(4))
HOTPOT = [{"_id": f"h{i}", "question": f"Which magazine started first, {i}?",
           "answer": f"Magazine {i}", "type": "comparison", "level": "medium",
           "supporting_facts": [], "context": []} for i in range(4)]
POPQA = "id\tsubj\tprop\tobj\ts_pop\to_pop\tquestion\tpossible_answers\n" + "".join(
    f'{i}\tSubject {i}\toccupation\tpolitician\t{i}\t7\tWhat is Subject {i}\'s occupation?\t'
    f'"[""politician"", ""polit. {i}""]"\n' for i in range(4))
CWQ = [{"ID": f"WebQTrn-{i}", "question": f"What team won final {i}?",
        "answers": [{"answer": f"Team {i}", "aliases": [f"T{i}"], "answer_id": "m.1"}]}
       for i in range(4)]
TSV = "id\ttext\ttitle\n" + "".join(f'{i}\t"Passage {i}, with ""quotes"""\tTitle {i}\n'
                                     for i in range(1, 4))


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    return buffer.getvalue()


# What each dataset's source serves, in the real layout: (URL path, bytes).
SERVED = {
    "2wqa": ("/data_ids_april7.zip", _zip({
        "data_ids_april7/train.json": b"[]",
        "data_ids_april7/dev.json": json.dumps(TWOWIKI).encode(),
        "data_ids_april7/id_aliases.json": ALIASES.encode(),
        "__MACOSX/data_ids_april7/._dev.json": b"\x00resource fork"})),
    "hotpotqa": ("/hotpot_dev_distractor_v1.json", json.dumps(HOTPOT).encode()),
    "popqa": ("/popQA.tsv", POPQA.encode()),
    "cwq": ("/Data.zip", _zip({"Data/complex_web_questions/ComplexWebQuestions_dev.json":
                               json.dumps(CWQ).encode(),
                               "Data/complex_web_questions/ComplexWebQuestions_test.json": b"[]"})),
    "dpr-wiki": ("/psgs_w100.tsv.gz", gzip.compress(TSV.encode())),
}


class Handler(BaseHTTPRequestHandler):
    """GET with Range; ``server.cut[path] = n`` sends the first n bytes once, then hangs up."""

    def do_GET(self) -> None:
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
        if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut.pop(self.path, None)
        self.wfile.write(body[start:cut])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.cut, httpd.requests = {}, {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_port}{path}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(monkeypatch, server, name: str, **fields) -> fetch.Source:
    """Point ``name``'s table entry at the local server (its first source, the real members
    and destinations kept; ``fields`` override size / sha256); returns that source."""
    path, body = SERVED[name]
    server.files[path] = body
    entry = fetch.DATASETS[name]
    source = dataclasses.replace(entry.sources[0], url=server.url(path), **{
        "size": None, "sha256": None, **fields})
    monkeypatch.setitem(fetch.DATASETS, name, dataclasses.replace(entry, sources=(source,)))
    return source


def test_each_dataset_is_fetched_where_its_loader_reads_it(tmp_path, server, monkeypatch):
    for name in fetch.PAPER:
        serve(monkeypatch, server, name)
    assert fetch.main(["fetch", "paper", "--to", str(tmp_path / "data")]) == 0
    root = tmp_path / "data"
    wqa = load_qa(root / "2wikimultihopqa/dev.json", "2wqa")
    assert [e.answers for e in wqa[:2]] == [["Mother 0", "Mum 0"], ["Mother 1", "Mum 1"]]  # aliases beside
    assert [e.id for e in load_qa(root / "hotpotqa/hotpot_dev_distractor_v1.json", "hotpotqa")] == \
        ["h0", "h1", "h2", "h3"]
    assert load_qa(root / "popqa/popQA.tsv", "popqa")[1].answers == ["politician", "polit. 1"]
    assert load_qa(root / "cwq/ComplexWebQuestions_dev.json", "cwq")[0].answers == ["Team 0", "T0"]
    passages = list(iter_corpus(root / "dpr/psgs_w100.tsv"))  # the .gz, decompressed
    assert [(p.id, p.title, p.text) for p in passages][0] == ("1", "Title 1", 'Passage 1, with "quotes"')
    # Only the files the configs read: no archive, part file or temporary is left behind.
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(
        f for d in fetch.DATASETS.values() for f in d.files)


def test_the_paper_configs_data_stage_reads_the_fetched_files(tmp_path, server, monkeypatch):
    for name in fetch.PAPER:
        serve(monkeypatch, server, name)
    assert fetch.main(["fetch", "paper", "--to", str(tmp_path / "data")]) == 0
    monkeypatch.chdir(tmp_path)  # the configs' relative paths: data/...
    configs = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                     if p.stem.rsplit("-", 1)[-1] in ("2wqa", "hotpotqa", "popqa", "cwq"))
    assert len(configs) == 12
    for path in configs:
        config = load_config(path, ["data.test_questions=2", "data.train_questions=1"])
        # pipeline.stage_data for data.kind qa: the run's questions, and the corpus it retrieves from
        train, test = rundir.questions(config.data, tmp_path / "run")
        assert (len(train), len(test)) == (1, 2), path.name
        assert next(iter_corpus(rundir.corpus_path(config.data, tmp_path / "run"))).id == "1"


def test_already_there_makes_no_request(tmp_path, server, monkeypatch, capsys):
    serve(monkeypatch, server, "hotpotqa")
    assert fetch.main(["fetch", "hotpotqa", "--to", str(tmp_path)]) == 0
    server.requests.clear()
    capsys.readouterr()
    assert fetch.main(["fetch", "hotpotqa", "--to", str(tmp_path)]) == 0
    assert server.requests == []
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already there" in out[0]


def test_a_cut_download_resumes_with_a_range_request(tmp_path, server, monkeypatch, capsys):
    path, body = SERVED["hotpotqa"]
    serve(monkeypatch, server, "hotpotqa", size=len(body), sha256=hashlib.sha256(body).hexdigest())
    server.cut[path] = 100
    dest = tmp_path / "hotpotqa/hotpot_dev_distractor_v1.json"
    assert fetch.main(["fetch", "hotpotqa", "--to", str(tmp_path)]) == 2
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not dest.exists()
    assert (dest.parent / "hotpot_dev_distractor_v1.json.part").stat().st_size == 100
    assert fetch.main(["fetch", "hotpotqa", "--to", str(tmp_path)]) == 0
    assert server.requests[-1] == (path, "bytes=100-")
    assert dest.read_bytes() == body  # verified by the recorded sha256
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def test_a_complete_download_left_behind_is_installed_without_its_bytes_again(tmp_path, server, monkeypatch):
    path, body = SERVED["2wqa"]
    # no size in the table: the server says it is complete; a sha256, so the part is trusted
    serve(monkeypatch, server, "2wqa", sha256=hashlib.sha256(body).hexdigest())
    part = tmp_path / "2wikimultihopqa/data_ids_april7.zip.part"
    part.parent.mkdir()
    part.write_bytes(body)  # e.g. a run stopped while extracting
    assert fetch.main(["fetch", "2wqa", "--to", str(tmp_path)]) == 0
    assert server.requests == [(path, f"bytes={len(body)}-")]  # answered 416: nothing after it
    assert len(load_qa(tmp_path / "2wikimultihopqa/dev.json", "2wqa")) == 4
    assert not part.exists()


def test_a_part_of_a_source_without_a_checksum_is_downloaded_afresh(tmp_path, server, monkeypatch):
    path, body = SERVED["popqa"]
    serve(monkeypatch, server, "popqa")  # no sha256: a part cannot be told from a changed file
    part = tmp_path / "popqa/popQA.tsv.part"
    part.parent.mkdir()
    part.write_bytes(b"stale bytes of an older file")
    assert fetch.main(["fetch", "popqa", "--to", str(tmp_path)]) == 0
    assert server.requests == [(path, None)]  # no Range: from byte 0
    assert (tmp_path / "popqa/popQA.tsv").read_bytes() == body


def test_a_mirror_is_tried_when_the_publisher_gives_another_file(tmp_path, server, monkeypatch):
    body = json.dumps(CWQ).encode()
    server.files["/publisher/ComplexWebQuestions_dev.json"] = b"<html>this link is dead</html>"
    server.files["/mirror/ComplexWebQuestions_dev.json"] = body
    entry = fetch.DATASETS["cwq"]
    sources = tuple(dataclasses.replace(entry.sources[1],
                                        url=server.url(f"/{where}/ComplexWebQuestions_dev.json"))
                    for where in ("publisher", "mirror"))
    monkeypatch.setitem(fetch.DATASETS, "cwq", dataclasses.replace(entry, sources=sources))
    assert fetch.main(["fetch", "cwq", "--to", str(tmp_path)]) == 0
    assert [p for p, _ in server.requests] == ["/publisher/ComplexWebQuestions_dev.json",
                                               "/mirror/ComplexWebQuestions_dev.json"]
    assert (tmp_path / "cwq/ComplexWebQuestions_dev.json").read_bytes() == body


def test_a_checksum_mismatch_is_refused(tmp_path, server, monkeypatch, capsys):
    serve(monkeypatch, server, "hotpotqa", sha256="0" * 64)
    assert fetch.main(["fetch", "hotpotqa", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and "refused" in err[0]
    assert list((tmp_path / "hotpotqa").iterdir()) == []  # neither the file nor its download


def test_another_size_than_the_table_records_is_refused_unread(tmp_path, server, monkeypatch, capsys):
    serve(monkeypatch, server, "popqa", size=3)
    assert fetch.main(["fetch", "popqa", "--to", str(tmp_path)]) == 2
    assert "the source table records 3" in capsys.readouterr().err
    assert not (tmp_path / "popqa/popQA.tsv").exists()


def test_a_file_that_is_not_the_format_is_refused(tmp_path, server, monkeypatch, capsys):
    serve(monkeypatch, server, "cwq")
    server.files["/Data.zip"] = _zip({"Data/complex_web_questions/ComplexWebQuestions_dev.json":
                                      b"<html>Sign in to Dropbox</html>"})
    assert fetch.main(["fetch", "cwq", "--to", str(tmp_path)]) == 2
    assert "not cwq data" in capsys.readouterr().err
    assert list((tmp_path / "cwq").iterdir()) == []


def test_a_mirror_is_used_when_the_publisher_fails(tmp_path, server, monkeypatch):
    server.files["/mirror/ComplexWebQuestions_dev.json"] = json.dumps(CWQ).encode()
    entry = fetch.DATASETS["cwq"]
    sources = (dataclasses.replace(entry.sources[0], url=server.url("/gone/Data.zip")),  # 404
               dataclasses.replace(entry.sources[1], url=server.url("/mirror/ComplexWebQuestions_dev.json")))
    monkeypatch.setitem(fetch.DATASETS, "cwq", dataclasses.replace(entry, sources=sources))
    assert fetch.main(["fetch", "cwq", "--to", str(tmp_path)]) == 0
    assert len(load_qa(tmp_path / "cwq/ComplexWebQuestions_dev.json", "cwq")) == 4


def test_unreachable_is_one_line_naming_url_and_path_quickly(tmp_path, monkeypatch, capsys):
    entry = fetch.DATASETS["dpr-wiki"]
    url = f"http://127.0.0.1:{_closed_port()}/psgs_w100.tsv.gz"
    monkeypatch.setitem(fetch.DATASETS, "dpr-wiki", dataclasses.replace(
        entry, sources=(dataclasses.replace(entry.sources[0], url=url),)))
    start = time.monotonic()
    assert fetch.main(["fetch", "dpr-wiki", "--to", str(tmp_path / "data")]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert url in err[0] and f"gunzip it to {tmp_path / 'data/dpr/psgs_w100.tsv'}" in err[0]
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []  # not even a .part


def test_a_server_that_never_answers_is_given_up_within_the_budget(tmp_path, monkeypatch, capsys):
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/popQA.tsv"
        entry = fetch.DATASETS["popqa"]
        monkeypatch.setitem(fetch.DATASETS, "popqa", dataclasses.replace(
            entry, sources=(fetch.Source(url), fetch.Source(url + "?mirror"))))
        monkeypatch.setattr(fetch, "REACH_BUDGET", 0.5)
        start = time.monotonic()
        assert fetch.main(["fetch", "popqa", "--to", str(tmp_path)]) == 2
        assert time.monotonic() - start < 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and str(tmp_path / "popqa/popQA.tsv") in err[0]


def test_a_bad_name_is_one_line_listing_the_choices():
    done = subprocess.run([sys.executable, "-m", "dyprag.data", "fetch", "hotpot"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == ("dyprag.data: unknown dataset 'hotpot': choose from 2wqa, "
                                   "hotpotqa, popqa, cwq, dpr-wiki, paper")


def test_help_names_every_dataset_its_files_and_licence(capsys):
    with pytest.raises(SystemExit) as exit_:
        fetch.main(["fetch", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name, entry in fetch.DATASETS.items():
        assert name in text and entry.files[0] in text and entry.licence in text
    assert "resume" in text


def test_a_second_fetch_of_the_same_file_is_refused_and_leaves_the_first_ones_lock(tmp_path):
    part = tmp_path / "hotpot_dev_distractor_v1.json.part"
    with fetch._exclusive(part):
        with pytest.raises(fetch.FetchError, match="another fetch is writing"):
            with fetch._exclusive(part):
                pass
        assert part.with_name(part.name + ".lock").exists()
    assert not part.with_name(part.name + ".lock").exists()
