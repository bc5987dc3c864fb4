"""dyprag.training.optim: the learning-rate schedule every trainer here uses."""

from __future__ import annotations

import math

import pytest
import torch

from dyprag.training.optim import adamw_warmup_cosine


def test_warmup_starts_at_lr_over_w_then_a_half_cosine_reaches_zero():
    weight = torch.nn.Parameter(torch.zeros(2))
    [optimizer], [schedule] = adamw_warmup_cosine([weight], lr=0.1, weight_decay=0.0,
                                                   warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule["scheduler"].step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # (step + 1) / w: step 0 learns
    assert lrs[4] == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[12:] == pytest.approx([0.0, 0.0])  # stays at zero past total_steps
    assert schedule["interval"] == "step"
