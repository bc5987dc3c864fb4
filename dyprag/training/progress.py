"""What a user sees while a job runs: one progress bar per stage, with the time left.

The stages' own loops (augmentation, bank, index) use ``tqdm`` directly. A Lightning fit
(the world's pretraining, the translator) gets ``FitProgress``: Lightning's bar restarts at
every epoch, so its time left is the epoch's; this one counts the whole fit.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import _update_n, convert_inf


class FitProgress(TQDMProgressBar):
    """One bar over every step of a fit, named after its stage, with the epoch and the
    training metrics beside it (a resumed fit starts the bar where it stopped)."""

    def __init__(self, stage: str, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self.stage = stage

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: noise beside the loss
        return metrics

    def on_train_start(self, trainer, *_: Any) -> None:
        super().on_train_start()
        per_epoch = convert_inf(self.total_train_batches)
        bar = self.train_progress_bar
        bar.set_description(self.stage)
        bar.total = None if per_epoch is None else per_epoch * trainer.max_epochs
        _update_n(bar, self._done(trainer))

    @staticmethod
    def _done(trainer) -> int:
        """Training batches done across epochs (restored with a resumed fit)."""
        return trainer.fit_loop.epoch_loop.total_batch_idx + 1

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        self.train_progress_bar.set_description(
            f"{self.stage} (epoch {trainer.current_epoch + 1}/{trainer.max_epochs})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, self._done(trainer)
        if self._should_update(n, bar.total):
            _update_n(bar, n)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
