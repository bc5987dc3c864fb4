"""infer.py on the tiny trained run: every mode, --json, batching, PEFT export, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_world import TINY_RUN_MODES

import infer
from dyprag.data.qa import load_qa
from dyprag.run.trained_run import RunError, TrainedRun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def questions(tiny_run):
    _, out = tiny_run
    return [qa.question for qa in load_qa(out / "world" / "qa_test.jsonl", limit=4)]


@pytest.fixture(scope="module")
def telling_sample(tiny_run) -> dict:
    """The first of eval.json's sample questions whose answers differ between modes (one with
    a non-empty answer), so that an answer taken from the wrong mode would show."""
    _, out = tiny_run
    samples = json.loads((out / "eval.json").read_text())["samples"]
    telling = [s for s in samples if len({s[m] for m in TINY_RUN_MODES}) > 1]
    assert telling, "the tiny run answers every sample question alike in every mode"
    return telling[0]


@pytest.mark.parametrize("mode", TINY_RUN_MODES)
def test_every_mode_answers_as_the_runs_evaluation_did(tiny_run, telling_sample, mode, capsys):
    """infer.py's answer to a test question is the one train.py's evaluation gave in that
    mode (eval.json's sample): another path (batched, the run still in memory)."""
    _, out = tiny_run
    sample, question = telling_sample, telling_sample["question"]
    name, _, k = mode.partition("@")
    code = infer.main(["--run", str(out), "--question", question, "--mode", name, "--json",
                       "--k", k or "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err  # prag: the top-1 test documents are in bank-eval/
    row = json.loads(captured.out.strip().splitlines()[-1])
    assert set(row) == {"question", "mode", "answer", "passages"}
    assert (row["question"], row["mode"]) == (question, mode)
    assert row["answer"] == sample[mode] and "\n" not in row["answer"]
    assert len(row["passages"]) == int(k or 1)
    assert all({"id", "score", "text"} == set(p) and p["text"].strip() for p in row["passages"])


def test_only_retrieved_passages_are_read_and_a_foreign_corpus_is_named(tiny_run, questions,
                                                                         tmp_path):
    _, out = tiny_run
    run = TrainedRun.open(out)
    assert run.knowledge.passages == {}
    hits = run.retrieve(questions[:1], 2)
    assert set(run.knowledge.passages) == {d for d, _ in hits[0]}
    assert run.knowledge.passages[hits[0][0][0]].strip()
    run.knowledge.passages.clear()
    run.corpus = tmp_path / "other.jsonl"
    run.corpus.write_text(json.dumps({"id": "zz", "text": "Nobody was born anywhere."}) + "\n")
    with pytest.raises(RunError, match=r"\['e\d+'\] of the index are not in the run's corpus "
                       + re.escape(str(run.corpus))):
        run.retrieve(questions[:1], 1)


def test_batched_answers_equal_one_at_a_time(tiny_run):
    _, out = tiny_run
    questions = [s["question"] for s in json.loads((out / "eval.json").read_text())["samples"]]
    run = TrainedRun.open(out)
    hits = run.retrieve(questions, 3)
    batched = run.answer(questions, hits, "dyprag+rag@3", batch_size=len(questions))
    alone = [run.answer([q], [h], "dyprag+rag@3")[0] for q, h in zip(questions, hits)]
    assert batched == alone
    assert len(set(alone)) > 1  # the questions' answers differ: a mixed-up batch would show


def test_a_questions_file_skips_malformed_lines(tiny_run, questions, tmp_path, capsys):
    _, out = tiny_run
    path = tmp_path / "q.jsonl"
    path.write_text(f'{questions[0]}\n{{"question": "{questions[1]}"}}\n{{"oops": 1}}\n{{bad\n')
    assert infer.main(["--run", str(out), "--questions-file", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["question"] for line in captured.out.strip().splitlines()] == \
        questions[:2]
    assert captured.err.count("skipped") == 2
    assert "q.jsonl:3" in captured.err and "q.jsonl:4" in captured.err


def test_export_peft_writes_an_adapter(tiny_run, questions, tmp_path):
    _, out = tiny_run
    assert infer.main(["--run", str(out), "--question", questions[0],
                       "--export-peft", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_input_is_one_line_and_exit_code_2(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    cases = [["--run", str(out), "--question", "  "],
             ["--run", str(out)],
             ["--run", str(tmp_path / "nowhere"), "--question", "q"],
             ["--run", str(out), "--question", "q", "--k", "0"],
             ["--run", str(out), "--question", "q", "--k", "100000"],  # beyond the corpus
             ["--run", str(out), "--question", "q", "--max-new-tokens", "0"],
             ["--run", str(out), "--questions-file", str(tmp_path / "none.txt")]]
    for argv in cases:
        assert infer.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    with pytest.raises(SystemExit) as exit_:  # argparse: its usage line, then the error
        infer.main(["--run", str(out), "--question", "q", "--mode", "magic"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--mode" in err and "'magic'" in err, err


def test_an_incomplete_run_is_refused(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("translator", "wandb", "bank*"))
    assert infer.main(["--run", str(partial), "--question", "q"]) == 2
    assert "translator/meta.json is missing" in capsys.readouterr().err


def test_evaluate_writes_the_grid_predictions_plot_and_wandb_run(tiny_run, tmp_path, capsys):
    import evaluate

    _, out = tiny_run
    modes = ["vanilla", "rag@1", "dyprag@1"]
    assert evaluate.main(["--run", str(out), "--modes", *modes, "--limit", "12",
                          "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["grid"]["qa_test"]) == modes
    for scores in report["grid"]["qa_test"].values():
        assert {"em", "f1", "acc", "n", "ms_per_question"} <= set(scores) and scores["n"] == 12
        assert scores["em"] <= scores["acc"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 * len(modes) and {"prediction", "f1", "acc", "retrieved"} <= set(rows[0])
    assert all(row["em"] <= row["acc"] for row in rows)
    assert (tmp_path / "f1.png").read_bytes()[:4] == b"\x89PNG"
    assert "| qa_test | dyprag@1 |" in (tmp_path / "report.md").read_text()
    dependence = report["document_dependence"]["qa_test"]  # 12 questions: 2 people at least
    assert 0 <= dependence["dyprag_irrelevant"] <= 1 and -1 <= dependence["delta_cosine"] <= 1
    assert f"| qa_test | {dependence['dyprag_irrelevant']:.3f} |" in (tmp_path / "report.md").read_text()
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/grid_*.table.json"))


def test_evaluate_limit_stays_within_the_test_questions(tmp_path):
    import evaluate

    qa = tmp_path / "dev.jsonl"  # PRAG's layout: the first 2 test, the rest train
    qa.write_text("".join(json.dumps({"question": f"q{i}?", "answers": ["a"]}) + "\n"
                          for i in range(6)))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "text": "t"}) + "\n")
    data = types.SimpleNamespace(kind="qa", corpus=str(corpus), train_qa=str(qa), test_qa=str(qa),
                                 qa_format=None, train_questions=None, test_questions=2)
    run = types.SimpleNamespace(config=types.SimpleNamespace(data=data), path=tmp_path)

    def asked(limit):
        args = types.SimpleNamespace(qa=[], limit=limit)
        return [x.question for x in evaluate.datasets(args, run)[0][1]]

    assert asked(None) == asked(5) == ["q0?", "q1?"]
    assert asked(1) == ["q0?"]


def test_evaluate_refuses_an_unknown_mode(tiny_run, capsys):
    import evaluate

    _, out = tiny_run
    assert evaluate.main(["--run", str(out), "--modes", "dyprag"]) == 2
    assert "dyprag@3" in capsys.readouterr().err


def test_the_run_reads_its_two_banks_as_one(tiny_run):
    from dyprag.training.bank import BankSet, LoRABank

    _, out = tiny_run
    train, test = LoRABank(out / "bank"), LoRABank(out / "bank-eval")
    a, b = next(iter(train.index)), next(d for d in test.index if d not in train)
    both = BankSet([train, test]).get([b, a])
    for key in both.keys:
        assert torch.equal(both.A[key][0], test.get([b]).A[key][0])
        assert torch.equal(both.B[key][1], train.get([a]).B[key][0])
    with pytest.raises(KeyError, match="none of the banks"):
        BankSet([train, test]).get(["no-such-doc"])


def test_json_output_is_json_only_with_wandb_offline(tiny_run, questions):
    """A fresh process (library imports print at import time), W&B offline as the Makefile
    sets it: every stdout line is one JSON object."""
    _, out = tiny_run
    result = subprocess.run([sys.executable, "infer.py", "--run", str(out), "--question",
                             questions[0], "--mode", "rag", "--json"], capture_output=True,
                            text=True, cwd=Path(infer.__file__).parent,
                            env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["question"] == questions[0], result.stdout
