"""The LoRA bank: one FFN LoRA per document (PRAG), trained many documents per step.

    python -m dyprag.training.bank --world /tmp/my-world --base /tmp/my-base --out /tmp/my-bank

PRAG trains each document's LoRA alone, at batch 1. Here row ``b`` of every batch is a
different document and goes through that document's own LoRA (per-sample injection), so one
forward/backward trains ``docs_per_step`` LoRAs. Each document's result equals training it
alone with the same recipe, because

- the loss is the **sum** over rows of each row's mean token loss, so each LoRA's gradient is
  exactly its own document's gradient;
- step ``j`` holds example ``j`` of every document of the group (documents are grouped by
  their number of examples), and AdamW's state is elementwise, so no LoRA's update depends
  on another row.

On disk (docs/design.md §5)::

    out/shard-00000.safetensors   A.<layer>.<module> (n, r, in), B.<layer>.<module> (n, out, r)
    out/index.json                {doc_id: [shard, row]}
    out/meta.json                 base model, shapes, rank, alpha, config (written last)
    out/progress.json             the run's fingerprint (for resuming)

Shards are written atomically; a killed run resumes and skips finished shards. With
``torch.distributed`` initialised, shard ``s`` is trained by rank ``s % world_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dyprag.config import BankConfig
from dyprag.data.augment import AugmentedDoc
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import Key, LoRA, combine
from dyprag.engine.lora_io import atomic_save_tensors, lora_tensors
from dyprag.engine.prefix import hidden_from, prefix_layer, states_below
from dyprag.engine.prompts import PLAIN, PromptFormat
from dyprag.files import atomic_write_json, is_cached, open_safetensors, read_json, read_meta
from dyprag.training.examples import Recipe, Segments, collate, document_examples

FORMAT = "dyprag-bank"


def answer_logits(model, batch: dict[str, torch.Tensor], start: int | None = None,
                  states: torch.Tensor | None = None,
                  layer: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Next-token logits from position ``start`` on and the labels they predict:
    ``(N, T − start − 1, V)`` (fp32), ``(N, T − start − 1)``, and ``start``.

    ``start`` defaults to the first position whose next token is labelled in some row (the
    answers): logits are not computed over whole prompts, since with a real vocabulary the
    output head is most of the cost of a short sequence. ``states``: the batch's hidden states
    entering ``layer`` (``dyprag.engine.prefix``), where the forward then starts.
    """
    labels = batch["labels"]  # (N, T)
    if start is None:
        labelled = (labels[:, 1:] != -100).any(0).nonzero()
        start = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    if states is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=labels.shape[1] - start).logits  # (N, T - start, V)
    else:
        hidden = hidden_from(model, states, batch["attention_mask"], layer)[:, start:]
        logits = model.get_output_embeddings()(hidden)
    return logits[:, :-1].float(), labels[:, start + 1:], start


def row_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of each row over its labelled tokens, ``(N,)``."""
    return answer_loss(*answer_logits(model, batch)[:2])


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``answer_logits``' logits and targets → each row's mean cross-entropy, ``(N,)``."""
    return token_mean(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                      reduction="none"), targets)


def token_mean(per_token: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` per-token values → each row's mean over its labelled tokens, ``(N,)``."""
    labelled = targets != -100
    return (per_token * labelled).sum(1) / labelled.sum(1).clamp_min(1)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _step_batch(model, tokenizer, rows: Sequence[Segments], layer: int = 0) -> dict[str, torch.Tensor]:
    """One step's batch of ``rows`` (one example each) on the model's device; with ``layer``
    > 0, also the frozen layers' ``states`` entering it (``dyprag.engine.prefix``), computed once
    here and reused in every epoch."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(tokenizer, list(rows)).items()}
    if layer:
        with _autocast(device):
            batch["states"] = states_below(model, batch["input_ids"], batch["attention_mask"],
                                           layer)
    return batch


def _step_losses(model, lora: LoRA, batch: dict[str, torch.Tensor], layer: int = 0) -> torch.Tensor:
    """``row_losses`` of a ``_step_batch`` with ``lora`` (one LoRA per row) injected, ``(N,)``."""
    with _autocast(batch["input_ids"].device), inject_lora(model).use(lora):
        return answer_loss(*answer_logits(model, batch, states=batch.get("states"),
                                          layer=layer)[:2])


def _train_dtype(model) -> torch.dtype:
    """LoRAs train in fp32 (under autocast on a GPU), or in the model's dtype when it is
    wider (a float64 model: the tests' exact comparisons)."""
    return torch.promote_types(next(model.parameters()).dtype, torch.float32)


def _optimizer(lora: LoRA, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW([t for _, a, b in lora.items() for t in (a, b)], lr=lr,
                             weight_decay=weight_decay)


def train_loras(model, tokenizer, examples: Sequence[Sequence[Segments]], init: LoRA,
                lr: float, epochs: int, weight_decay: float = 0.0) -> tuple[LoRA, torch.Tensor]:
    """Train one LoRA per document from ``init`` (unbatched); returns them batched and each
    document's mean loss over its last epoch. Every document needs the same number of
    examples: step ``j`` holds example ``j`` of each."""
    counts = {len(ex) for ex in examples}
    assert len(counts) == 1, f"documents of one group need equal example counts, got {counts}"
    device = next(model.parameters()).device
    n = len(examples)
    dtype = _train_dtype(model)
    lora = LoRA.stack([init] * n).map(lambda t: t.detach().clone().to(device, dtype)
                                      .requires_grad_(True))
    optimizer = _optimizer(lora, lr, weight_decay)
    steps = counts.pop()
    layer = prefix_layer(model)
    batches = [_step_batch(model, tokenizer, [ex[j] for ex in examples], layer)
               for j in range(steps)]
    last = torch.zeros(n)
    for _ in range(epochs):
        last.zero_()
        for j, batch in enumerate(batches):
            losses = _step_losses(model, lora, batch, layer)  # (n,)
            if not torch.isfinite(losses).all():
                bad = int((~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"non-finite loss for document row {bad} at step {j}")
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            last += losses.detach().cpu()
        last /= steps
    return lora.detach(), last


def _fingerprint(docs: Sequence[AugmentedDoc], config: BankConfig, base_model: str,
                 shapes: dict[Key, tuple[int, int]], fmt: PromptFormat) -> str:
    h = hashlib.sha256(json.dumps([dataclasses.asdict(config), base_model,
                                   sorted((f"{k[0]}.{k[1]}", v) for k, v in shapes.items())]
                                  # the prompt's wording (chat template, instruction)
                                  + ([fmt.prompt("Q?", ["P."])] if fmt.kind != "plain" else []),
                                  sort_keys=True).encode())
    for doc in docs:
        h.update(json.dumps(doc.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def bank_recipe(config: BankConfig) -> Recipe:
    """The training sequences of a document's bank LoRA."""
    return Recipe(config.qa_with_passage, config.qa_closed_book, config.text, config.loss_on)


def _shared_init(shapes: dict[Key, tuple[int, int]], config: BankConfig) -> LoRA:
    """PRAG's init: A ~ Kaiming-uniform (as nn.Linear), B = 0, so ΔW starts at 0."""
    g = torch.Generator().manual_seed(config.seed)
    zeros = LoRA.zeros(shapes, config.rank, config.alpha)
    A = {k: torch.rand(a.shape, generator=g).mul_(2).sub_(1).mul_(a.shape[-1] ** -0.5)
         for k, a, _ in zeros.items()}
    return LoRA(A, zeros.B, config.alpha)


def build_bank(model, tokenizer, docs: Sequence[AugmentedDoc], out_dir: str | Path,
               config: BankConfig = BankConfig(), base_model: str = "",
               progress: bool = True, fmt: PromptFormat = PLAIN) -> Path:
    """Train (or resume, or reuse) the bank of ``docs`` in ``out_dir``, its examples asked
    in ``fmt``; returns ``out_dir``."""
    out = Path(out_dir)
    rank, world = _distributed()
    shapes = inject_lora(model).shapes
    docs = [d for d in docs if d.qa or (config.text and d.text)]
    if not docs:
        raise ValueError("no document has training examples (every augmentation failed?)")
    key = _fingerprint(docs, config, base_model, shapes, fmt)
    meta_path = out / "meta.json"
    if is_cached(meta_path, key):
        return out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        progress_path = out / "progress.json"
        if not is_cached(progress_path, key):
            # Another run's shards (other documents or config): start over.
            for stale in [*out.glob("shard-*.safetensors"), meta_path, out / "index.json"]:
                stale.unlink(missing_ok=True)
            atomic_write_json(progress_path, {"fingerprint": key})
    _barrier()

    examples = [document_examples(d, bank_recipe(config), tokenizer, fmt) for d in docs]
    init = _shared_init(shapes, config)
    shards = [list(range(s, min(s + config.shard_size, len(docs))))
              for s in range(0, len(docs), config.shard_size)]
    mine = [s for s in range(len(shards)) if s % world == rank]
    todo = [s for s in mine if not _shard_path(out, s).is_file()]
    start = time.perf_counter()
    with tqdm(total=sum(len(shards[s]) for s in todo), desc=f"bank (rank {rank})", unit="doc",
              disable=not progress) as bar:
        for s in todo:
            _train_shard(model, tokenizer, [docs[i] for i in shards[s]],
                         [examples[i] for i in shards[s]], init, config, _shard_path(out, s), bar)
    seconds = time.perf_counter() - start
    _barrier()
    if rank == 0:
        index, losses = {}, []
        for s in range(len(shards)):
            with open_safetensors(_shard_path(out, s)) as f:
                shard_meta = f.metadata()
            ids = json.loads(shard_meta["doc_ids"])
            losses += json.loads(shard_meta["loss"])
            index.update({doc_id: [s, row] for row, doc_id in enumerate(ids)})
        atomic_write_json(out / "index.json", index)
        atomic_write_json(meta_path, {
            "format": FORMAT, "fingerprint": key, "base_model": base_model,
            "shapes": {f"{k[0]}.{k[1]}": list(v) for k, v in shapes.items()},
            "rank": config.rank, "alpha": config.alpha, "prompt_format": fmt.kind,
            "dtype": str(_train_dtype(model)).removeprefix("torch."),
            "documents": len(docs), "shards": len(shards), "config": dataclasses.asdict(config),
            "mean_final_loss": sum(losses) / len(losses), "train_seconds": round(seconds, 2)})
    _barrier()
    return out


def _shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.safetensors"


def _train_shard(model, tokenizer, docs: list[AugmentedDoc], examples: list[list[Segments]],
                 init: LoRA, config: BankConfig, path: Path, bar: tqdm) -> None:
    """Train the documents of one shard, in groups of equal example count, and save them."""
    rows: list[LoRA | None] = [None] * len(docs)
    losses = [0.0] * len(docs)
    by_count: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_count.setdefault(len(ex), []).append(i)
    for members in by_count.values():
        for g in range(0, len(members), config.docs_per_step):
            group = members[g:g + config.docs_per_step]
            lora, loss = train_loras(model, tokenizer, [examples[i] for i in group], init,
                                     config.lr, config.epochs, config.weight_decay)
            lora = lora.to("cpu")
            for row, i in enumerate(group):
                rows[i], losses[i] = lora[row], float(loss[row])
            bar.update(len(group))
            bar.set_postfix(loss=f"{sum(loss.tolist()) / len(group):.3f}")
    atomic_save_tensors(lora_tensors(LoRA.stack(rows)), path,
                        metadata={"doc_ids": json.dumps([d.doc_id for d in docs]),
                                  "loss": json.dumps(losses)})


class LoRABank:
    """Read access to a bank written by ``build_bank``.

    With ``base_model`` and/or ``shapes`` (``{(layer, module): (in, out)}``, e.g.
    ``inject_lora(model).shapes``), refuse a bank trained for another model.
    """

    def __init__(self, path: str | Path, base_model: str | None = None,
                 shapes: dict[Key, tuple[int, int]] | None = None):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a finished LoRA bank (no meta.json)")
        self.meta = read_meta(self.path, FORMAT, "bank", base_model)
        if shapes is not None:
            mine, saved = {f"{k[0]}.{k[1]}": list(v) for k, v in shapes.items()}, self.meta["shapes"]
            diff = next((k for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k)),
                        None)
            if diff is not None:
                raise ValueError(f"bank {self.path} was trained for a model with other FFN "
                                 f"shapes: layer.module {diff} is (in, out) {saved.get(diff)} in "
                                 f"the bank but {mine.get(diff)} in the model")
        self.index: dict[str, list[int]] = read_json(self.path / "index.json")
        self._files: dict[int, Any] = {}

    @property
    def rank(self) -> int:
        return self.meta["rank"]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.index

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = open_safetensors(_shard_path(self.path, shard))
        return self._files[shard]

    def get(self, doc_ids: Sequence[str]) -> LoRA:
        """The LoRAs of ``doc_ids``, batched in that order: factors ``(k, r, in)``, ``(k, out, r)``."""
        missing = [d for d in doc_ids if d not in self.index]
        if missing:
            raise KeyError(f"documents {missing[:5]} are not in the bank {self.path}")
        A, B = {}, {}
        for name in self.meta["shapes"]:
            layer, module = name.split(".")
            key = (int(layer), module)
            rows_a, rows_b = [], []
            for doc_id in doc_ids:
                shard, row = self.index[doc_id]
                f = self._file(shard)
                rows_a.append(f.get_slice(f"A.{name}")[row])
                rows_b.append(f.get_slice(f"B.{name}")[row])
            A[key], B[key] = torch.stack(rows_a), torch.stack(rows_b)
        return LoRA(A, B, self.meta["alpha"])

    def some_id(self) -> str:
        return next(iter(self.index))

    def combined(self, hits: Sequence[Sequence[str]], missing_ok: bool = False,
                 weights: torch.Tensor | None = None) -> LoRA:
        """PRAG's knowledge for each question: the sum of the deltas of its retrieved documents
        (rank concatenation), batched over questions: ``(N, k·r, in)``, ``(N, out, k·r)``;
        ``weights`` ``(N, k)`` scales each document's delta.

        ``missing_ok``: a document without a LoRA (its augmentation wrote no QA pair) adds
        nothing (zero factors) instead of raising ``KeyError``.
        """
        zero = self.get([self.some_id()])[0].map(torch.zeros_like) if missing_ok else None
        per_question = []
        for doc_ids in hits:
            have = [d for d in doc_ids if d in self] if missing_ok else list(doc_ids)
            loras = self.get(have) if have else None
            found = {d: loras[i] for i, d in enumerate(have)}
            per_question.append(combine([found.get(d, zero) for d in doc_ids],
                                        None if weights is None else weights[len(per_question)]))
        return LoRA.stack(per_question)


class BankSet:
    """Several banks of one base model read as one (train.py's ``bank/`` of training
    documents and ``bank-eval/`` of retrieved test documents)."""

    def __init__(self, banks: Sequence[LoRABank]):
        if not banks:
            raise ValueError("BankSet needs at least one bank")
        self.banks = list(banks)

    def __len__(self) -> int:
        return len({d for b in self.banks for d in b.index})

    def __contains__(self, doc_id: str) -> bool:
        return any(doc_id in b for b in self.banks)

    def get(self, doc_ids: Sequence[str]) -> LoRA:
        missing = [d for d in doc_ids if d not in self]
        if missing:
            raise KeyError(f"documents {missing[:5]} are in none of the banks "
                           f"{[str(b.path) for b in self.banks]}")
        return LoRA.stack([next(b for b in self.banks if d in b).get([d])[0] for d in doc_ids])

    def some_id(self) -> str:
        return self.banks[0].some_id()

    combined = LoRABank.combined


def main() -> None:
    from dyprag.data.augment import TemplateAugmenter, augment_corpus, read_augmented
    from dyprag.data.corpus import iter_corpus
    from dyprag.engine.models import load_model

    parser = argparse.ArgumentParser(
        description="Train the LoRA bank of the synthetic world (recipe: the default job's, "
                    "dyprag.config.BankConfig); "
                    "augments the documents first when needed. Resumes an interrupted run.")
    parser.add_argument("--world", required=True, help="world directory (python -m dyprag.data.world)")
    parser.add_argument("--base", required=True,
                        help="base model directory (python -m dyprag.training.world_base)")
    parser.add_argument("--out", required=True, help="bank directory")
    args = parser.parse_args()
    world = Path(args.world)
    augment_corpus(iter_corpus(world / "corpus.jsonl"), TemplateAugmenter(world),
                   world / "augmented.jsonl")
    model, tokenizer = load_model(args.base)
    build_bank(model, tokenizer, read_augmented(world / "augmented.jsonl"), args.out,
               BankConfig(), base_model=str(args.base))
    print(json.dumps(read_json(Path(args.out) / "meta.json")))


if __name__ == "__main__":
    main()
