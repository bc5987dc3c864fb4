"""AdamW with linear warm-up and cosine decay to zero: the schedule every trainer here uses.

Not ``transformers.get_cosine_schedule_with_warmup``: its warm-up starts at lr 0 (step / w),
this one at lr / w ((step + 1) / w), so the first step already learns. Switching would change
every trained weight, the world's base model included (whose quality moves with the last bits
of its arithmetic), and with it the default job's table. Ten lines, tested against the formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw_warmup_cosine(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                        warmup_steps: int, total_steps: int) -> tuple[list, list]:
    """``configure_optimizers``' return value: AdamW, and a per-step LambdaLR rising linearly
    over ``warmup_steps`` then following a half cosine to 0 at ``total_steps``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return [optimizer], [{"scheduler": scheduler, "interval": "step"}]
