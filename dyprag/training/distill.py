"""Distilling the LoRA bank into the parameter translator (DyPRAG's training), in Lightning.

For a batch of (document, training example) rows, with ``student = translator(embedding)``
and ``teacher`` = the document's bank LoRA, both injected per sample:

    L = w_lm · L_lm + w_kl · L_kl + w_mse · L_mse        (DyPRAG: 1, 0.01, 100)

- ``L_lm``: next-token loss on the example's labelled tokens with the student injected;
- ``L_kl``: KL(teacher ‖ student) of the next-token distributions, **averaged over real
  tokens only** (DyPRAG's reference code averages over padding too);
- ``L_mse``: distance of student to teacher, in delta space (the default: the mean squared
  error between the entries of ``ΔW_student`` and ``ΔW_teacher``, computed with
  ``delta_distance`` without forming either, so independent of how ΔW is factorised) or in
  factor space (``factor_mse``, DyPRAG's), averaged over targets and the batch.

Also logged: the RMS entry of the generated ΔW beside the bank's (``lora_rms_student`` /
``lora_rms_teacher``), and, on validation, DyPRAG F1 on held-out documents' questions.

The frozen base model is held outside the module's parameters, so checkpoints hold the
translator only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dyprag.config import TrainConfig, choices
from dyprag.engine.generate import generate_answers
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, delta_distance, factor_mse
from dyprag.engine.prefix import final_hidden, logits_at, states_below
from dyprag.engine.prompts import PLAIN, PromptFormat
from dyprag.metrics import score
from dyprag.training.examples import Segments, Tokens, length_sorted, pad, tokenize
from dyprag.training.optim import adamw_warmup_cosine
from dyprag.training.translator import ParameterTranslator


class DistillationData(Dataset):
    """Rows of (document index, one of its training examples), tokenized once.

    ``embeddings``: ``(num_docs, D)``; ``examples[i]``: document ``i``'s training sequences;
    ``distilled``: ``(num_docs,)`` 1 for documents with a bank LoRA, 0 for LM-only ones
    (default: all 1); ``teachers``: the bank LoRAs of the distilled documents, batched in
    their order. LM-only documents share one zero placeholder teacher, which the KL and MSE
    terms ignore (6,000 copies of it would take 1.1 GiB in the world).
    """

    def __init__(self, tokenizer, embeddings: Tensor, teachers: LoRA,
                 examples: Sequence[Sequence[Segments]], distilled: Tensor | None = None):
        self.distilled = torch.ones(len(examples)) if distilled is None else distilled.float()
        n_teachers = int((self.distilled > 0).sum())
        if not (embeddings.shape[0] == len(examples) == len(self.distilled)
                and teachers.batch_size == n_teachers):
            raise ValueError(f"{embeddings.shape[0]} embeddings, {len(examples)} example lists "
                             f"and {len(self.distilled)} flags must match, and {teachers.batch_size} "
                             f"bank LoRAs the {n_teachers} distilled documents")
        self.embeddings = embeddings
        self.teachers = teachers.map(lambda t: torch.cat([t, torch.zeros_like(t[:1])]))
        # Each document's row in ``teachers``: its own, or the placeholder (the last).
        self.teacher_row = torch.where(self.distilled > 0, (self.distilled > 0).cumsum(0) - 1,
                                       n_teachers)
        self.rows = [(i, ex) for i, doc in enumerate(examples) for ex in doc]
        self.tokens = tokenize(tokenizer, [ex for _, ex in self.rows])  # once, not per batch
        self.pad_id = tokenizer.pad_token_id
        self.states: list[Tensor] | None = None

    @torch.no_grad()
    def cache_states(self, model, layer: int, batch_size: int = 32) -> None:
        """Store every row's hidden states entering decoder ``layer`` (``dyprag.engine.prefix``), on
        the CPU, so that each step runs only the layers from ``layer`` on; batches carry them
        as ``states``, padded like the ids."""
        device = next(model.parameters()).device
        order = sorted(range(len(self.tokens)), key=lambda i: len(self.tokens[i][0]))
        states: list[Tensor | None] = [None] * len(self.tokens)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = pad([self.tokens[i] for i in rows], self.pad_id)
            out = states_below(model, batch["input_ids"].to(device),
                               batch["attention_mask"].to(device), layer).cpu()
            for j, i in enumerate(rows):
                states[i] = out[j, :len(self.tokens[i][0])].clone()
        self.states = states

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Tokens, int]:
        """(document index, tokens, row index)."""
        return self.rows[index][0], self.tokens[index], index

    @property
    def lengths(self) -> list[int]:
        """Every row's token count."""
        return [len(ids) for ids, _ in self.tokens]

    def collate(self, rows: Sequence[tuple[int, Tokens, int]]) -> dict:
        docs = torch.tensor([i for i, _, _ in rows])
        batch = pad([ex for _, ex, _ in rows], self.pad_id)
        batch["embedding"] = self.embeddings[docs]
        teacher = self.teachers[self.teacher_row[docs]]
        batch["teacher_A"], batch["teacher_B"] = teacher.A, teacher.B
        batch["distilled"] = self.distilled[docs]
        if self.states is not None:
            batch["states"] = torch.nn.utils.rnn.pad_sequence(
                [self.states[i] for _, _, i in rows], batch_first=True)  # (N, T, H), zero padded
        return batch


def delta_mse(x: LoRA, y: LoRA, entries: Tensor) -> Tensor:
    """Mean squared difference of the entries of ``ΔW_x`` and ``ΔW_y`` over the targets, per
    batch row: ``mean_t ‖ΔW_x,t − ΔW_y,t‖²_F / (in_t · out_t)``, shape ``(N,)``.

    ``entries``: ``in·out`` of each target in ``x.keys`` order."""
    per_target = delta_distance(x, y, per_target=True)  # (N, K)
    return (per_target / entries.to(per_target)).mean(-1)


@dataclass
class ValidationQuestions:
    """Held-out documents' questions for DyPRAG F1 during validation: one row per question,
    its document's embedding, its closed-book prompt and its gold answers."""

    tokenizer: Any
    embeddings: Tensor
    prompts: list[str]
    answers: list[list[str]]
    fmt: PromptFormat = PLAIN  # how answers are read from generations


EXPLODED = 1000.0  # generated ΔW RMS / bank ΔW RMS beyond which a fit has diverged


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``seed + epoch`` alone, so an epoch sees the
    same order whether the fit ran straight through or resumed from a checkpoint (a
    ``RandomSampler`` draws from the global RNG, whose state a resumed process does not
    share). Lightning calls ``set_epoch`` before every epoch.

    With ``lengths``, consecutive batches of ``batch_size`` hold rows of similar lengths
    (``length_sorted`` over windows of ``window`` batches of the permutation): in the world
    a document's closed-book questions are a few times shorter than its questions with the
    passage, so random batches were mostly padding. ``spread`` (``length_sorted``'s) keeps
    rows of nearly equal lengths mixed: sorted by exact length, a batch held one question
    template, and the world's translator learned less from an epoch (bench/RESULTS.md,
    "The five-minute default job")."""

    def __init__(self, n: int, seed: int, lengths: Sequence[int] | None = None,
                 batch_size: int = 1, window: int = 64, spread: float = 0.5):
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.spread = spread

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is not None:
            order = length_sorted(order, [self.lengths[i] for i in order], self.batch_size,
                                  self.window, random.Random(self.seed + self.epoch),
                                  spread=self.spread)
        return iter(order)


class DistillationDataModule(pl.LightningDataModule):
    """Training and held-out ``DistillationData``, batched with ``DistillationData.collate``;
    training rows in a ``seed``ed order per epoch, batched by length (``EpochShuffle``)."""

    def __init__(self, train: DistillationData, val: DistillationData | None = None,
                 batch_size: int = TrainConfig.batch_size,
                 num_workers: int = TrainConfig.num_workers, seed: int = 0):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def _loader(self, data: DistillationData, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=data.collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, EpochShuffle(len(self.train), self.seed,
                                                     self.train.lengths, self.batch_size))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val) if self.val is not None else []


class TranslatorDistillation(pl.LightningModule):
    """Trains ``translator`` against a frozen ``model`` and the bank's LoRAs."""

    def __init__(self, model, translator: ParameterTranslator, lr: float = TrainConfig.lr,
                 weight_decay: float = TrainConfig.weight_decay,
                 warmup_steps: int = TrainConfig.warmup_steps, total_steps: int | None = None,
                 w_lm: float = TrainConfig.w_lm, w_kl: float = TrainConfig.w_kl,
                 w_mse: float = TrainConfig.w_mse, mse_space: str = TrainConfig.mse_space,
                 kl_on: str = TrainConfig.kl_on, first_layer: int = 0):
        super().__init__()
        if mse_space not in choices(TrainConfig, "mse_space"):
            raise ValueError(f"mse_space must be one of {choices(TrainConfig, 'mse_space')}, "
                             f"got {mse_space!r}")
        self.translator = translator
        # Not a submodule: the frozen base stays out of state_dict and checkpoints.
        self.__dict__["base"] = model
        self.injection = inject_lora(model)
        self.lr, self.wd, self.warmup, self.total = lr, weight_decay, warmup_steps, total_steps
        self.weights = {"lm": w_lm, "kl": w_kl, "mse": w_mse}
        self.mse_space = mse_space
        if kl_on not in choices(TrainConfig, "kl_on"):
            raise ValueError(f"kl_on must be one of {choices(TrainConfig, 'kl_on')}, got {kl_on!r}")
        self.kl_on = kl_on
        # > 0: batches carry ``states`` entering this layer (``DistillationData.cache_states``)
        self.first_layer = first_layer
        # Entries of ΔW per target, for the delta-space MSE's mean: Σ_targets in·out.
        self.delta_entries = torch.tensor([translator.shapes[k][0] * translator.shapes[k][1]
                                           for k in translator.keys])
        self.val_qa: ValidationQuestions | None = None

    def on_fit_start(self) -> None:
        # The base model is not a submodule, so Lightning does not move it: each process of a
        # multi-device run puts it on its own device here.
        self.base.to(self.device)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        student = self.translator(batch["embedding"])
        teacher = LoRA(batch["teacher_A"], batch["teacher_B"], self.translator.alpha)
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        states = batch.get("states")  # the frozen layers' output (``cache_states``)
        # (N,): 1 where the row's document has a teacher (a bank LoRA)
        w = batch.get("distilled", torch.ones(ids.shape[0])).to(ids.device).float()
        # Position t predicts token t + 1: the LM term reads the labelled ones, the KL term
        # every real token (``kl_on: all``, DyPRAG's) or the labelled ones; logits only there.
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # (N, T)
        lm_at = targets != -100
        taught = w > 0
        kl_at = (mask.bool() if self.kl_on == "all" else lm_at) & taught[:, None]
        if not self.weights["kl"]:
            kl_at = torch.zeros_like(kl_at)
        keep = lm_at | kl_at
        with self.injection.use(student):
            hidden = final_hidden(self.base, ids, mask, states, self.first_layer)
        logits = logits_at(self.base, hidden, keep)  # (M, V), row-major over ``keep``
        lm = F.cross_entropy(logits[lm_at[keep]], targets[lm_at])
        kl = logits.new_zeros(())
        if kl_at.any():  # the teacher's forward only on the rows its KL counts in
            t = taught.nonzero().squeeze(1)
            with torch.no_grad(), self.injection.use(teacher[t].to(dtype=student.dtype)):
                teacher_hidden = final_hidden(self.base, ids[t], mask[t],
                                              None if states is None else states[t],
                                              self.first_layer)
                teacher_logits = logits_at(self.base, teacher_hidden, kl_at[t])
            kl_tokens = F.kl_div(F.log_softmax(logits[kl_at[keep]], -1),
                                 F.log_softmax(teacher_logits, -1),
                                 log_target=True, reduction="none").sum(-1)  # (M_kl,)
            kl_w = w[:, None].expand_as(kl_at)[kl_at]
            kl = (kl_tokens * kl_w).sum() / kl_w.sum().clamp_min(1)
        if self.mse_space == "delta":
            rows = delta_mse(student, teacher, self.delta_entries)  # (N,)
        else:
            rows = factor_mse(student, teacher)
        def over_distilled(per_row: Tensor) -> Tensor:  # mean over rows with a teacher
            return (per_row * w).sum() / w.sum().clamp_min(1)

        mse = over_distilled(rows)
        terms = {"lm": lm, "kl": kl, "mse": mse}
        total = sum(self.weights[k] * v for k, v in terms.items())
        with torch.no_grad():
            zero = student.map(torch.zeros_like)
            teacher_ms = over_distilled(delta_mse(teacher, zero, self.delta_entries))
            norms = {"lora_rms_student": delta_mse(student, zero, self.delta_entries).mean().sqrt(),
                     "lora_rms_teacher": teacher_ms.sqrt()}
        return {"loss": total, **terms, **norms}

    def training_step(self, batch: dict, _: int) -> Tensor:
        losses = self.losses(batch)
        self.check_divergence(losses)
        n = batch["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=n)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return losses["loss"]

    def check_divergence(self, losses: dict[str, Tensor]) -> None:
        """Stop the fit (``FloatingPointError``, one line naming the step and the likely cause)
        when the loss is not finite, or the generated ΔW has blown up: its RMS entry over
        ``EXPLODED`` times the bank's (a fit that diverged short of NaN: the loss then sits flat
        above its untrained value while the weights grow without bound)."""
        if not torch.isfinite(losses["loss"]):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            raise self._diverged(f"non-finite training loss (terms {bad})")
        student, teacher = float(losses["lora_rms_student"]), float(losses["lora_rms_teacher"])
        if teacher > 0 and not student <= EXPLODED * teacher:
            raise self._diverged(f"the generated ΔW's RMS entry is {student:.3g}, "
                                 f"{student / teacher:.3g}× the bank's ({teacher:.3g})")

    def _diverged(self, what: str) -> FloatingPointError:
        return FloatingPointError(f"the translator's fit diverged at step {self.global_step}: "
                                  f"{what}; the learning rate (train.lr={self.lr:g}) is likely "
                                  "too high")

    def validation_step(self, batch: dict, _: int) -> None:
        losses = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in losses.items()},
                      batch_size=batch["input_ids"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.val_qa is None or self.trainer.sanity_checking:
            return
        q = self.val_qa
        with torch.no_grad():
            lora = self.translator(q.embeddings.to(self.device)).detach()
        predictions = generate_answers(self.base, q.tokenizer, q.prompts, lora=lora, fmt=q.fmt)
        self.log("val/dyprag_f1", score(predictions, q.answers)["f1"], sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # exact resume of any sampling

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = [p.grad.norm() for p in self.translator.parameters() if p.grad is not None]
        if norms:
            norm = torch.stack(norms).norm()
            if not torch.isfinite(norm):
                raise self._diverged("non-finite gradient norm")
            self.log("train/grad_norm", norm)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self.translator.parameters(), self.lr, self.wd,
                                   self.warmup, self.total or self.trainer.estimated_stepping_batches)
