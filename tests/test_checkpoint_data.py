"""A resume checkpoint is data: one that carries code is refused unread, never run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dyprag.training.fit import _resume_point


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would run instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_and_the_fit_starts_over(tmp_path, capsys):
    ckpt_dir, marker = tmp_path / "lightning", tmp_path / "ran"
    ckpt_dir.mkdir()
    (ckpt_dir / "fingerprint.json").write_text(json.dumps({"fingerprint": "k"}))
    torch.save({"state_dict": {}, "loops": Payload(marker)}, ckpt_dir / "last.ckpt")

    assert _resume_point(ckpt_dir, "k") is None
    assert not marker.exists(), "the checkpoint's code ran"
    assert "last.ckpt holds more than tensors and plain data, refused" in capsys.readouterr().out
    assert not ckpt_dir.exists()  # removed: the fit starts over


def test_a_checkpoint_of_tensors_and_plain_data_is_resumed(tmp_path):
    ckpt_dir = tmp_path / "lightning"
    ckpt_dir.mkdir()
    (ckpt_dir / "fingerprint.json").write_text(json.dumps({"fingerprint": "k"}))
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1, "loops": {"a": [1, 2.0]}},
               ckpt_dir / "last.ckpt")
    assert _resume_point(ckpt_dir, "k") == str(ckpt_dir / "last.ckpt")
