"""The translator stage of ``train.py``: a Lightning fit with checkpoints and resume.

    fitted = fit_translator(model, tokenizer, docs, bank, embeddings, model_id, out,
                            translator_config=config.translator, train_config=config.train,
                            recipe=translator_recipe(config.bank, config.train),
                            fmt=fmt, loggers=loggers, seed=config.run.seed,
                            val_fraction=config.data.val_fraction,
                            max_new_tokens=config.eval.max_new_tokens)

- data: the bank's documents split into training and held-out ones (``val_fraction``,
  seeded); each row is (document embedding, bank LoRA, one of the document's training
  sequences, ``translator_recipe``);
- logs: the loggers it is given (``dyprag.run.loggers``: CSV and W&B);
- checkpoints: Lightning's ``<run>/lightning/last.ckpt`` (translator and optimizer only) for
  resuming while the fit runs, then the translator as safetensors + ``meta.json`` in
  ``<run>/translator/`` (and ``lightning/`` is removed);
- caching: a finished translator whose fingerprint matches is loaded, not retrained.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from dyprag import rundir
from dyprag.config import BankConfig, EvalConfig, TrainConfig, TranslatorConfig, auto
from dyprag.data.augment import AugmentedDoc
from dyprag.engine.generate import generate_answers
from dyprag.engine.inject import inject_lora
from dyprag.engine.prefix import prefix_layer
from dyprag.engine.prompts import PLAIN, PromptFormat
from dyprag.files import Unreadable, atomic_write_json, fingerprint, is_cached
from dyprag.metrics import score
from dyprag.retrieval.embed import EmbeddingTable
from dyprag.training.bank import LoRABank
from dyprag.training.distill import (
    DistillationData,
    DistillationDataModule,
    TranslatorDistillation,
    ValidationQuestions,
)
from dyprag.training.examples import Recipe, document_examples
from dyprag.training.progress import FitProgress
from dyprag.training.translator import ParameterTranslator, load_translator, save_translator


@dataclass
class Fitted:
    translator: ParameterTranslator
    is_global_zero: bool


def split_documents(docs: list[AugmentedDoc], val_fraction: float,
                    seed: int) -> tuple[list[AugmentedDoc], list[AugmentedDoc]]:
    """A seeded split into (train, held-out); at least one of each when there are ≥ 2."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs)))) if val_fraction > 0 else 0
    held = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


def translator_recipe(bank: BankConfig, train: TrainConfig) -> Recipe:
    """The translator's training examples per document: the bank's QA recipe, plus
    (``train.qa_with_passage``) QA asked with the passage in the prompt (the generated LoRA
    must also leave reading intact: DyPRAG+context) and, with ``train.passage_lm``, the
    passage's own text (DyPRAG's translator trains on the QA only)."""
    return Recipe(max(bank.qa_with_passage, train.qa_with_passage), bank.qa_closed_book,
                  train.passage_lm, bank.loss_on, train.passage_qa == "spread")


def _data(docs: list[AugmentedDoc], recipe: Recipe, tokenizer, fmt: PromptFormat,
          lora_bank: LoRABank, embeddings: EmbeddingTable,
          extra: Sequence[AugmentedDoc] = ()) -> DistillationData:
    """Rows of the bank's documents, then of ``extra`` ones (LM term only: no bank LoRA)."""
    every = [*docs, *extra]
    return DistillationData(tokenizer, embeddings.get([d.doc_id for d in every]),
                            lora_bank.get([d.doc_id for d in docs]),
                            [document_examples(d, recipe, tokenizer, fmt) for d in every],
                            torch.tensor([1.0] * len(docs) + [0.0] * len(extra)))


def _validation_questions(docs: list[AugmentedDoc], limit: int, tokenizer,
                          embeddings: EmbeddingTable,
                          fmt: PromptFormat = PLAIN) -> ValidationQuestions | None:
    rows = [(d.doc_id, qa) for d in docs for qa in d.qa][:limit]
    if not rows:
        return None
    return ValidationQuestions(tokenizer, embeddings.get([d for d, _ in rows]),
                               [fmt.prompt(qa["question"]) for _, qa in rows],
                               [[qa["answer"]] for _, qa in rows], fmt)


def fit_f1(model, translator: ParameterTranslator, docs: list[AugmentedDoc], limit: int,
           tokenizer, embeddings: EmbeddingTable, fmt: PromptFormat = PLAIN,
           max_new_tokens: int = EvalConfig.max_new_tokens) -> float | None:
    """DyPRAG F1 on the augmented questions of ``docs``, each with its own document's
    generated LoRA: on training documents it measures fit, on held-out ones generalisation."""
    q = _validation_questions(docs, limit, tokenizer, embeddings, fmt)
    if q is None:
        return None
    with torch.no_grad():
        lora = translator(q.embeddings.to(model.device)).detach()
    return score(generate_answers(model, tokenizer, q.prompts, max_new_tokens, lora=lora,
                                  fmt=fmt), q.answers)["f1"]


def _fingerprint(translator: TranslatorConfig, fit: TrainConfig, seed: int, bank: LoRABank,
                 embeddings: EmbeddingTable, model_id: str, train: list[AugmentedDoc],
                 val: list[AugmentedDoc], extra: list[str]) -> str:
    keep = {k: v for k, v in dataclasses.asdict(fit).items()
            if k not in ("accelerator", "devices", "strategy", "num_workers", "log_every_n_steps")}
    parts = [dataclasses.asdict(translator), keep, bank.meta["fingerprint"], model_id,
             seed, [d.doc_id for d in train], [d.doc_id for d in val],
             float(embeddings.get([d.doc_id for d in train[:8]]).sum()), embeddings.name, extra]
    return fingerprint(parts)


def fit_translator(model, tokenizer, docs: list[AugmentedDoc], bank: LoRABank,
                   embeddings: EmbeddingTable, model_id: str, out: Path, *,
                   translator_config: TranslatorConfig, train_config: TrainConfig, recipe: Recipe,
                   fmt: PromptFormat, loggers: list[Logger], seed: int, val_fraction: float,
                   max_new_tokens: int, callbacks: list[pl.Callback] = (),
                   extra: Sequence[AugmentedDoc] = ()) -> Fitted:
    """Fit (or load, or resume) the translator on ``docs`` (with bank LoRAs) and ``extra``
    documents (LM term only; every embedding must be in ``embeddings``): the translator of
    ``translator_config``, the fit of ``train_config``, ``recipe``'s training sequences asked
    in ``fmt``; the fit F1 answers get ``max_new_tokens``."""
    t, tr = translator_config, train_config
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    key = _fingerprint(t, tr, seed, bank, embeddings, model_id, train_docs, val_docs,
                       [d.text for d in extra])
    saved, ckpt_dir = out / rundir.TRANSLATOR, out / rundir.CHECKPOINTS
    shapes = inject_lora(model).shapes
    if is_cached(saved / "meta.json", key):
        loaded, _ = load_translator(saved, model_id, shapes, device=model.device)
        return Fitted(loaded, rank_zero_only.rank == 0)

    pl.seed_everything(seed, verbose=False)
    translator = ParameterTranslator(shapes, embeddings.dim, bank.rank, bank.meta["alpha"],
                                     t.architecture, t.hidden, t.target_embed_dim,
                                     bottleneck=t.bottleneck, queries=t.queries,
                                     token_dim=embeddings.dim // t.max_tokens
                                     if t.embedding == "token_list" else 0)
    translator.standardize(embeddings.get([d.doc_id for d in [*train_docs, *extra]]))
    system = TranslatorDistillation(model, translator, lr=tr.lr, weight_decay=tr.weight_decay,
                                    warmup_steps=tr.warmup_steps, total_steps=None,
                                    w_lm=tr.w_lm, w_kl=tr.w_kl, w_mse=tr.w_mse,
                                    mse_space=tr.mse_space,
                                    kl_on=tr.kl_on, first_layer=prefix_layer(model))
    system.val_qa = _validation_questions(val_docs, tr.val_questions, tokenizer, embeddings,
                                          fmt)
    datamodule = DistillationDataModule(
        _data(train_docs, recipe, tokenizer, fmt, bank, embeddings, extra),
        _data(val_docs, recipe, tokenizer, fmt, bank, embeddings) if val_docs else None,
        tr.batch_size, tr.num_workers, seed=seed)
    if system.first_layer:
        for data in filter(None, (datamodule.train, datamodule.val)):
            data.cache_states(model, system.first_layer, tr.batch_size)

    resume = _resume_point(ckpt_dir, key)
    trainer = pl.Trainer(
        max_epochs=tr.epochs, accelerator=tr.accelerator, devices=tr.devices,
        strategy=tr.strategy, precision=auto("precision", tr.precision),
        gradient_clip_val=tr.gradient_clip, logger=loggers,
        log_every_n_steps=min(tr.log_every_n_steps,
                              max(1, math.ceil(len(datamodule.train) / tr.batch_size))),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=1,
                                   every_n_epochs=1), FitProgress("translator"), *callbacks],
        enable_model_summary=False, num_sanity_val_steps=0)
    if trainer.is_global_zero:
        atomic_write_json(ckpt_dir / "fingerprint.json", {"fingerprint": key})
    try:
        trainer.fit(system, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except BaseException:
        for logger in loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish(exit_code=1)
        raise
    if trainer.is_global_zero:
        translator.eval()
        fit = {name: fit_f1(model, translator, group, tr.val_questions, tokenizer, embeddings,
                            fmt, max_new_tokens)
               for name, group in (("seen", train_docs), ("held_out", val_docs))}
        save_translator(translator, saved, {
            "base_model": model_id, "embedding": t.embedding,
            "embedder": embeddings.name,
            "embedding_dim": embeddings.dim, "fingerprint": key, "bank": bank.meta["fingerprint"],
            "train_docs": len(train_docs), "val_docs": len(val_docs), "epochs": tr.epochs,
            "dyprag_f1": fit})
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # resuming is over: the translator is saved
    return Fitted(translator.eval(), trainer.is_global_zero)


def _resume_point(ckpt_dir: Path, key: str) -> str | None:
    """``last.ckpt`` of an interrupted fit with the same fingerprint; another run's, or an
    unreadable one (a truncated file), is removed and the fit starts over."""
    marker, last = ckpt_dir / "fingerprint.json", ckpt_dir / "last.ckpt"
    try:
        same = last.is_file() and is_cached(marker, key)
        if same:
            # A truncated file fails here; mapped, so its tensors are not read twice (the fit
            # loads it again). Tensors and plain data only: a checkpoint is data, never code.
            torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Unreadable:
        same = False
    except pickle.UnpicklingError as err:  # what weights_only refuses: objects, code
        print(f"[dyprag] {last} holds more than tensors and plain data, refused unread "
              f"({str(err).splitlines()[0][:200]}); the fit starts over", flush=True)
        same = False
    except Exception as err:  # torch.load's errors on a damaged file vary by damage
        print(f"[dyprag] {last} is unreadable ({type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}); the fit starts over", flush=True)
        same = False
    if same:
        return str(last)
    if ckpt_dir.exists() and rank_zero_only.rank == 0:
        shutil.rmtree(ckpt_dir)
    return None

