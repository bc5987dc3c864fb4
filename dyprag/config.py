"""Run configuration: one YAML mechanism for every job, plus ``key=value`` overrides.

    config = load_config("configs/qwen2.5-1.5b-popqa.yaml", ["bank.epochs=2", "run.name=x"])

A run config is a mapping of sections (``run``, ``data``, ``model``, ``index``, ``prompt``,
``augment``, ``bank``, ``translator``, ``train``, ``eval``, ``wandb``); ``DEFAULTS`` holds every key with
its default (the embedded synthetic-world job, so ``python train.py`` needs no file). A file
may start from another with ``base: other.yaml`` (resolved relative to the file). Overrides
use dotted keys and YAML values (``train.lr=1e-4``, ``eval.modes=[vanilla,rag@3]``).

Every problem (unknown key, wrong type, bad value) is collected and raised once, each naming
its field.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dyprag.qa import FORMATS

PROMPT_FORMATS = ("plain", "chat")  # dyprag.prompts.FORMATS (that module imports torch)


@dataclass(frozen=True)
class BankConfig:
    """How each document's LoRA is trained. Defaults are PRAG's (docs/design.md §4)."""

    rank: int = 2
    alpha: float = 32.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 1
    docs_per_step: int = 32
    shard_size: int = 256
    # Training examples per document: the first ``qa_with_passage`` QA pairs asked with the
    # passage (and again with each rewrite) in the prompt, the last ``qa_closed_book`` asked
    # with no passage (the two overlap when they add up to more than the document's pairs),
    # and optionally the passage and rewrites themselves as plain text (language modelling).
    qa_with_passage: int = 2
    qa_closed_book: int = 1
    text: bool = False
    loss_on: str = "answer"  # "answer": loss on answer tokens; "all": on every token
    # "shared": every LoRA starts from one seeded init (A random, B zero), as PRAG does;
    # "warmup": from a LoRA first trained briefly on many documents (PRAG's ablation).
    init: str = "shared"
    warmup_docs: int = 64
    warmup_epochs: int = 1
    warmup_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be ≥ 1, got {self.rank}")
        if self.loss_on not in ("answer", "all"):
            problems.append(f"loss_on must be 'answer' or 'all', got {self.loss_on!r}")
        if self.init not in ("shared", "warmup"):
            problems.append(f"init must be 'shared' or 'warmup', got {self.init!r}")
        for name in ("epochs", "docs_per_step", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if problems:
            raise ValueError("bank config: " + "; ".join(problems))


# The synthetic world's recipe: its tiny base model needs far more steps than PRAG's one
# epoch at lr 3e-4 to take in a document. Measured with the gold document's LoRA on 300 test
# questions (bench/world_baselines.py's base model): 1 epoch at lr 1e-2, rank 2 → F1 0.15;
# 80 epochs at 3e-2, rank 8, closed-book QA only → 0.57; plus the texts themselves → 0.62.
WORLD_BANK = BankConfig(rank=8, alpha=32.0, lr=3e-2, epochs=80, qa_with_passage=0,
                        qa_closed_book=10, text=True, docs_per_step=128)


MODES = ("vanilla", "rag", "prag", "dyprag", "prag+rag", "dyprag+rag")

DEFAULTS: dict[str, Any] = {
    "run": {"name": "world", "root": "checkpoints", "seed": 0},
    "data": {
        # "world": generate the synthetic world from ``world`` (its schema);
        # "qa": a corpus (jsonl or DPR tsv) and QA files (any format dyprag.qa reads).
        "kind": "world", "world": "configs/world.yaml",
        "corpus": None, "train_qa": None, "test_qa": None, "qa_format": None,
        "train_questions": None, "test_questions": None,
        # Translator-training documents: "gold" (each question's meta.doc_id) or
        # "retrieved" (the top ``index.k`` passages of each training question, as PRAG does).
        "train_docs": "gold",
        "val_fraction": 0.1,
        # The world only (ignored for "qa"): bios of this many fresh people added to the
        # translator's training data with the LM term only (no bank LoRA): cheap data for
        # the hypernetwork.
        "extra_docs": 6000,
    },
    "model": {
        # "world": pretrain the tiny base model on the world; else a hub id or local path.
        "name": "world", "dtype": "auto", "device": "auto",
        "pretrain": {"reading_single": 24000, "reading_multi": 16000},
    },
    # k: documents per question at query time (infer.py's default). A world question is
    # about one person, whose bio alone answers it, so 1; the paper configs use 3.
    "index": {"method": "dense", "embedder": None, "factory": "Flat", "k": 1},
    # How the model is asked: "plain" ("Question: … Answer:", the world's tiny model) or
    # "chat" (the tokenizer's chat template, PRAG's instruction); "auto": chat when the
    # tokenizer has a chat template. One format serves bank, translator, eval and infer.py.
    "prompt": {"format": "auto"},
    # method "template": the world's own QA templates; "llm": the base model writes the
    # rewrites and QA pairs; "auto": template for the world, llm for data.kind "qa".
    "augment": {"method": "auto", "rewrites": 1, "questions": 3, "max_retries": 2,
                "batch_size": 8},
    "bank": {**{k: getattr(WORLD_BANK, k) for k in BankConfig.__dataclass_fields__},
             "epochs": 20, "docs_per_step": 100},
    # The world's translator: linear in the passage's mean token embedding (see
    # dyprag/translator.py); DyPRAG's per-layer MLPs on the LLM embedding: configs/base/paper.yaml.
    "translator": {"architecture": "linear", "hidden": 32, "target_embed_dim": 32,
                   "embedding": "tokens"},
    "train": {
        "epochs": 2, "batch_size": 32, "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 20,
        # The world trains on the LM term alone (it scored best there; bench/RESULTS.md);
        # DyPRAG's 1 / 0.01 / 100 with KL and MSE to the bank: configs/base/paper.yaml.
        "w_lm": 1.0, "w_kl": 0.0, "w_mse": 0.0, "mse_space": "delta",
        "gradient_clip": 1.0, "accelerator": "auto", "devices": 1, "strategy": "auto",
        "precision": "auto", "num_workers": 0, "val_questions": 100, "log_every_n_steps": 10,
        # QA pairs per document also asked with the passage in the prompt (0: the bank's
        # recipe only).
        "qa_with_passage": 0,
        # Also the LM loss on the passage and its rewrites with the generated LoRA (the
        # bank's recipe; DyPRAG's translator trains on the QA pairs only).
        "passage_lm": False,
    },
    "eval": {"modes": ["vanilla", "rag@1", "rag@3", "prag@1", "dyprag@1", "dyprag@3",
                       "dyprag+rag@3"],
             "limit": None, "max_new_tokens": 8, "batch_size": 64, "samples": 10},
    "wandb": {"project": "dyprag", "name": None, "mode": None},
}

CHOICES = {
    ("data", "kind"): ("world", "qa"),
    ("prompt", "format"): ("auto", *PROMPT_FORMATS),
    ("augment", "method"): ("auto", "template", "llm"),
    ("data", "train_docs"): ("gold", "retrieved"),
    ("index", "method"): ("dense", "bm25", "hybrid"),
    ("translator", "architecture"): ("per_layer", "shared", "linear"),
    ("translator", "embedding"): ("retriever", "llm", "tokens"),
    ("train", "mse_space"): ("delta", "factor"),
    ("bank", "loss_on"): ("answer", "all"),
    ("bank", "init"): ("shared", "warmup"),
    ("wandb", "mode"): (None, "offline", "online", "disabled"),
    ("data", "qa_format"): (None, *FORMATS),
}
# Keys whose default is None but which take a value of this type.
TYPES = {("data", "corpus"): str, ("data", "train_qa"): str, ("data", "test_qa"): str,
         ("data", "train_questions"): int,
         ("data", "test_questions"): int, ("index", "embedder"): str, ("eval", "limit"): int,
         ("wandb", "name"): str}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); learning rates are written
    the short way, so also resolve ``[-+]?digits[.digits]e[-+]digits`` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _merge(base: dict, update: dict, where: str, problems: list[str]) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            problems.append(f"{path}: unknown key (known: {', '.join(sorted(base))})")
        elif isinstance(base[key], dict) and key != "pretrain":
            if isinstance(value, dict):
                out[key] = _merge(base[key], value, path, problems)
            else:
                problems.append(f"{path}: must be a mapping, got {value!r}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict]:
    """The file's mapping, preceded by its ``base:`` chain (oldest first)."""
    if path.is_dir():
        raise ValueError(f"config {path} is a directory; give a YAML file (e.g. "
                         "configs/smollm2-world.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path}: 'base:' chain loops back to itself")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _read_yaml(path.parent / base, (*seen, path.resolve())) if base else []
    return [*chain, data]


def parse_override(text: str) -> dict:
    """``"a.b=1"`` → ``{"a": {"b": 1}}`` (the value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} must look like section.key=value")
    try:
        value = _yaml(raw) if raw else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _is(value: Any, wanted: type | None, optional: bool) -> bool:
    """``value`` fits a field of type ``wanted`` (None: any); an int is a float, a bool is no
    int; ``optional`` fields (default None) also take None."""
    if wanted is None or (optional and value is None):
        return True
    if isinstance(value, bool):
        return wanted is bool
    return isinstance(value, wanted) or (wanted is float and isinstance(value, int))


def validate(config: dict, complete: bool = True) -> list[str]:
    """Every problem with a merged config, each as 'section.key: what is wrong'.

    ``complete=False`` accepts a base file that leaves the data or the model to others."""
    problems = []
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            value, name = config[section][key], f"{section}.{key}"
            wanted = TYPES.get((section, key), type(default) if default is not None else None)
            if (section, key) in CHOICES:
                if value not in CHOICES[(section, key)]:
                    problems.append(f"{name}: must be one of {CHOICES[(section, key)]}, got {value!r}")
            elif not _is(value, wanted, optional=(section, key) in TYPES):
                problems.append(f"{name}: must be {wanted.__name__}, got {value!r}")
            elif isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{name}: must be a finite number, got {value!r}")
    modes = config["eval"]["modes"]
    for mode in modes if isinstance(modes, list) else [modes]:
        try:
            parse_mode(mode)
        except ValueError as err:
            problems.append(f"eval.modes: {err}")
    if problems:
        return problems
    data, train = config["data"], config["train"]
    if data["kind"] == "qa" and config["augment"]["method"] == "template":
        problems.append("augment.method: 'template' is the synthetic world's; with data.kind "
                        "'qa' use 'llm' (or 'auto')")
    if data["kind"] == "qa" and complete:
        for key in ("corpus", "train_qa", "test_qa"):
            if not data[key]:
                problems.append(f"data.{key}: required when data.kind is 'qa'")
        if config["model"]["name"] == "world":
            problems.append("model.name: 'world' is the synthetic world's own model; "
                            "with data.kind 'qa' give a hub id or a local path")
    if data["extra_docs"] < 0:
        problems.append(f"data.extra_docs: must be ≥ 0, got {data['extra_docs']}")
    if not 0 <= data["val_fraction"] < 1:
        problems.append(f"data.val_fraction: must be in [0, 1), got {data['val_fraction']}")
    for key in ("epochs", "batch_size", "val_questions", "log_every_n_steps"):
        if train[key] < (0 if key == "val_questions" else 1):
            problems.append(f"train.{key}: must be ≥ 1, got {train[key]}")
    if train["lr"] <= 0:
        problems.append(f"train.lr: must be > 0, got {train['lr']}")
    for key in ("w_lm", "w_kl", "w_mse"):
        if train[key] < 0:
            problems.append(f"train.{key}: must be ≥ 0, got {train[key]}")
    if config["index"]["k"] < 1:
        problems.append(f"index.k: must be ≥ 1, got {config['index']['k']}")
    try:
        BankConfig(**config["bank"])
    except (TypeError, ValueError) as err:
        problems.append(f"bank: {err}")
    return problems


def parse_mode(mode: str) -> tuple[str, int]:
    """``"dyprag+rag@3"`` → ``("dyprag+rag", 3)``; ``"vanilla"`` → ``("vanilla", 0)``."""
    name, _, k = str(mode).partition("@")
    if name not in MODES:
        raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)} (with @k)")
    if name == "vanilla":
        if k:
            raise ValueError("'vanilla' takes no @k")
        return name, 0
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"mode {mode!r} needs a number of documents, e.g. {name}@3")
    return name, int(k)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                complete: bool = True) -> dict:
    """Defaults ← the file's ``base:`` chain ← the file ← overrides; validated (see
    ``validate`` for ``complete``)."""
    problems: list[str] = []
    config = copy.deepcopy(DEFAULTS)
    layers = _read_yaml(Path(path)) if path is not None else []
    for layer in [*layers, *(parse_override(o) for o in overrides)]:
        config = _merge(config, layer, "", problems)
    problems += validate(config, complete)
    if problems:
        where = f"config {path}" if path is not None else "config"
        raise ValueError(f"{where}: " + "; ".join(problems))
    return config


def bank_config(config: dict) -> BankConfig:
    return BankConfig(**config["bank"])


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
