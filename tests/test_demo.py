"""dyprag.engine.demo: the README's default job injects per-document knowledge end to end."""

from __future__ import annotations

import sys

from dyprag.engine import demo


def test_demo_recalls_every_document_only_with_its_own_lora(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo", "--steps", "120"])
    demo.main()
    out = capsys.readouterr().out
    assert f"own-LoRA completions exactly right: {len(demo.DOCUMENTS)}/{len(demo.DOCUMENTS)}" in out
    assert "batched per-sample generate == one at a time: True" in out
    assert "unmerge restored weights bit-exactly: True" in out
    no_lora = [line for line in out.splitlines() if line.strip().startswith("no LoRA")]
    assert len(no_lora) == len(demo.DOCUMENTS)
    assert not any(answer in line for line, (_, answer) in zip(no_lora, demo.DOCUMENTS))
