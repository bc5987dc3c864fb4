"""dyprag.training.progress: one bar over a whole fit, with its time left."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from dyprag.training.progress import FitProgress


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_bar_counts_every_epoch_of_the_fit_and_names_its_stage():
    data = DataLoader(TensorDataset(torch.randn(12, 2), torch.randn(12, 1)), batch_size=4)
    seen = []

    class Spy(FitProgress):
        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            bar = self.train_progress_bar
            seen.append((bar.n, bar.total, bar.desc))

    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[Spy("translator", refresh_rate=1)])
    trainer.fit(Regression(), data)
    assert [n for n, _, _ in seen] == list(range(1, 7))  # 3 batches × 2 epochs, one bar
    assert {total for _, total, _ in seen} == {6}
    assert seen[0][2].startswith("translator (epoch 1/2)")
    assert seen[-1][2].startswith("translator (epoch 2/2)")
