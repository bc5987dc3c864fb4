"""The stages of ``python train.py`` (docs/design.md §1), each cached under ``checkpoints/<run>/``.

    world/data → base → index → augment → bank → embeddings → translator → eval

Every stage skips itself when its output exists for the same inputs (a fingerprint in the
output's meta file) and resumes when interrupted: the world, the base model, the index, the
augmentation (line by line), the bank (shard by shard) and the translator (Lightning's
``last.ckpt``). Re-running the same command after a crash continues where it stopped. A
rerun of a finished run works in a staging copy that replaces the run only when it finishes
(``dyprag.rundir``); ``config.yaml`` and ``eval.json`` are written last.

Under a multi-process strategy (``ddp``), Lightning re-runs the script in every extra
process when ``fit`` starts; by then every earlier stage is cached, so those processes only
read, and only rank 0 evaluates and writes the results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from tqdm.auto import tqdm

from dyprag import rundir
from dyprag.answering.answer import Knowledge, evaluate_questions, reads_translator
from dyprag.answering.report import plot
from dyprag.config import (
    AugmentConfig,
    BankConfig,
    Config,
    DataConfig,
    EvalConfig,
    IndexConfig,
    ModelConfig,
    dump,
    parse_mode,
)
from dyprag.data.augment import (
    LLMAugmenter,
    TemplateAugmenter,
    augment_corpus,
    fresh_documents,
    read_augmented,
)
from dyprag.data.corpus import read_passages
from dyprag.data.qa import QAExample
from dyprag.engine.inject import inject_lora
from dyprag.engine.models import load_model, lora_layers
from dyprag.engine.prompts import PromptFormat, prompt_format
from dyprag.files import (
    Unreadable,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    fingerprint,
    is_cached,
    read_json,
)
from dyprag.retrieval.embed import EmbeddingTable, document_encoder
from dyprag.retrieval.retriever import Retriever, build_retriever
from dyprag.run.loggers import log_results, make_loggers
from dyprag.training.bank import LoRABank, build_bank
from dyprag.training.fit import fit_translator, translator_recipe


@dataclass
class Data:
    corpus: Path
    train: list[QAExample]
    test: list[QAExample]
    world: Path | None = None


@rank_zero_only
def log(message: str) -> None:
    print(f"[dyprag] {message}", flush=True)


# ---- stages -----------------------------------------------------------------------------------
def stage_data(data: DataConfig, out: Path) -> Data:
    """The synthetic world generated into the run (``data.kind: world``), and the run's
    questions (``rundir.questions``)."""
    world = None
    if data.kind == "world":
        from dyprag.data.world import generate_world, load_schema

        schema = Path(data.world)
        if not schema.is_file() and not schema.is_absolute():  # run from another directory
            schema = Path(__file__).resolve().parents[2] / schema
        world = generate_world(load_schema(schema), out / rundir.WORLD)
    train, test = rundir.questions(data, out)
    return Data(rundir.corpus_path(data, out), train, test, world)


def stage_base(model: ModelConfig, data: Data, out: Path, fresh: bool = False) -> tuple[str, str]:
    """``(path or hub id to load, model id recorded in banks and checkpoints)``; the world's
    model is pretrained first (cached; ``fresh``: pretrained even so)."""
    if model.name == "world":
        from dyprag.training.world_base import pretrain_base

        start = time.perf_counter()
        base = pretrain_base(data.world, out / rundir.BASE, model.pretrain, fresh)
        log(f"base model ready ({time.perf_counter() - start:.0f}s; "
            f"pretraining took {read_json(base / 'pretrain.json')['seconds']}s)")
    return rundir.base_model(model.name, out)


def stage_index(index: IndexConfig, data: Data, out: Path) -> Retriever:
    return build_retriever(data.corpus, out / rundir.INDEX, method=index.method,
                           factory=index.factory, embedder=index.embedder)


def training_documents(train_docs: str, k: int, data: Data, retriever: Retriever) -> list[str]:
    """Documents the bank and translator learn from, in a fixed order: each training
    question's gold document (``data.train_docs: gold``) or its top ``k`` retrieved ones."""
    if train_docs == "gold":
        missing = [qa.id for qa in data.train if "doc_id" not in qa.meta]
        if missing:
            raise ValueError(f"data.train_docs is 'gold' but questions {missing[:3]} have no "
                             "meta.doc_id; use data.train_docs=retrieved")
        ids = [qa.meta["doc_id"] for qa in data.train]
    else:
        hits = retriever.retrieve([qa.question for qa in data.train], k=k)
        ids = [d for h in hits for d, _ in h]
    return list(dict.fromkeys(ids))


def augment_method(augment: AugmentConfig, kind: str) -> str:
    """``augment.method`` resolved for ``data.kind``: ``auto`` is the world's templates, else
    the LLM."""
    if augment.method == "auto":
        return "template" if kind == "world" else "llm"
    return augment.method


@dataclass
class Augmentation:
    """How the run augments documents: ``augment``'s recipe by ``method`` (the base model
    ``model_name`` writes, seeded by ``seed``, when it is ``llm``)."""

    augment: AugmentConfig
    method: str
    seed: int
    model_name: str


def stage_augment(how: Augmentation, data: Data, doc_ids: list[str], path: Path, model,
                  tokenizer):
    """Rewrites and QA pairs of ``doc_ids`` (cached line by line in ``path``, which is
    started over when the method changes); documents without QA pairs are left out."""
    passages = list(read_passages(data.corpus, doc_ids).values())
    a, method = how.augment, how.method
    if method == "template":
        augmenter = TemplateAugmenter(data.world)
    else:
        augmenter = LLMAugmenter.from_model(model, tokenizer, batch_size=a.batch_size,
                                            seed=how.seed, rewrites=a.rewrites,
                                            questions=a.questions, max_retries=a.max_retries)
    recipe = {k: v for k, v in dataclasses.asdict(a).items() if k != "batch_size"}
    key = "template" if method == "template" else fingerprint(
        [method, recipe, how.model_name, augmenter.qa_prompt("P.")])  # the writer, its
    marker = path.with_name(path.name + ".json")                      # recipe and its wording
    if path.is_file() and not is_cached(marker, key):
        path.unlink()  # written by another method or recipe
    if not is_cached(marker, key):
        atomic_write_json(marker, {"fingerprint": key, "method": method})
    stats = augment_corpus(passages, augmenter, path, batch_size=a.batch_size)
    records = {r.doc_id: r for r in read_augmented(path)}
    failed = sum(not records[p.id].qa for p in passages if p.id in records)
    log(f"augmentation ({method}): {len(passages) - failed} of {len(passages)} documents with "
        f"QA pairs ({stats.written} written now)" + (f"; {failed} left out" if failed else ""))
    return [records[d] for d in doc_ids if d in records and records[d].qa]


def document_embeddings(source: str, retriever: Retriever, encoder, data: Data,
                        doc_ids: list[str], out: Path) -> EmbeddingTable:
    """The translator's input for ``doc_ids`` (training documents and every test question's
    retrieved ones): the index's vectors (``translator.embedding: retriever``), or the base
    model's (``llm``: DyPRAG's last-token state; ``tokens``: the mean input-token embedding;
    ``token_list``: those embeddings one by one),
    stored in the run (``rundir.embedding_files``) so that answering needs no extra forward.
    ``source``: ``translator.embedding``."""
    if source == "retriever":
        return retriever.embedding_table()
    passages = list(read_passages(data.corpus, doc_ids).values())
    ids = [p.id for p in passages]
    key = fingerprint([encoder.name, ids, [p.text for p in passages]])
    vectors, meta = rundir.embedding_files(out, source)
    if not (is_cached(meta, key) and vectors.is_file()):
        meta.unlink(missing_ok=True)
        with atomic_path(vectors) as tmp:
            np.save(tmp, encoder.encode([p.text for p in passages]))
        atomic_write_json(meta, {"fingerprint": key, "embedder": encoder.name, "ids": ids})
    return rundir.read_embeddings(out, source)


# ---- the whole run ----------------------------------------------------------------------------
class StageClock:
    """Wall seconds per stage (a stage entered twice adds up), for eval.json's ``stage_seconds``;
    ``failed``: the stage an error left (an error's message names it)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.failed: str | None = None

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed = self.failed or stage
            raise
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0)
                                        + time.perf_counter() - start, 1)


class StageError(Exception):
    """A stage failed on its input (bad data, an unreadable file, a diverged fit): the message
    names the culprit, and for an unreadable stored file the stage that rebuilds it."""

    def __init__(self, stage: str, error: BaseException, rebuild: str | None = None):
        fix = f"; rerun with --rebuild {rebuild} to make it again" if rebuild else ""
        super().__init__(f"{error}{fix}")
        self.stage, self.error = stage, error


USER_ERRORS = (ValueError, OSError, EOFError, FloatingPointError)  # what a bad input raises


def run(config: Config, rebuild: tuple[str, ...] = ()) -> dict | None:
    """Every stage; returns the eval results on rank 0 (None on other ranks). ``rebuild``:
    stages whose stored outputs are discarded first (``rundir.STAGES``). A stage's error on
    its input is raised as a ``StageError``."""
    clock = StageClock()
    try:
        return _run(config, rebuild, clock)
    except USER_ERRORS as err:
        rebuild = (rundir.owning_stage(err.path, rundir.run_dir(config.run))
                   if isinstance(err, Unreadable) else None)
        raise StageError(clock.failed or "run", err, rebuild) from err


def _run(config: Config, rebuild: tuple[str, ...], clock: StageClock) -> dict | None:
    torch.manual_seed(config.run.seed)
    final = rundir.run_dir(config.run)
    out = rundir.begin(final, rebuild, main_process=rank_zero_only.rank == 0)
    if out != final:
        log(f"{final} is a finished run: this attempt works in {out} and replaces it only "
            "when it finishes")
    started = time.perf_counter()
    with clock("data"):
        data = stage_data(config.data, out)
    log(f"data: {len(data.train)} training and {len(data.test)} test questions")
    with clock("base"):
        load_path, model_id = stage_base(config.model, data, out, fresh="base" in rebuild)
        model, tokenizer = load_model(load_path, dtype=config.model.dtype,
                                      device=config.model.device)
        inject_lora(model, lora_layers(config.model.lora_layers, model))  # also freezes it
    with clock("index"):
        retriever = stage_index(config.index, data, out)

    how = Augmentation(config.augment, augment_method(config.augment, config.data.kind),
                       config.run.seed, config.model.name)
    with clock("augment"):
        doc_ids = training_documents(config.data.train_docs, config.index.k, data, retriever)
        docs = stage_augment(how, data, doc_ids, out / rundir.AUGMENTED, model, tokenizer)
    log(f"augmented {len(docs)} training documents")
    fmt = prompt_format(tokenizer, config.prompt.format)
    log(f"prompt format: {fmt.kind}")
    with clock("bank"):
        bank_dir = build_bank(model, tokenizer, docs, out / rundir.BANK, config.bank,
                              base_model=model_id, fmt=fmt)
        bank = LoRABank(bank_dir, base_model=model_id)
    log(f"bank of {len(bank)} documents ({read_json(bank_dir / 'meta.json')['train_seconds']}s)")
    with clock("embeddings"):
        test, hits, scores = test_retrieval(config.eval, data, retriever)
        encoder = document_encoder(config.translator.embedding, model, tokenizer, model_id,
                                   retriever.embedder, config.translator.max_tokens)
        embeddings = document_embeddings(config.translator.embedding, retriever, encoder, data,
                                         doc_ids + [d for h in hits for d in h], out)
        extra = []
        if config.data.extra_docs and config.data.kind == "world":
            extra = fresh_documents(data.world, config.data.extra_docs, config.run.seed)
            embeddings = embeddings.extended([d.doc_id for d in extra],
                                             encoder.encode([d.text for d in extra]))
            log(f"{len(extra)} extra documents for the translator's LM term")

    with clock("translator"):
        loggers = make_loggers(config, out)
        fitted = fit_translator(model, tokenizer, docs, bank, embeddings, model_id, out,
                                translator_config=config.translator, train_config=config.train,
                                recipe=translator_recipe(config.bank, config.train), fmt=fmt,
                                loggers=loggers, seed=config.run.seed,
                                val_fraction=config.data.val_fraction,
                                max_new_tokens=config.eval.max_new_tokens, extra=extra)
    if not fitted.is_global_zero:
        return None
    shown = read_passages(data.corpus, (d for h in hits for d in h))  # all a prompt can hold
    results = stage_eval(config.eval, config.bank, how, fmt, config.run.seed, data, test, hits,
                         scores, model, tokenizer, model_id, out,
                         Knowledge({d: p.text for d, p in shown.items()},
                                   translator=fitted.translator, embeddings=embeddings,
                                   missing_ok=True, config=config.knowledge), clock)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["stage_seconds"] = clock.seconds
    results["prompt_format"], results["augment"] = fmt.kind, how.method
    results["translator_params"] = sum(p.numel() for p in fitted.translator.parameters())
    results["translator_fit_f1"] = read_json(out / rundir.TRANSLATOR / "meta.json").get("dyprag_f1", {})
    log_results(loggers, results)
    plot({"test questions": {m: {"f1": f1} for m, f1 in results["f1"].items()}},
         list(results["f1"]), out / rundir.PLOT)
    # The run is finished: its description last, then the attempt replaces the old run.
    atomic_write_text(out / rundir.CONFIG, dump(config))
    atomic_write_json(out / rundir.FINISHED, results)
    rundir.publish(out, final)
    return results


def test_retrieval(ev: EvalConfig, data: Data,
                   retriever: Retriever) -> tuple[list[QAExample], list, list]:
    """The evaluated questions, their top-k document ids and their retrieval scores (k: the
    largest of eval.modes)."""
    test = rundir.first(data.test, ev.limit)
    if not test:
        raise ValueError("no test questions to evaluate")
    k_max = max([parse_mode(m)[1] for m in ev.modes] + [1])
    hits = retriever.retrieve([qa.question for qa in test], k=k_max)
    return test, [[d for d, _ in h] for h in hits], [[s for _, s in h] for h in hits]


def stage_eval(ev: EvalConfig, bank_config: BankConfig, how: Augmentation, fmt: PromptFormat,
               seed: int, data: Data, test: list[QAExample], hits: list[list[str]],
               scores: list[list[float]], model, tokenizer, model_id: str, out: Path,
               knowledge: Knowledge, clock: StageClock | None = None) -> dict:
    """Every mode of ``eval.modes`` on the test questions, asked in ``fmt``; PRAG modes first
    train the bank LoRAs (``bank_config``) of the documents retrieved for them, augmented as
    ``how`` says (a second bank, ``bank-eval``). With a DyPRAG mode, also the translator's
    ``document_dependence`` (seeded by ``seed``)."""
    clock = clock or StageClock()
    recall = {}
    if all("doc_id" in qa.meta for qa in test):
        recall = {f"recall@{k}": sum(qa.meta["doc_id"] in h[:k] for qa, h in zip(test, hits))
                  / len(test) for k in sorted({1, len(hits[0])})}
    prag_k = max([parse_mode(m)[1] for m in ev.modes if m.startswith("prag")] + [0])
    if prag_k:
        needed = list(dict.fromkeys(d for h in hits for d in h[:prag_k]))
        with clock("augment"):
            docs = stage_augment(how, data, needed, out / rundir.AUGMENTED_EVAL, model, tokenizer)
        with clock("bank"):
            knowledge.bank = LoRABank(build_bank(model, tokenizer, docs, out / rundir.BANK_EVAL,
                                                 bank_config, base_model=model_id,
                                                 fmt=fmt), base_model=model_id)
    dyprag = reads_translator(ev.modes)
    with clock("eval"), tqdm(total=len(ev.modes) + dyprag, desc="eval", unit="mode",
                             disable=rank_zero_only.rank != 0) as bar:
        def done(step: str, s: dict) -> None:
            if step == "document dependence":
                if s:
                    log(f"document dependence: dyprag@1 with an irrelevant document F1 "
                        f"{s['dyprag_irrelevant']:.3f}; mean ΔW cosine across documents "
                        f"{s['delta_cosine']:.3f}")
            else:
                bar.write(f"[dyprag] eval {step:14s} EM {s['em']:.3f}  F1 {s['f1']:.3f}  "
                          f"acc {s['acc']:.3f}")
            bar.update()

        result = evaluate_questions(model, tokenizer, ev.modes, test, hits, knowledge, ev, fmt,
                                    seed, scores, progress=done)
    grid, predictions = result.grid, result.predictions
    samples = [{"question": qa.question, "gold": qa.answers[0],
                **{m: predictions[m][i] for m in ev.modes}}
               for i, qa in enumerate(test[:ev.samples])]
    return {"questions": len(test), **recall, "f1": {m: s["f1"] for m, s in grid.items()},
            "em": {m: s["em"] for m, s in grid.items()},
            "acc": {m: s["acc"] for m, s in grid.items()},
            **({"f1_by_fact": result.by_fact} if result.by_fact else {}), **result.dependence,
            "samples": samples}
