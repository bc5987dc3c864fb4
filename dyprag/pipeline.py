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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dyprag.augment import LLMAugmenter, TemplateAugmenter, augment_corpus, fresh_documents, read_augmented
from dyprag.bank import LoRABank, build_bank
from dyprag.config import bank_config, dump, parse_mode
from dyprag.corpus import read_passages
from dyprag.evaluate import EmbeddingTable, Knowledge, evaluate
from dyprag.files import Unreadable, atomic_write_json, atomic_write_text, fingerprint, read_json
from dyprag.models import load_model
from dyprag.prompts import prompt_format
from dyprag.qa import QAExample, load_qa
from dyprag.retrieval import Retriever, build_retriever
from dyprag.rundir import begin, owning_stage, publish, run_dir
from dyprag.training import fit_translator, is_rank_zero, log_results


@dataclass
class Data:
    corpus: Path
    train: list[QAExample]
    test: list[QAExample]
    world: Path | None = None


def log(message: str) -> None:
    if is_rank_zero():
        print(f"[dyprag] {message}", flush=True)


# ---- stages -----------------------------------------------------------------------------------
def stage_data(config: dict, out: Path) -> Data:
    data = config["data"]
    if data["kind"] == "world":
        from dyprag.world import generate_world, load_schema

        schema = Path(data["world"])
        if not schema.is_file() and not schema.is_absolute():  # run from another directory
            schema = Path(__file__).resolve().parents[1] / schema
        world = generate_world(load_schema(schema), out / "world")
        return Data(world / "corpus.jsonl",
                    load_qa(world / "qa_train.jsonl", limit=data["train_questions"]),
                    load_qa(world / "qa_test.jsonl", limit=data["test_questions"]), world)
    for key in ("corpus", "train_qa", "test_qa"):
        if not Path(data[key]).is_file():
            raise FileNotFoundError(f"data.{key}: {data[key]} does not exist")
    n_test, n_train = data["test_questions"], data["train_questions"]
    if Path(data["train_qa"]).resolve() == Path(data["test_qa"]).resolve():
        # One file (PRAG's dev sets): the first n_test questions test, the next n_train train.
        if n_test is None:
            raise ValueError("data.test_questions: required when train_qa and test_qa are "
                             "the same file (the first ones test, the rest train)")
        every = load_qa(data["test_qa"], data["qa_format"],
                        None if n_train is None else n_test + n_train)
        return Data(Path(data["corpus"]), every[n_test:], every[:n_test])
    return Data(Path(data["corpus"]), load_qa(data["train_qa"], data["qa_format"], n_train),
                load_qa(data["test_qa"], data["qa_format"], n_test))


def stage_base(config: dict, data: Data, out: Path) -> tuple[str, str]:
    """``(path or hub id to load, model id recorded in banks and checkpoints)``."""
    name = config["model"]["name"]
    if name != "world":
        return name, name
    from dyprag.pretrain import pretrain_base

    start = time.perf_counter()
    base = pretrain_base(data.world, out / "base", **config["model"]["pretrain"])
    log(f"base model ready ({time.perf_counter() - start:.0f}s; "
        f"pretraining took {read_json(base / 'pretrain.json')['seconds']}s)")
    return str(base), world_model_id(base)


def world_model_id(base: Path) -> str:
    """The id banks and translators record for the world's pretrained model in ``base``."""
    return f"world:{read_json(base / 'pretrain.json')['fingerprint']}"


def stage_index(config: dict, data: Data, out: Path) -> Retriever:
    index = config["index"]
    return build_retriever(data.corpus, out / "index", method=index["method"],
                           factory=index["factory"], embedder=index["embedder"])


def training_documents(config: dict, data: Data, retriever: Retriever) -> list[str]:
    """Documents the bank and translator learn from, in a fixed order."""
    if config["data"]["train_docs"] == "gold":
        missing = [qa.id for qa in data.train if "doc_id" not in qa.meta]
        if missing:
            raise ValueError(f"data.train_docs is 'gold' but questions {missing[:3]} have no "
                             "meta.doc_id; use data.train_docs=retrieved")
        ids = [qa.meta["doc_id"] for qa in data.train]
    else:
        hits = retriever.retrieve([qa.question for qa in data.train], k=config["index"]["k"])
        ids = [d for h in hits for d, _ in h]
    return list(dict.fromkeys(ids))


def augment_method(config: dict) -> str:
    """``augment.method`` resolved: ``auto`` is the world's templates, else the LLM."""
    method = config["augment"]["method"]
    if method == "auto":
        return "template" if config["data"]["kind"] == "world" else "llm"
    return method


def stage_augment(config: dict, data: Data, doc_ids: list[str], path: Path, model, tokenizer):
    """Rewrites and QA pairs of ``doc_ids`` (cached line by line in ``path``, which is
    started over when the method changes); documents without QA pairs are left out."""
    passages = list(read_passages(data.corpus, doc_ids).values())
    a, method = config["augment"], augment_method(config)
    if method == "template":
        augmenter = TemplateAugmenter(data.world)
    else:
        augmenter = LLMAugmenter.from_model(model, tokenizer, batch_size=a["batch_size"],
                                            seed=config["run"]["seed"], rewrites=a["rewrites"],
                                            questions=a["questions"], max_retries=a["max_retries"])
    key = "template" if method == "template" else fingerprint(
        [method, {k: v for k, v in a.items() if k != "batch_size"}, config["model"]["name"],
         augmenter.qa_prompt("P.")])  # the writer, its recipe and its prompt's wording
    marker = path.with_name(path.name + ".json")
    if path.is_file() and (read_json(marker) if marker.is_file() else {}).get("fingerprint",
                                                                               "template") != key:
        path.unlink()  # written by another method or recipe
    atomic_write_json(marker, {"fingerprint": key, "method": method})
    stats = augment_corpus(passages, augmenter, path, batch_size=a["batch_size"])
    records = {r.doc_id: r for r in read_augmented(path)}
    failed = sum(not records[p.id].qa for p in passages if p.id in records)
    log(f"augmentation ({method}): {len(passages) - failed} of {len(passages)} documents with "
        f"QA pairs ({stats.written} written now)" + (f"; {failed} left out" if failed else ""))
    return [records[d] for d in doc_ids if d in records and records[d].qa]


def stage_llm_embeddings(config: dict, model, tokenizer, model_id: str, data: Data,
                         doc_ids: list[str], out: Path) -> EmbeddingTable:
    """Embeddings made by the base model (``translator.embedding``: ``llm``, DyPRAG's
    last-token state, or ``tokens``, the mean input-token embedding) of each passage in
    ``doc_ids`` (training documents and every test question's retrieved ones), stored beside
    the index so that answering needs no extra forward."""
    import numpy as np

    source = config["translator"]["embedding"]
    encoder = translator_encoder(config, None, model, tokenizer, model_id)
    passages = list(read_passages(data.corpus, doc_ids).values())
    ids = [p.id for p in passages]
    key = fingerprint([encoder.name, ids, [p.text for p in passages]])
    meta_path, path = out / f"{source}-embeddings.json", out / f"{source}-embeddings.npy"
    if not (meta_path.is_file() and read_json(meta_path).get("fingerprint") == key
            and path.is_file()):
        meta_path.unlink(missing_ok=True)
        vectors = encoder.encode([p.text for p in passages])
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
        atomic_write_json(meta_path, {"fingerprint": key, "embedder": encoder.name, "ids": ids})
    return stored_embeddings(out, source)


def stored_embeddings(index_dir: Path, source: str) -> EmbeddingTable:
    """The ``llm`` or ``tokens`` embeddings ``stage_llm_embeddings`` stored in ``index_dir``."""
    import numpy as np

    meta = read_json(index_dir / f"{source}-embeddings.json")
    return EmbeddingTable(meta["ids"], np.load(index_dir / f"{source}-embeddings.npy",
                                               mmap_mode="r"), meta["embedder"])


def retriever_embeddings(retriever: Retriever) -> EmbeddingTable:
    """The dense index's document vectors (rows in the index's id order)."""
    if retriever.embeddings is None or retriever.dense is None:
        raise ValueError("translator.embedding 'retriever' needs a dense index "
                         "(index.method dense or hybrid)")
    return EmbeddingTable(retriever.dense.ids, retriever.embeddings, retriever.embedder.name)


def translator_encoder(config: dict, retriever: Retriever | None, model, tokenizer,
                       model_id: str):
    """What made the translator's embeddings, to embed passages outside the corpus."""
    from dyprag.embed import LLMEmbedder, TokenMeanEmbedder

    source = config["translator"]["embedding"]
    if source == "retriever":
        return retriever.embedder
    return (LLMEmbedder if source == "llm" else TokenMeanEmbedder)(model, tokenizer, model_id)


def document_embeddings(config: dict, retriever: Retriever, model, tokenizer, model_id: str,
                        data: Data, doc_ids: list[str], out: Path) -> EmbeddingTable:
    if config["translator"]["embedding"] != "retriever":
        return stage_llm_embeddings(config, model, tokenizer, model_id, data, doc_ids,
                                    out / "index")
    return retriever_embeddings(retriever)


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


def run(config: dict, rebuild: tuple[str, ...] = ()) -> dict | None:
    """Every stage; returns the eval results on rank 0 (None on other ranks). ``rebuild``:
    stages whose stored outputs are discarded first (``rundir.STAGES``). A stage's error on
    its input is raised as a ``StageError``."""
    clock = StageClock()
    try:
        return _run(config, rebuild, clock)
    except USER_ERRORS as err:
        rebuild = (owning_stage(err.path, run_dir(config)) if isinstance(err, Unreadable)
                   else None)
        raise StageError(clock.failed or "run", err, rebuild) from err


def _run(config: dict, rebuild: tuple[str, ...], clock: StageClock) -> dict | None:
    torch.manual_seed(config["run"]["seed"])
    final = run_dir(config)
    out = begin(final, rebuild, main_process=is_rank_zero())
    if out != final:
        log(f"{final} is a finished run: this attempt works in {out} and replaces it only "
            "when it finishes")
    started = time.perf_counter()
    with clock("data"):
        data = stage_data(config, out)
    log(f"data: {len(data.train)} training and {len(data.test)} test questions")
    with clock("base"):
        load_path, model_id = stage_base(config, data, out)
        model, tokenizer = load_model(load_path, dtype=model_dtype(config),
                                      device=model_device(config))
    for p in model.parameters():
        p.requires_grad_(False)
    with clock("index"):
        retriever = stage_index(config, data, out)

    with clock("augment"):
        doc_ids = training_documents(config, data, retriever)
        docs = stage_augment(config, data, doc_ids, out / "augmented.jsonl", model, tokenizer)
    log(f"augmented {len(docs)} training documents")
    fmt = prompt_format(tokenizer, config["prompt"]["format"])
    log(f"prompt format: {fmt.kind}")
    with clock("bank"):
        bank_dir = build_bank(model, tokenizer, docs, out / "bank", bank_config(config),
                              base_model=model_id, fmt=fmt)
        bank = LoRABank(bank_dir, base_model=model_id)
    log(f"bank of {len(bank)} documents ({read_json(bank_dir / 'meta.json')['train_seconds']}s)")
    with clock("embeddings"):
        test, hits = test_retrieval(config, data, retriever)
        embeddings = document_embeddings(config, retriever, model, tokenizer, model_id, data,
                                         doc_ids + [d for h in hits for d in h], out)
        extra = []
        if config["data"]["extra_docs"] and config["data"]["kind"] == "world":
            extra = fresh_documents(data.world, config["data"]["extra_docs"],
                                    config["run"]["seed"])
            embeddings = embeddings.extended([d.doc_id for d in extra], translator_encoder(
                config, retriever, model, tokenizer, model_id).encode([d.text for d in extra]))
            log(f"{len(extra)} extra documents for the translator's LM term")

    with clock("translator"):
        fitted = fit_translator(config, model, tokenizer, docs, bank, embeddings, model_id, out,
                                extra=extra)
    if not fitted.is_global_zero:
        return None
    shown = read_passages(data.corpus, (d for h in hits for d in h))  # all a prompt can hold
    results = stage_eval(config, data, test, hits, model, tokenizer, model_id, out,
                         Knowledge({d: p.text for d, p in shown.items()},
                                   translator=fitted.translator, embeddings=embeddings,
                                   missing_ok=True), clock)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["stage_seconds"] = clock.seconds
    results["prompt_format"], results["augment"] = fmt.kind, augment_method(config)
    results["translator_params"] = sum(p.numel() for p in fitted.translator.parameters())
    results["translator_fit_f1"] = read_json(out / "translator" / "meta.json").get("dyprag_f1", {})
    log_results(fitted.loggers, results)
    # The run is finished: its description last, then the attempt replaces the old run.
    atomic_write_text(out / "config.yaml", dump(config))
    atomic_write_json(out / "eval.json", results)
    publish(out, final)
    return results


def test_retrieval(config: dict, data: Data, retriever: Retriever) -> tuple[list[QAExample], list]:
    """The evaluated questions and their top-k document ids (k: the largest of eval.modes)."""
    ev = config["eval"]
    test = data.test[:ev["limit"]] if ev["limit"] else data.test
    if not test:
        raise ValueError("no test questions to evaluate")
    k_max = max([parse_mode(m)[1] for m in ev["modes"]] + [1])
    hits = retriever.retrieve([qa.question for qa in test], k=k_max)
    return test, [[d for d, _ in h] for h in hits]


def stage_eval(config: dict, data: Data, test: list[QAExample], hits: list[list[str]], model,
               tokenizer, model_id: str, out: Path, knowledge: Knowledge,
               clock: StageClock | None = None) -> dict:
    """Every mode of ``eval.modes`` on the test questions; PRAG modes first train the bank
    LoRAs of the documents retrieved for them (a second bank, ``bank-eval``)."""
    clock = clock or StageClock()
    ev = config["eval"]
    fmt = prompt_format(tokenizer, config["prompt"]["format"])
    questions = [qa.question for qa in test]
    recall = {}
    if all("doc_id" in qa.meta for qa in test):
        recall = {f"recall@{k}": sum(qa.meta["doc_id"] in h[:k] for qa, h in zip(test, hits))
                  / len(test) for k in sorted({1, len(hits[0])})}
    prag_k = max([parse_mode(m)[1] for m in ev["modes"] if m.startswith("prag")] + [0])
    if prag_k:
        needed = list(dict.fromkeys(d for h in hits for d in h[:prag_k]))
        with clock("augment"):
            docs = stage_augment(config, data, needed, out / "augmented-eval.jsonl", model,
                                 tokenizer)
        with clock("bank"):
            knowledge.bank = LoRABank(build_bank(model, tokenizer, docs, out / "bank-eval",
                                                 bank_config(config), base_model=model_id,
                                                 fmt=fmt), base_model=model_id)
    with clock("eval"):
        scores, predictions = evaluate(
            model, tokenizer, ev["modes"], questions, [qa.answers for qa in test], hits,
            knowledge, ev["max_new_tokens"], ev["batch_size"],
            progress=lambda mode, s: log(f"eval {mode:14s} EM {s['em']:.3f}  F1 {s['f1']:.3f}"),
            fmt=fmt)
    samples = [{"question": qa.question, "gold": qa.answers[0],
                **{m: predictions[m][i] for m in ev["modes"]}}
               for i, qa in enumerate(test[:ev["samples"]])]
    return {"questions": len(test), **recall, "f1": {m: s["f1"] for m, s in scores.items()},
            "em": {m: s["em"] for m, s in scores.items()}, "samples": samples}


def model_dtype(config: dict) -> str:
    dtype = config["model"]["dtype"]
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return dtype


def model_device(config: dict) -> str:
    device = config["model"]["device"]
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def table(results: dict) -> str:
    """The final F1/EM table, one row per mode."""
    lines = [f"{'mode':16s} {'EM':>6s} {'F1':>6s}", "-" * 30]
    lines += [f"{m:16s} {results['em'][m]:6.3f} {f1:6.3f}" for m, f1 in results["f1"].items()]
    recall = [f"{k} {v:.3f}" for k, v in results.items() if k.startswith("recall@")]
    lines += [", ".join(recall)] if recall else []
    fit = results.get("translator_fit_f1", {})
    if fit.get("seen") is not None:
        lines.append(f"translator on its training documents' questions: F1 {fit['seen']:.3f}"
                     + (f"; on held-out documents': {fit['held_out']:.3f}"
                        if fit.get("held_out") is not None else ""))
    how = [f"{name}: {results[k]}" for k, name in (("prompt_format", "prompts"),
                                                   ("augment", "augmentation")) if k in results]
    return "\n".join(lines + [f"{results['questions']} test questions"
                              + (f" ({', '.join(how)})" if how else "")])
