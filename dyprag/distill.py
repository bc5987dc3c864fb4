"""Distilling the LoRA bank into the parameter translator (DyPRAG's training), in Lightning.

For a batch of (document, training example) rows, with ``student = translator(embedding)``
and ``teacher`` = the document's bank LoRA, both injected per sample:

    L = w_lm · L_lm + w_kl · L_kl + w_mse · L_mse        (DyPRAG: 1, 0.01, 100)

- ``L_lm``: next-token loss on the example's labelled tokens with the student injected;
- ``L_kl``: KL(teacher ‖ student) of the next-token distributions, **averaged over real
  tokens only** (DyPRAG's reference code averages over padding too);
- ``L_mse``: distance of student to teacher, in delta space (``delta_distance``, independent
  of how ΔW is factorised; the default) or factor space (``factor_mse``, DyPRAG's), averaged
  over the batch and divided by the number of targets.

The frozen base model is held outside the module's parameters, so checkpoints hold the
translator only.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from dyprag.inject import inject_lora
from dyprag.lora import LoRA, delta_distance, factor_mse
from dyprag.optim import adamw_warmup_cosine
from dyprag.prompts import Segments, collate
from dyprag.translator import ParameterTranslator


class DistillationData(Dataset):
    """Rows of (document index, one of its training examples).

    ``embeddings``: ``(num_docs, D)``; ``teachers``: the documents' bank LoRAs batched in the
    same order; ``examples[i]``: document ``i``'s training sequences.
    """

    def __init__(self, embeddings: Tensor, teachers: LoRA, examples: Sequence[Sequence[Segments]]):
        if not (embeddings.shape[0] == teachers.batch_size == len(examples)):
            raise ValueError(f"{embeddings.shape[0]} embeddings, {teachers.batch_size} bank "
                             f"LoRAs and {len(examples)} example lists must match")
        self.embeddings, self.teachers = embeddings, teachers
        self.rows = [(i, ex) for i, doc in enumerate(examples) for ex in doc]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Segments]:
        return self.rows[index]

    def collate(self, tokenizer, rows: Sequence[tuple[int, Segments]]) -> dict:
        docs = torch.tensor([i for i, _ in rows])
        batch = collate(tokenizer, [ex for _, ex in rows])
        batch["embedding"] = self.embeddings[docs]
        teacher = self.teachers[docs]
        batch["teacher_A"], batch["teacher_B"] = teacher.A, teacher.B
        return batch


class TranslatorDistillation(pl.LightningModule):
    """Trains ``translator`` against a frozen ``model`` and the bank's LoRAs."""

    def __init__(self, model, translator: ParameterTranslator, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0, total_steps: int = 1,
                 w_lm: float = 1.0, w_kl: float = 0.01, w_mse: float = 100.0,
                 mse_space: str = "delta"):
        super().__init__()
        if mse_space not in ("delta", "factor"):
            raise ValueError(f"mse_space must be 'delta' or 'factor', got {mse_space!r}")
        self.translator = translator
        # Not a submodule: the frozen base stays out of state_dict and checkpoints.
        self.__dict__["base"] = model
        self.injection = inject_lora(model)
        self.lr, self.wd, self.warmup, self.total = lr, weight_decay, warmup_steps, total_steps
        self.weights = {"lm": w_lm, "kl": w_kl, "mse": w_mse}
        self.mse_space = mse_space

    def losses(self, batch: dict) -> dict[str, Tensor]:
        student = self.translator(batch["embedding"])
        teacher = LoRA(batch["teacher_A"], batch["teacher_B"], self.translator.alpha)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        with self.injection.use(student):
            logits = self.base(input_ids=ids, attention_mask=mask).logits.float()  # (N, T, V)
        with torch.no_grad(), self.injection.use(teacher.to(dtype=student.dtype)):
            teacher_logits = self.base(input_ids=ids, attention_mask=mask).logits.float()
        lm = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        kl_tokens = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits, -1),
                             log_target=True, reduction="none").sum(-1)  # (N, T)
        kl = (kl_tokens * mask).sum() / mask.sum()
        distance = delta_distance if self.mse_space == "delta" else factor_mse
        mse = distance(student, teacher).mean() / len(student.keys)
        total = sum(self.weights[k] * v for k, v in (("lm", lm), ("kl", kl), ("mse", mse)))
        return {"loss": total, "lm": lm, "kl": kl, "mse": mse}

    def training_step(self, batch: dict, _: int) -> Tensor:
        losses = self.losses(batch)
        if not torch.isfinite(losses["loss"]):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise FloatingPointError(f"non-finite training loss (terms {bad}) at step "
                                     f"{self.global_step}")
        n = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return losses["loss"]

    def validation_step(self, batch: dict, _: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()},
                      batch_size=batch["input_ids"].shape[0])

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.norm() for p in self.translator.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm())

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.translator.parameters(), self.lr, self.wd,
                                   self.warmup, self.total)
