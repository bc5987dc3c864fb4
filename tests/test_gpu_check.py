"""bench/gpu_check.py --dry-run: the GPU machine's check script runs end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~15 s: a tiny world trained end to end, in a subprocess


def test_dry_run_prints_every_check_as_json(tmp_path):
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert {"inject", "bank", "world", "peak_gpu_mib", "skipped"} <= set(result)
    assert result["skipped"] == [] and result["failed"] == []
    assert result["peak_gpu_mib"] == {"max": None}  # no CUDA in a dry run

    for dtype in ("float32", "bfloat16"):
        inject = result["inject"][dtype]
        assert inject["max_abs_diff"] <= inject["tol"], inject
        assert inject["lora_effect"] > 2 * inject["tol"], inject
    assert result["bank"]["speedup"] > 0
    assert result["bank"]["loss_batched"] == pytest.approx(result["bank"]["loss_sequential"], rel=0.05)

    world = result["world"]
    assert set(world["f1"]) == {"vanilla", "rag@1", "prag@1", "dyprag@1"}
    assert all(0.0 <= f1 <= 1.0 for f1 in world["f1"].values())
    assert {"data", "base", "index", "bank", "translator", "eval"} <= set(world["stage_seconds"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_dry_run_exits_2():
    done = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA" in done.stderr and len(done.stderr.strip().splitlines()) == 1
