"""Runs never lose work: reruns keep logs, a failed rerun leaves the finished run as it was, a
killed fit resumes exactly, a damaged file is named with its fix, a diverged fit stops, and bad
input is one line (train.py, infer.py, evaluate.py). Each test works on its own copy of the
shared tiny run."""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import exits_with_one_line, run_files
from torch.testing import assert_close

import infer
import train
from dyprag.files import read_safetensors

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Where was Nerys Northcott born?"


def metrics_rows(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            rows += list(csv.DictReader(f))
    return rows


# ---- 1. a rerun keeps the logs -----------------------------------------------------------------
def test_a_rerun_adds_a_log_version_and_keeps_every_earlier_row(own_run):
    args, run = own_run
    before = {p: p.read_bytes() for p in (run / "logs").rglob("*.csv")}
    rows = len(metrics_rows(run))
    assert rows > 5  # the fit's loss, lr and validation rows
    train.main(args)
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing cut
    assert len(metrics_rows(run)) > rows
    assert len(list((run / "logs").glob("version_*"))) == len({p.parent for p in before}) + 1


# ---- 2. a failed rerun leaves the finished run as it was ---------------------------------------
def test_a_failed_rerun_leaves_the_finished_run_answering(own_run, capsys):
    args, run = own_run
    before = run_files(run)
    exits_with_one_line(capsys, lambda: train.main([*args, f"model.name={run}/no-such-model"]),
                        "no-such-model")
    assert run_files(run) == before
    assert infer.main(["--run", str(run), "--question", QUESTION]) == 0  # still answers


def test_a_successful_rerun_replaces_the_run_its_reports_and_its_staging(own_run):
    args, run = own_run
    (run / "eval").mkdir()  # evaluate.py's reports on the run being replaced
    (run / "eval" / "report.md").write_text("| old translator | 0.9 |\n")
    train.main([*args, "train.lr=2e-3"])
    assert json.loads((run / "eval.json").read_text())["f1"].keys() == {"vanilla", "dyprag@1"}
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    assert not (run / "eval").exists()
    # beside the run: only its writer and readers locks (kept: removing a lock file races its
    # next taker)
    assert sorted(p.name for p in run.parent.iterdir()) == [
        f".{run.name}.lock", f".{run.name}.readers", run.name]


# ---- 3. a killed fit resumes exactly -----------------------------------------------------------
KILLER = """
import os, signal, sys
import pytorch_lightning as pl
from dyprag.config import load_config
from dyprag.run import pipeline
from dyprag.training import fit

class Kill(pl.Callback):  # SIGKILL mid-epoch 1, after epoch 0's checkpoint
    def on_train_batch_start(self, trainer, module, batch, index):
        if trainer.current_epoch == 1 and index == 2:
            os.kill(os.getpid(), signal.SIGKILL)

fit = fit.fit_translator
kill = sys.argv[1] == "kill"
pipeline.fit_translator = lambda *a, **kw: fit(*a, **kw, callbacks=[Kill()] if kill else [])
pipeline.run(load_config(sys.argv[2], sys.argv[3:]))
"""


def test_a_killed_fit_resumes_to_the_weights_of_an_uninterrupted_one(tiny_run, tmp_path):
    config, out = tiny_run
    script = tmp_path / "fit.py"
    script.write_text(KILLER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    weights = {}
    for name, attempts in (("straight", ["go"]), ("killed", ["kill", "go"])):
        root = tmp_path / name
        shutil.copytree(out, root / out.name, symlinks=True)
        for attempt in attempts:
            proc = subprocess.run([sys.executable, str(script), attempt, str(config),
                                   f"run.root={root}", "train.lr=2e-3", "train.epochs=2",
                                   "eval.modes=[vanilla]", "wandb.mode=disabled"],
                                  capture_output=True, text=True, cwd=ROOT, env=env, check=False)
            if attempt == "kill":
                assert proc.returncode == -9, proc.stderr[-2000:]
                assert (root / f".{out.name}.attempt" / "lightning" / "last.ckpt").is_file()
            else:
                assert proc.returncode == 0, proc.stderr[-2000:]
        weights[name] = read_safetensors(root / out.name / "translator" / "translator.safetensors")
    assert weights["straight"].keys() == weights["killed"].keys()
    for key, tensor in weights["straight"].items():
        assert_close(weights["killed"][key], tensor, rtol=0, atol=0)


# ---- 5. damaged files: one line naming the file and the fix; --rebuild heals -----------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_truncated_translator_is_named_by_infer_and_rebuilt_by_train(own_run, capsys):
    args, run = own_run
    truncate(run / "translator" / "translator.safetensors")
    assert infer.main(["--run", str(run), "--question", QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "translator.safetensors is unreadable" in err, err
    assert "--rebuild translator" in err, err
    exits_with_one_line(capsys, lambda: train.main(args), "translator.safetensors is unreadable",
                        "--rebuild translator")
    hint = shlex.split(err.split("`")[1])  # the command infer.py prints, run as printed
    assert hint[:2] == ["python", "train.py"], hint
    train.main([*hint[2:], "eval.modes=[vanilla,dyprag@1]"])  # it rebuilds this copy
    assert infer.main(["--run", str(run), "--question", QUESTION]) == 0


def test_a_truncated_bank_shard_is_named_with_the_stage_to_rebuild(own_run, capsys):
    args, run = own_run
    shard = sorted((run / "bank").glob("*.safetensors"))[0]
    truncate(shard)
    exits_with_one_line(capsys, lambda: train.main([*args, "train.lr=2e-3"]), shard.name,
                        "--rebuild bank")
    train.main([*args, "train.lr=2e-3", "--rebuild", "bank"])
    assert read_safetensors(run / "bank" / shard.name)


def test_a_truncated_resume_checkpoint_starts_the_fit_over(own_run, capsys, monkeypatch):
    from dyprag.run import pipeline
    from dyprag.training import fit

    args, run = own_run
    fit = fit.fit_translator

    class Crash(Exception):
        pass

    class CrashAtEpoch1(__import__("pytorch_lightning").Callback):
        def on_train_epoch_start(self, trainer, *_):
            if trainer.current_epoch == 1:
                raise Crash

    monkeypatch.setattr(pipeline, "fit_translator",
                        lambda *a, **kw: fit(*a, **kw, callbacks=[CrashAtEpoch1()]))
    with pytest.raises(Crash):
        train.main([*args, "train.lr=2e-3"])
    last = run.parent / f".{run.name}.attempt" / "lightning" / "last.ckpt"
    truncate(last)
    monkeypatch.setattr(pipeline, "fit_translator", fit)
    train.main([*args, "train.lr=2e-3"])
    assert "last.ckpt is unreadable" in capsys.readouterr().out
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def test_a_corrupt_meta_json_is_named(own_run, capsys):
    _, run = own_run
    (run / "translator" / "meta.json").write_text("{not json")
    assert infer.main(["--run", str(run), "--question", QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert "translator/meta.json is unreadable" in err and "--rebuild translator" in err, err


# ---- 6. a diverged fit stops and the previous translator stays --------------------------------
def test_an_exploding_fit_stops_with_one_line_and_keeps_the_translator(own_run, capsys):
    args, run = own_run
    before = run_files(run)
    exits_with_one_line(capsys, lambda: train.main([*args, "train.lr=1e6"]),
                        "diverged at step", "train.lr=1e+06")
    assert run_files(run) == before


# ---- 7. bad input to train.py is one line; so is a non-UTF-8 question -------------------------
def qa_config(tmp_path: Path, base: Path, corpus: Path, qa: Path, **data) -> list[str]:
    data = {"kind": "qa", "corpus": str(corpus), "train_qa": str(qa), "test_qa": str(qa),
            "test_questions": 1, **data}
    return ["model.name=" + str(base), f"run.root={tmp_path / 'runs'}",
            *(f"data.{k}={v}" for k, v in data.items())]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["empty corpus", "no text", "tsv without header",
                                  "qa wrong format", "truncated gz"])
def test_train_reports_bad_data_in_one_line_naming_the_file(tiny_run, tmp_path, capsys, case,
                                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, out = tiny_run
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": str(i), "question": f"Q{i}?",
                                               "answers": ["A"]} for i in range(3)])
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"id": "1", "text": "Nerys was born in Avonlea."}])
    culprit, extra = corpus, {}
    if case == "empty corpus":
        corpus.write_text("")
    elif case == "no text":
        write_jsonl(corpus, [{"id": "1", "text": "t"}, {"id": "2", "title": "no text"}])
    elif case == "tsv without header":
        culprit = corpus = tmp_path / "psgs.tsv"
        corpus.write_text("1\tNerys was born in Avonlea.\tNerys\n")
    elif case == "qa wrong format":
        culprit, extra = qa, {"qa_format": "hotpotqa"}
    else:
        culprit = corpus = tmp_path / "corpus.jsonl.gz"
        data = gzip.compress(b"".join(json.dumps({"id": str(i), "text": "x " * 50}).encode()
                                      + b"\n" for i in range(200)))
        corpus.write_bytes(data[: len(data) // 2])
    exits_with_one_line(capsys, lambda: train.main(qa_config(tmp_path, out / "base", corpus, qa,
                                                             **extra)), culprit.name)


def test_a_non_utf8_question_is_one_line(tiny_run, capsys):
    _, out = tiny_run
    bad = b"Where was \xff born?".decode("utf-8", "surrogateescape")  # as argv delivers it
    assert infer.main(["--run", str(out), "--question", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--question is not valid UTF-8" in err and "xff" in err, err


# ---- 8. no network lookups when W&B is offline -------------------------------------------------
SPY = """
import socket
def refuse(host, *args, **kwargs):
    with open({log!r}, "a") as f:
        f.write(str(host) + "\\n")
    raise OSError("no network in this test")
socket.getaddrinfo = refuse
"""


def test_evaluate_makes_no_network_lookup_with_wandb_offline(own_run, tmp_path):
    _, run = own_run
    spy, log = tmp_path / "spy", tmp_path / "lookups.txt"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SPY.format(log=str(log)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "evaluate.py", "--run", str(run), "--modes", "vanilla",
                           "--limit", "3"], capture_output=True, text=True, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(spy), "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(run.glob("eval/wandb/offline-run-*"))  # W&B did run, offline, beside the report
    assert not log.exists(), log.read_text()


# ---- 9. CPU arithmetic does not depend on the CPU's vector units ------------------------------
STEPS = """
import hashlib, sys
import dyprag, torch, transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                  num_hidden_layers=2, num_attention_heads=4)
model = transformers.LlamaForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(5):
    x = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(step))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""


def test_training_gives_the_same_bits_with_avx2_or_avx512_kernels():
    """MKL_ENABLE_INSTRUCTIONS=AVX2 makes this machine's MKL act as on a CPU without AVX-512
    (the kind that printed another table in issue 13); importing dyprag pins both."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    hashes = {subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True,
                             env={**env, **extra}, check=True).stdout
              for extra in ({}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"})}
    assert len(hashes) == 1, hashes


# ---- 10. a prompt past the model's context is refused ------------------------------------------
def test_more_passages_than_the_context_holds_is_one_line(tiny_run, capsys):
    _, out = tiny_run
    assert infer.main(["--run", str(out), "--question", QUESTION, "--mode", "rag",
                       "--k", "40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exceeds the model's context of 512 tokens" in err, err


def test_the_embedder_cuts_a_huge_passage_before_tokenizing(monkeypatch):
    from dyprag.retrieval import embed

    embedder = embed.Embedder()
    seen = []
    original = embedder.model.encode
    monkeypatch.setattr(embedder.model, "encode",
                        lambda texts, **kw: seen.append(texts) or original(texts, **kw))
    passages = ["Nerys Northcott was born in Avonlea. " * 600, "x " * 20_000, "short"]
    cut = embedder.encode(passages)
    limit = embed.CHARS_PER_TOKEN * embedder.model.max_seq_length
    assert [len(t) for t in seen[-1]] == [limit, limit, 5]
    monkeypatch.setattr(embed, "CHARS_PER_TOKEN", 10**9)  # no cut: the same vectors
    assert_close(embedder.encode(passages), cut)


@contextlib.contextmanager
def writer_of(run: Path):
    """Another process holding ``run``'s writer lock for the ``with`` block; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from dyprag.rundir import lock\nwith lock(Path(sys.argv[1])):\n"
         "    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_of_a_run_exits_2_naming_the_first(tmp_path, capsys):
    run = tmp_path / "runs" / "busy"
    with writer_of(run) as pid:
        err = exits_with_one_line(capsys, lambda: train.main(
            [f"run.root={run.parent}", "run.name=busy"]), f"process {pid}", str(run))
        assert "is being written" in err
        assert not run.exists()  # nothing written
    from dyprag.rundir import lock  # free again once the holder is gone
    with lock(run):
        assert (run.parent / ".busy.lock").read_text() == str(os.getpid())


def test_evaluate_writing_into_a_run_being_written_exits_2_before_loading_it(own_run, capsys,
                                                                            monkeypatch):
    import evaluate
    from dyprag.run.trained_run import TrainedRun

    _, run = own_run
    monkeypatch.setattr(TrainedRun, "open", lambda *a, **kw: pytest.fail("the run was opened"))
    with writer_of(run) as pid:
        assert evaluate.main(["--run", str(run), "--limit", "1", "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"being written by process {pid}" in err, err
    assert not (run / "eval").exists()
