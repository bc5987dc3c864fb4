"""A finished ``train.py`` run, opened for answering questions (``infer.py``).

    run = TrainedRun.open("checkpoints/world")
    hits = run.retrieve(["Where was Nerys Northcott born?"], k=3)   # [[(doc id, score)]]
    answers = run.answer(questions, hits, "dyprag@3")

Everything comes from the run directory: the resolved ``config.yaml``, the base model (the
world's own, or ``model.name``), the index, the translator (refused when it was trained for
another base model or FFN shape) and the document embeddings it reads. Answers are batched:
every question gets its own combined LoRA in one ``generate`` per batch (per-sample
injection), never a merge/unmerge per question.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from dyprag import rundir
from dyprag.answering.answer import Knowledge, answer, mode_lora
from dyprag.config import Config, load_config, parse_mode
from dyprag.data.corpus import read_passages
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.engine.models import load_model, lora_layers
from dyprag.engine.prompts import prompt_format
from dyprag.files import Unreadable
from dyprag.retrieval.embed import EmbeddingTable, document_encoder
from dyprag.retrieval.retriever import Retriever, load_retriever
from dyprag.training.bank import BankSet, LoRABank
from dyprag.training.translator import load_translator


class RunError(ValueError):
    """A run directory that cannot answer (missing or incomplete, or mismatched parts)."""


class TrainedRun:
    def __init__(self, path: Path, config: Config, model, tokenizer, model_id: str,
                 retriever: Retriever, knowledge: Knowledge, corpus: Path):
        self.path, self.config = path, config
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.retriever, self.knowledge, self.corpus = retriever, knowledge, corpus
        self.fmt = prompt_format(tokenizer, config.prompt.format)

    @classmethod
    def open(cls, path: str | Path, device: str | None = None,
             embedder: str | None = None) -> TrainedRun:
        """``embedder``: the model id/path of the index's embedder when it is not the packaged
        one (a run's own metadata only names it; loading what it names is the user's call)."""
        path = Path(path)
        try:
            with rundir.reading(path):  # never half-replaced by a rerun's publication
                return cls._open(path, device, embedder)
        except Unreadable as err:
            stage = rundir.owning_stage(err.path, path)
            if stage is None:
                raise RunError(str(err)) from None
            # The run's config names where it was written; the hint acts on this directory.
            command = shlex.join(["python", "train.py", "--config", str(path / rundir.CONFIG),
                                  f"run.root={path.parent}", f"run.name={path.name}",
                                  "--rebuild", stage])
            raise RunError(f"{err}; make it again with `{command}`") from None

    @classmethod
    def _open(cls, path: Path, device: str | None, embedder: str | None) -> TrainedRun:
        for need in (rundir.FINISHED, rundir.CONFIG, f"{rundir.TRANSLATOR}/meta.json",
                     f"{rundir.INDEX}/meta.json"):
            if not (path / need).is_file():
                raise RunError(f"{path} is not a finished run: {need} is missing "
                               "(train it with `python train.py`, or resume it)")
        config = load_config(path / rundir.CONFIG)
        load_path, model_id = rundir.base_model(config.model.name, path)
        corpus = rundir.corpus_path(config.data, path)
        model, tokenizer = load_model(load_path, dtype=config.model.dtype,
                                      device=device or config.model.device)
        injection = inject_lora(model, lora_layers(config.model.lora_layers, model))
        translator, meta = load_translator(path / rundir.TRANSLATOR, model_id,
                                           injection.shapes, device=model.device)
        retriever = load_retriever(path / rundir.INDEX, embedder)
        if not corpus.is_file():
            raise RunError(f"the run's corpus {corpus} is missing (moved? set data.corpus)")
        embeddings = _embeddings(path, meta, retriever)
        banks = [LoRABank(path / name, base_model=model_id) for name in (rundir.BANK, rundir.BANK_EVAL)
                 if (path / name / "meta.json").is_file()]
        bank = BankSet(banks) if banks else None
        return cls(path, config, model, tokenizer, model_id, retriever,
                   Knowledge({}, bank=bank, translator=translator.eval(), embeddings=embeddings,
                             config=config.knowledge),
                   corpus)

    def retrieve(self, questions: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k ``(id, score)`` per question; their passages are then in
        ``knowledge.passages``."""
        hits = self.retriever.retrieve(list(questions), k)
        found = min((len(h) for h in hits), default=k)
        if found < k:
            raise ValueError(f"k={k} passages per question, but the index returns only {found}; "
                             f"ask for at most {found} (--k {found})")
        self.fetch_passages({d for h in hits for d, _ in h})
        return hits

    def fetch_passages(self, doc_ids: set[str]) -> None:
        """Read the texts of ``doc_ids`` not yet in memory, in one pass over the corpus: only
        the retrieved passages are ever held, not the corpus (DPR's has 21M)."""
        passages = self.knowledge.passages
        missing = set(doc_ids) - passages.keys()
        passages.update({d: p.text for d, p in read_passages(self.corpus, missing).items()})
        missing -= passages.keys()
        if missing:
            raise RunError(f"documents {sorted(missing)[:3]} of the index are not in the "
                           f"run's corpus {self.corpus} (index built for another corpus?)")

    def answer(self, questions: Sequence[str], hits: Sequence[Sequence[tuple[str, float]]],
               mode: str, max_new_tokens: int | None = None,
               batch_size: int | None = None) -> list[str]:
        """Answers in ``mode`` given each question's retrieved ``(id, score)`` (``retrieve``)."""
        scores = [[s for _, s in h] for h in hits]
        hits = [[d for d, _ in h] for h in hits]
        name, _ = parse_mode(mode)
        if name.startswith("prag"):
            bank = self.knowledge.bank
            missing = sorted(d for d in {d for h in hits for d in h} if bank is None or d not in bank)
            if missing:
                raise RunError(f"mode {mode} needs bank LoRAs, and documents {missing[:3]} are "
                               "not in the run's banks (PRAG trains one per document offline: "
                               "add a prag mode to eval.modes to train those of the test set)")
        self.fetch_passages({d for h in hits for d in h})
        if name.startswith("dyprag"):
            self.ensure_embeddings({d for h in hits for d in h})
        ev = self.config.eval
        return answer(self.model, self.tokenizer, mode, questions, hits, self.knowledge,
                      ev.max_new_tokens if max_new_tokens is None else max_new_tokens,
                      ev.batch_size if batch_size is None else batch_size, self.fmt, scores)

    def ensure_embeddings(self, doc_ids: set[str]) -> None:
        """LLM embeddings are stored for the documents training and eval needed; others are
        computed here, once (retriever embeddings cover the whole corpus)."""
        table = self.knowledge.embeddings
        missing = sorted(d for d in doc_ids if d not in table.row)
        if missing and self.config.translator.embedding != "retriever":
            self.fetch_passages(set(missing))
            encoder = document_encoder(self.config.translator.embedding, self.model,
                                       self.tokenizer, self.model_id,
                                       max_tokens=self.config.translator.max_tokens)
            vectors = encoder.encode([self.knowledge.passages[d] for d in missing])
            self.knowledge.embeddings = table.extended(missing, vectors)

    def lora(self, hit: Sequence[tuple[str, float]], mode: str) -> LoRA | None:
        """The LoRA ``mode`` injects for one question whose top documents are ``hit``
        (``(id, score)``, from ``retrieve``)."""
        doc_ids = [d for d, _ in hit]
        if parse_mode(mode)[0].startswith("dyprag"):
            self.ensure_embeddings(set(doc_ids))
        lora = mode_lora(mode, [doc_ids], self.knowledge, [[s for _, s in hit]])
        return None if lora is None else lora[0]


def _embeddings(path: Path, meta: dict, retriever: Retriever) -> EmbeddingTable:
    """The table the translator was trained on: the index's vectors or the stored LLM ones."""
    source = meta.get("embedding")
    if source is not None and source != "retriever":  # stored in the run by the base model
        return rundir.read_embeddings(path, source)
    if retriever.embeddings is None or retriever.embedder is None:
        raise RunError(f"{path}: the translator reads retriever embeddings, but the index has none")
    if meta.get("embedder") not in (None, retriever.embedder.name):
        raise RunError(f"translator in {path} was trained on {meta['embedder']} embeddings, the "
                       f"index holds {retriever.embedder.name}'s")
    return retriever.embedding_table()
