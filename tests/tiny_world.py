"""The tiny world's run config: a world of 30 + 12 + 6 people and a 2-layer base model, trained
end to end in well under a minute. The tests' shared run (tests/conftest.py) and
bench/gpu_check.py's dry run both use it. Imports neither pytest nor dyprag."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN_MODES = ["vanilla", "rag@1", "prag@1", "dyprag@1", "dyprag@3", "dyprag+rag@3"]


def tiny_run_config(tmp: Path) -> Path:
    """A run config over a world of 30 + 12 + 6 people and a 2-layer base model, whose
    answers are not empty and differ between modes (so tests that compare answers can fail)."""
    schema = yaml.safe_load((ROOT / "configs" / "world.yaml").read_text())
    schema["splits"] = {"pretrain": 30, "train": 12, "test": 6}
    (tmp / "world.yaml").write_text(yaml.safe_dump(schema))
    config = {
        "run": {"name": "tiny", "root": str(tmp / "checkpoints")},
        "data": {"world": str(tmp / "world.yaml"), "extra_docs": 24},
        "model": {"pretrain": {"reading_single": 100, "reading_multi": 60, "hidden_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "intermediate_size": 96, "warmup_steps": 5, "lr": 1e-2}},
        "bank": {"epochs": 2, "docs_per_step": 8},
        "train": {"epochs": 2, "batch_size": 8, "warmup_steps": 2},
        "eval": {"modes": TINY_RUN_MODES, "samples": 12},
        "wandb": {"mode": "offline"},
    }
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp / "run.yaml"
