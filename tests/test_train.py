"""train.py end to end on a tiny world: table, outputs, logs, checkpoints, cache, resume, ddp."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import exits_with_one_line
from safetensors.torch import load_file
from tiny_world import TINY_RUN_MODES as MODES
from torch.testing import assert_close

import train
from dyprag.config import load_config
from dyprag.engine.inject import inject_lora
from dyprag.engine.models import load_model
from dyprag.files import read_json
from dyprag.training.translator import load_translator

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
LOGGED = ["train/loss", "train/lm", "train/kl", "train/mse", "train/lr", "train/grad_norm",
          "train/lora_rms_student", "train/lora_rms_teacher", "val/loss", "val/kl",
          "val/dyprag_f1", "eval/translator_fit_f1/seen", "eval/dyprag_irrelevant",
          "eval/delta_cosine", *(f"eval/{score}/{m}" for score in ("f1", "em", "acc") for m in MODES)]


@pytest.fixture
def run(tiny_run):
    return tiny_run


def table_rows(stdout: str) -> list[list[str]]:
    """The rows (mode, EM, F1, acc) of the one table in what train.py printed."""
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == ["mode", "EM", "F1", "acc"]]
    assert len(header) == 1, stdout[-3000:]
    assert set(lines[header[0] + 1]) == {"-"}, lines[header[0] + 1]
    rows = []
    for line in lines[header[0] + 2:]:
        # the recall line ("recall@1 0.500, recall@5 0.800") and the footer follow the rows
        if len(line.split()) != 4 or line.startswith("recall@"):
            break
        rows.append(line.split())
    return rows


def test_the_run_prints_a_table_and_writes_every_mode(run, tiny_run_stdout):
    _, out = run
    results = read_json(out / "eval.json")
    assert list(results["f1"]) == list(results["em"]) == list(results["acc"]) == MODES
    assert all(0 <= results[score][m] <= 1 for score in ("f1", "em", "acc") for m in MODES)
    assert all(results["em"][m] <= results["acc"][m] for m in MODES)
    assert table_rows(tiny_run_stdout) == [[m, f"{results['em'][m]:.3f}", f"{results['f1'][m]:.3f}",
                                            f"{results['acc'][m]:.3f}"] for m in MODES]
    assert f"{results['questions']} test questions" in tiny_run_stdout


def test_the_run_ends_with_its_directory_plot_and_the_command_to_try_next(run, tiny_run_stdout):
    _, out = run
    tail = tiny_run_stdout.rstrip().splitlines()[-3:]
    question = read_json(out / "eval.json")["samples"][0]["question"]
    assert tail[0].startswith(f"run:   {out}")
    assert tail[1] == f"plot:  {out / 'f1.png'}"
    assert (out / "f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tail[2] == f"next:  python infer.py --run {out} --question {question!r}"


def test_eval_json_describes_the_run(run):
    config, out = run
    results = read_json(out / "eval.json")
    assert results["questions"] == 60 and results["translator_params"] > 0
    # the translator's document dependence, with the table's line for it
    assert 0 <= results["dyprag_irrelevant"] <= 1 and -1 <= results["delta_cosine"] <= 1
    # how the run asked and augmented (the world: plain prompts, template QA), and its stages
    assert (results["prompt_format"], results["augment"]) == ("plain", "template")
    assert {"data", "base", "index", "augment", "bank", "embeddings", "translator",
            "eval"} <= set(results["stage_seconds"])
    assert load_config(out / "config.yaml") == load_config(config)  # the resolved config


def test_eval_json_has_f1_by_mode_and_fact(run):
    _, out = run
    results = read_json(out / "eval.json")
    schema = read_json(out / "world" / "schema.json")
    assert list(results["f1_by_fact"]) == MODES
    for mode, by in results["f1_by_fact"].items():
        assert sorted(by) == sorted(schema["attributes"])
        # every fact is asked equally often about every test entity: the mean is the F1
        assert sum(by.values()) / len(by) == pytest.approx(results["f1"][mode], abs=1e-9)


def test_csv_log_holds_every_term_and_the_eval(run):
    config, out = run
    first = out / "logs" / "version_0"  # the first attempt's: its fit and its eval
    with (first / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for key in LOGGED:
        assert any(row.get(key) for row in rows), f"{key} missing from metrics.csv"
    for score in ("f1", "acc"):
        key = f"eval/{score}/{{}}"
        logged = {m: float(next(row[key.format(m)] for row in rows if row.get(key.format(m))))
                  for m in MODES}
        assert logged == pytest.approx(read_json(out / "eval.json")[score], abs=1e-6), score
    with (first / "samples.csv").open() as f:
        samples = list(csv.DictReader(f))
    assert len(samples) == load_config(config).eval.samples
    assert set(samples[0]) == {"question", "gold", *MODES}


def wandb_inspect(path: Path, *flags: str) -> str:
    """W&B's own reader of an offline run file, ``wandb leet inspect --json``: one record per
    line, or with ``--summary`` one object (state, config, summary)."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags,
                           str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_wandb_offline_run_holds_every_term_the_eval_and_the_samples_table(run):
    _, out = run
    # The first run is train.py's (evaluate.py may add its own later); names hold the time.
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    records = [json.loads(line) for line in wandb_inspect(files[0]).splitlines()]
    keys = {key for r in records if r["type"] == "history" for key in r["history"]["item"]}
    assert set(LOGGED) <= keys, set(LOGGED) - keys
    summary = json.loads(wandb_inspect(files[0], "--summary"))
    assert summary["state"] == "finished"
    results = read_json(out / "eval.json")
    assert {m: summary["summary"][f"eval/f1/{m}"] for m in MODES} == \
        pytest.approx(results["f1"], abs=1e-6)
    table = summary["summary"]["eval/samples"]
    assert table["_type"] == "table-file"
    stored = json.loads((files[0].parent / "files" / table["path"]).read_text())
    assert stored["columns"] == ["question", "gold", *MODES]
    assert stored["data"] == [[s[c] for c in stored["columns"]] for s in results["samples"]]


def test_translator_checkpoint_round_trips(run):
    _, out = run
    meta = read_json(out / "translator" / "meta.json")
    model, _ = load_model(out / "base")
    shapes = inject_lora(model).shapes
    translator, _ = load_translator(out / "translator", meta["base_model"], shapes)
    stored = load_file(out / "translator" / "translator.safetensors")
    restored = translator.state_dict()
    assert restored.keys() == stored.keys()
    for key, tensor in stored.items():
        assert_close(restored[key], tensor, rtol=0, atol=0)
    emb = torch.randn(2, meta["embedding_dim"])
    again, _ = load_translator(out / "translator", meta["base_model"], shapes)
    assert_close(translator(emb).A, again(emb).A, rtol=0, atol=0)
    assert_close(translator(emb).B, again(emb).B, rtol=0, atol=0)


def test_translator_checkpoint_refuses_another_base_model_or_shape(run):
    _, out = run
    meta = read_json(out / "translator" / "meta.json")
    model, _ = load_model(out / "base")
    shapes = inject_lora(model).shapes
    with pytest.raises(ValueError, match="meta-llama/Llama-3.2-1B.*" + meta["base_model"]
                       + "|" + meta["base_model"] + ".*meta-llama/Llama-3.2-1B"):
        load_translator(out / "translator", "meta-llama/Llama-3.2-1B", shapes)
    other = {k: (i * 2, o) for k, (i, o) in shapes.items()}
    with pytest.raises(ValueError, match="layer 0"):
        load_translator(out / "translator", meta["base_model"], other)


def stage_outputs(out: Path) -> dict[str, tuple[str, int]]:
    """Every file the stages wrote (all but the run's description, config.yaml, eval.json and
    f1.png, and its logs), by relative path → (content hash, st_mtime_ns)."""
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                      p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in
            ("config.yaml", "eval.json", "f1.png", "logs", "wandb")}


def test_a_second_run_reuses_every_stage(own_run, tiny_run_stdout, capsys):
    (_, config, root, _), out = own_run
    before, results = stage_outputs(out), read_json(out / "eval.json")
    assert {"world", "base", "index", "augmented.jsonl", "augmented-eval.jsonl", "bank",
            "bank-eval", "translator"} <= {Path(p).parts[0] for p in before}
    assert not (out / "lightning").exists()  # the fit's checkpoints go once it is saved
    capsys.readouterr()
    train.main(["--config", config, root])  # the same command again
    printed = capsys.readouterr().out
    after = stage_outputs(out)
    rebuilt = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not rebuilt, rebuilt  # not one file rewritten, added or removed
    again = read_json(out / "eval.json")
    assert (again["f1"], again["em"], again["acc"], again["samples"]) == \
        (results["f1"], results["em"], results["acc"], results["samples"])
    assert table_rows(printed) == table_rows(tiny_run_stdout)


class Interrupt(pl.Callback):
    """Counts training batches; raises at the first batch of epoch ``crash_at``, after the
    previous epoch's checkpoint is written."""

    def __init__(self, crash_at: int | None):
        self.crash_at, self.batches = crash_at, 0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.current_epoch == self.crash_at:
            raise RuntimeError("simulated crash")
        self.batches += 1


def test_an_interrupted_fit_resumes_from_its_last_checkpoint(own_run, monkeypatch):
    from dyprag.run import pipeline
    from dyprag.training import fit

    (_, config_path, root, _), out = own_run
    config = load_config(config_path, [root, "train.lr=2e-3", "eval.modes=[vanilla]"])
    fit = fit.fit_translator
    crash = Interrupt(crash_at=1)
    monkeypatch.setattr(pipeline, "fit_translator", lambda *a, **kw: fit(*a, **kw, callbacks=[crash]))
    finished = read_json(out / "translator" / "meta.json")["fingerprint"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        pipeline.run(config)
    attempt = out.parent / f".{out.name}.attempt"  # a rerun of a finished run works here
    assert (attempt / "lightning" / "last.ckpt").is_file()
    assert read_json(attempt / "lightning" / "fingerprint.json")["fingerprint"] != finished
    assert read_json(out / "translator" / "meta.json")["fingerprint"] == finished
    counter = Interrupt(crash_at=None)
    monkeypatch.setattr(pipeline, "fit_translator", lambda *a, **kw: fit(*a, **kw, callbacks=[counter]))
    pipeline.run(config)
    steps_per_epoch = crash.batches  # the crashed run finished epoch 0 only
    assert counter.batches == steps_per_epoch  # only the second epoch ran again
    assert read_json(out / "translator" / "meta.json")["fingerprint"] != finished
    assert not (out / "lightning").exists()  # resumed, saved: its checkpoints are gone


def test_ddp_with_two_cpu_processes(own_run):
    (_, config, root, _), out = own_run
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", config, root, "train.lr=3e-3",
         "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu",
         "eval.modes=[vanilla,dyprag@1]"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dyprag@1" in proc.stdout
    assert "lr: 0.003" in (out / "config.yaml").read_text()  # the ddp fit made the run
    assert read_json(out / "translator" / "meta.json")["train_docs"] > 0
    assert not (out / "lightning").exists()


def test_a_torchrun_launch_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    exits_with_one_line(capsys, lambda: train.main([]), "not torchrun", alone=True)


def test_bad_overrides_exit_2_with_one_line_naming_the_fields(capsys):
    err = exits_with_one_line(capsys, lambda: train.main(["train.lr=fast", "train.bogus=1"]),
                              alone=True)
    assert re.search("train.bogus: unknown key.*train.lr: must be float", err), err
