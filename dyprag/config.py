"""Run configuration: typed sections holding every default and every choice, loaded from YAML.

    config = load_config("configs/qwen2.5-1.5b-popqa.yaml", ["bank.epochs=2", "run.name=x"])
    config.train.lr, config.bank, config.eval.modes

A run config (``Config``) has the sections ``run``, ``data``, ``model`` (with ``pretrain``),
``index``, ``knowledge``, ``prompt``, ``augment``, ``bank``, ``translator``, ``train``,
``eval`` and ``wandb``, each a dataclass below: its fields' defaults are the embedded synthetic-world job (so
``python train.py`` needs no file), and a ``Literal`` field's arguments are the only place its
choices are listed (``choices(TrainConfig, "mse_space")``). A file may start from another with
``base: other.yaml`` (resolved relative to the file); overrides use dotted keys and YAML values
(``train.lr=1e-4``, ``eval.modes=[vanilla,rag@3]``, ``model.pretrain.epochs=2``).

Every problem (unknown key, wrong type, bad value) is collected and raised once, each naming
its field. Plain dataclasses rather than OmegaConf: no dependency, and OmegaConf stops at the
first bad field where this loader names them all. Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

MODES = ("vanilla", "rag", "prag", "dyprag", "prag+rag", "dyprag+rag")
PromptFormatName = Literal["plain", "chat"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormatName)
QAFormatName = Literal["2wqa", "hotpotqa", "popqa", "cwq", "jsonl", "flashrag"]  # dyprag.data.qa
QA_FORMATS: tuple[str, ...] = get_args(QAFormatName)
LORA_LAYERS = re.compile(r"^(all|(?P<first>\d+)-(?P<last>\d+)?)$")
"""``model.lora_layers``: ``all``, ``A-B`` (layers A to B, inclusive) or ``A-`` (A to the last)."""


# What "auto" means for each setting: (on a GPU, on a CPU). The one place it is decided.
AUTO = {"device": ("cuda", "cpu"), "dtype": ("bfloat16", "float32"),
        "precision": ("bf16-mixed", "32-true")}


def auto(setting: str, value):
    """``value``, or where it is ``"auto"`` the GPU's or the CPU's choice of ``setting``
    (``AUTO``: ``model.device``, ``model.dtype``, ``train.precision``)."""
    if value != "auto":
        return value
    gpu, cpu = AUTO[setting]
    import torch  # only here: importing the config imports no torch

    return gpu if torch.cuda.is_available() else cpu


class ConfigError(ValueError):
    """Problems with a config, each ``field: what is wrong``."""

    def __init__(self, problems: Sequence[str], where: str = "config"):
        self.problems = list(problems)
        super().__init__(f"{where}: " + "; ".join(self.problems))


class Section:
    """A config section: ``problems()`` lists its bad values (its fields' types are checked by
    the loader); constructing one with a bad value raises ``ConfigError``.

    ``RANGES`` bounds its numeric fields (None, where a field is optional, is not checked).
    The upper bounds are there so that a mistyped size or count fails here instead of
    exhausting the machine; each is at least 100× the largest value any file in configs/ or
    bench/ uses (tests/test_configs.py checks it)."""

    RANGES: ClassVar[dict[str, tuple[float, float]]] = {}

    def problems(self) -> list[str]:
        out = []
        for name, (least, most) in self.RANGES.items():
            value = getattr(self, name)
            if value is not None and not least <= value <= most:
                out.append(f"{name}: must be ≥ {least:g}, got {value}" if value < least else
                           f"{name}: must be ≤ {most:,}, got {value:,} (a bound that stops "
                           "a mistyped value from exhausting the machine)")
        return out

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, type(self).__name__)


RUN_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
"""``run.name``: one path component of letters, digits and ``._-``, not starting with a dot
(staging copies of runs are ``.<name>.attempt``)."""


@dataclass(frozen=True)
class RunConfig(Section):
    name: str = "world"
    root: str = "checkpoints"  # the run is written to <root>/<name>/
    seed: int = 0

    def problems(self) -> list[str]:
        if RUN_NAME.match(self.name) is None:
            return [f"name: must be letters, digits and ._- (not starting with '.'), one "
                    f"folder name inside run.root; got {shown(self.name)}"]
        return []


@dataclass(frozen=True)
class DataConfig(Section):
    # "world": generate the synthetic world from ``world`` (its schema);
    # "qa": a corpus (jsonl or DPR tsv) and QA files (any format dyprag.data.qa reads).
    kind: Literal["world", "qa"] = "world"
    world: str = "configs/world.yaml"
    corpus: str | None = None
    train_qa: str | None = None
    test_qa: str | None = None
    qa_format: QAFormatName | None = None
    train_questions: int | None = None
    test_questions: int | None = None
    # Translator-training documents: "gold" (each question's meta.doc_id) or "retrieved"
    # (the top ``index.k`` passages of each training question, as PRAG does).
    train_docs: Literal["gold", "retrieved"] = "gold"
    val_fraction: float = 0.1
    # The world only (ignored for "qa"): bios of this many fresh people added to the
    # translator's training data with the LM term only (no bank LoRA): cheap data for the
    # hypernetwork (its cost per document: bench/RESULTS.md, "The five-minute default job").
    extra_docs: int = 2500
    RANGES = {"extra_docs": (0, 10**6), "train_questions": (1, 10**7),
              "test_questions": (1, 10**7)}

    def problems(self) -> list[str]:
        out = super().problems()
        if not 0 <= self.val_fraction < 1:
            out.append(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        return out


@dataclass(frozen=True)
class PretrainConfig(Section):
    """The synthetic world's base model (dyprag/training/world_base.py): a small Llama and its
    pretraining on the world's pretrain people and reading practice."""

    # 8 heads of 16 dims find the reading circuit sooner than 4 of 32 (bench/RESULTS.md,
    # "Toward a five-minute default job").
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    reading_single: int = 24000  # one-passage reading examples (see pretraining_texts)
    reading_multi: int = 16000   # 1..max_passages-passage reading examples
    questions_per_context: int = 3
    max_passages: int = 3
    gold_first: float = 0.9
    seed: int = 0
    # Batches of similar lengths: sort the sequences by length within windows of this many
    # batches (the windows keep the curriculum's order; batches are shuffled within each).
    # 0: the curriculum order as is (much of it padding). 64 pretrains faster, with a better
    # table in every draw measured (bench/RESULTS.md, "Batches of similar lengths in
    # pretraining, now the default").
    length_window: int = 64
    RANGES = {"hidden_size": (1, 65536), "num_hidden_layers": (1, 1000),
              "num_attention_heads": (1, 1024), "intermediate_size": (1, 262144),
              "max_position_embeddings": (1, 131072), "epochs": (1, 1000),
              "batch_size": (1, 10**4), "warmup_steps": (0, 10**7),
              "reading_single": (0, 10**7), "reading_multi": (0, 10**7),
              "questions_per_context": (1, 1000), "max_passages": (1, 1000),
              "length_window": (0, 10**5)}


@dataclass(frozen=True)
class ModelConfig(Section):
    # "world": pretrain the tiny base model on the world; else a hub id or local path.
    name: str = "world"
    dtype: str = "auto"   # auto: bfloat16 on a GPU, float32 on a CPU
    device: str = "auto"  # auto: cuda when there is one
    # The decoder layers whose FFN projections take LoRAs (bank, translator, injection):
    # "all", "A-B" (inclusive) or "A-" (A to the last). Below the first, the frozen model's
    # states are computed once per training row and reused (dyprag/engine/prefix.py).
    lora_layers: str = "all"
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def problems(self) -> list[str]:
        if LORA_LAYERS.match(self.lora_layers) is None:
            return [f"lora_layers: must be 'all', 'A-B' or 'A-', got {self.lora_layers!r}"]
        return []


@dataclass(frozen=True)
class IndexConfig(Section):
    method: Literal["dense", "bm25", "hybrid"] = "dense"
    embedder: str | None = None  # None: all-MiniLM-L6-v2 (dyprag.retrieval.embed)
    factory: str = "Flat"        # a FAISS index factory string
    # Documents per question at query time (infer.py's default). A world question is about
    # one person, whose bio alone answers it, so 1; the paper configs use 3.
    k: int = 1
    RANGES = {"k": (1, 1000)}


@dataclass(frozen=True)
class KnowledgeConfig(Section):
    """How the retrieved documents' LoRAs are applied to a question (eval, infer.py)."""

    # "sum": each document's delta at weight 1 (PRAG's; configs/base/paper.yaml); "softmax":
    # weights softmax(score / temperature) over the question's k retrieval scores, summing to
    # one: in the world three summed deltas mixed three people, the softmax did not
    # (bench/RESULTS.md, "Composition (issue 15)").
    combine: Literal["sum", "softmax"] = "softmax"
    temperature: float = 0.02
    scale: float = 1.0  # every document's delta times this
    # "all": the LoRA acts on every position; "answer": only where the answer is produced
    # (the prompt's last token and each new one), so the prompt is read by the base model.
    inject: Literal["all", "answer"] = "all"

    def problems(self) -> list[str]:
        return [f"{n}: must be > 0, got {getattr(self, n)}" for n in ("temperature", "scale")
                if not getattr(self, n) > 0]


@dataclass(frozen=True)
class PromptConfig(Section):
    # How the model is asked: "plain" ("Question: … Answer:", the world's tiny model) or
    # "chat" (the tokenizer's chat template, PRAG's instruction); "auto": chat when the
    # tokenizer has a chat template. One format serves bank, translator, eval and infer.py.
    format: Literal["auto", PromptFormatName] = "auto"


@dataclass(frozen=True)
class AugmentConfig(Section):
    # "template": the world's own QA templates; "llm": the base model writes the rewrites
    # and QA pairs; "auto": template for the world, llm for data.kind "qa".
    method: Literal["auto", "template", "llm"] = "auto"
    rewrites: int = 1
    questions: int = 3
    max_retries: int = 2
    batch_size: int = 8
    RANGES = {"rewrites": (0, 1000), "questions": (1, 1000), "max_retries": (0, 1000),
              "batch_size": (1, 10**4)}


@dataclass(frozen=True)
class BankConfig(Section):
    """How each document's LoRA is trained (dyprag/training/bank.py). The defaults are the synthetic
    world's recipe: its tiny base model needs far more than PRAG's one epoch at lr 3e-4 to take
    in a document, and too much saturates it, the LoRA's output drowning the residual stream
    and with it any passage in the prompt (bench/RESULTS.md, "Composition (issue 15)", "The
    bank's learning rate"). PRAG's recipe: configs/base/paper.yaml."""

    rank: int = 8
    alpha: float = 32.0
    lr: float = 3e-3
    weight_decay: float = 0.0
    epochs: int = 5
    docs_per_step: int = 100
    shard_size: int = 256
    # Training examples per document: the first ``qa_with_passage`` QA pairs asked with the
    # passage (and again with each rewrite) in the prompt, the last ``qa_closed_book`` asked
    # with no passage (the two overlap when they add up to more than the document's pairs),
    # and optionally the passage and rewrites themselves as plain text (language modelling).
    qa_with_passage: int = 0
    qa_closed_book: int = 10
    text: bool = True
    loss_on: Literal["answer", "all"] = "answer"  # loss on answer tokens, or on every token
    seed: int = 0  # every LoRA starts from one init seeded by this (A random, B zero), as PRAG's
    RANGES = {"rank": (1, 4096), "epochs": (1, 10**4), "docs_per_step": (1, 10**5),
              "shard_size": (1, 10**6), "qa_with_passage": (0, 10**4),
              "qa_closed_book": (0, 10**4)}


@dataclass(frozen=True)
class TranslatorConfig(Section):
    # The world's translator, "attention": learned queries sort the passage's input-token
    # embeddings ("token_list") into slots, and every target's B is linear in the slots (A is
    # one learned matrix per target). Unlike "linear" on the mean token embedding, it learns
    # the birth years (bench/RESULTS.md, "DyPRAG as good as PRAG on the default job"). DyPRAG's
    # per-layer MLPs on the retriever's embedding: configs/base/paper.yaml.
    architecture: Literal["per_layer", "shared", "linear", "attention"] = "attention"
    hidden: int = 32
    target_embed_dim: int = 32
    # ``linear`` and ``attention``: every target's B reads one shared projection of its input to
    # this width (0: the input itself). It sizes the translator, which without one is many
    # times larger and learned less in an epoch (bench/RESULTS.md, issues 23 and 24).
    bottleneck: int = 128
    # The document embedding it reads: the retriever's, the base model's last-token state of
    # the passage ("llm", DyPRAG's), its mean input-token embedding ("tokens"), or its first
    # ``max_tokens`` input-token embeddings one by one ("token_list", which "attention" reads,
    # with ``queries`` slots).
    embedding: Literal["retriever", "llm", "tokens", "token_list"] = "token_list"
    queries: int = 8
    max_tokens: int = 64

    RANGES = {"hidden": (1, 10**5), "target_embed_dim": (1, 10**5), "bottleneck": (0, 10**5),
              "queries": (1, 10**4), "max_tokens": (1, 10**5)}

    def problems(self) -> list[str]:
        out = super().problems()
        if (self.architecture == "attention") != (self.embedding == "token_list"):
            out.append("architecture: 'attention' reads, and alone reads, embedding "
                       f"'token_list'; got architecture {self.architecture!r} with embedding "
                       f"{self.embedding!r}")
        return out


@dataclass(frozen=True)
class TrainConfig(Section):
    """The translator's fit (dyprag/training/fit.py, dyprag/training/distill.py)."""

    # One epoch at 5e-3 over the world's documents: the attention translator reads every fact
    # but the birth year as well as PRAG within it; whether it learns the year (a hundred
    # look-alike tokens) differs from fit to fit (bench/RESULTS.md, issue 24).
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    # DyPRAG's weights. The MSE to the bank's deltas keeps the generated ΔW at the bank's
    # scale: with the LM term alone the world's translator emitted one shared delta, far
    # larger than the residual stream, that drowned any passage in the prompt
    # (bench/RESULTS.md, "Composition (issue 15)").
    w_lm: float = 1.0
    w_kl: float = 0.01
    w_mse: float = 100.0
    mse_space: Literal["delta", "factor"] = "delta"
    # Where the KL term reads the teacher: every real token (DyPRAG's) or the answer tokens
    # only (the vocabulary logits are then computed there alone: cheaper with a real vocabulary).
    kl_on: Literal["all", "answer"] = "all"
    gradient_clip: float = 1.0
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on a GPU, 32-true on a CPU
    num_workers: int = 0
    val_questions: int = 100
    log_every_n_steps: int = 10
    # QA pairs per document also asked with the passage (and again with its rewrite) in the
    # prompt, so the generated LoRA and a passage agree (0: the bank's recipe only).
    qa_with_passage: int = 1
    # Which QA pairs are asked with the passage: the first ``qa_with_passage`` with every text
    # ("first"), or different ones per text, spread over the document's pairs ("spread").
    passage_qa: Literal["first", "spread"] = "first"
    # Also the LM loss on the passage and its rewrites with the generated LoRA (the bank's
    # recipe; DyPRAG's translator trains on the QA pairs only).
    passage_lm: bool = False

    RANGES = {"epochs": (1, 10**4), "batch_size": (1, 10**5), "warmup_steps": (0, 10**7),
              "devices": (1, 1024), "num_workers": (0, 1024), "val_questions": (0, 10**7),
              "log_every_n_steps": (1, 10**7), "qa_with_passage": (0, 10**4),
              **{w: (0, math.inf) for w in ("w_lm", "w_kl", "w_mse")}}

    def problems(self) -> list[str]:
        out = super().problems()
        if self.lr <= 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        return out


@dataclass(frozen=True)
class EvalConfig(Section):
    modes: list[str] = field(default_factory=lambda: [
        "vanilla", "rag@1", "rag@3", "prag@1", "dyprag@1", "dyprag@3", "dyprag+rag@3"])
    limit: int | None = None  # the first N test questions
    max_new_tokens: int = 8
    batch_size: int = 64
    samples: int = 10  # sample answers in the logs
    RANGES = {"limit": (1, 10**7), "max_new_tokens": (1, 10**5), "batch_size": (1, 10**5),
              "samples": (0, 10**5)}

    def problems(self) -> list[str]:
        out = super().problems()
        for mode in self.modes:
            try:
                parse_mode(mode)
            except ValueError as err:
                out.append(f"modes: {err}")
        return out


@dataclass(frozen=True)
class WandbConfig(Section):
    project: str = "dyprag"
    name: str | None = None  # None: run.name
    # None: WANDB_MODE, else online only when the user has a W&B API key (dyprag/run/loggers.py).
    mode: Literal["offline", "online", "disabled"] | None = None


@dataclass(frozen=True)
class Config(Section):
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def problems(self, complete: bool = True) -> list[str]:
        """Problems across sections; ``complete=False`` accepts a base file that leaves the
        data or the model to others."""
        out = []
        if self.data.kind == "qa" and self.augment.method == "template":
            out.append("augment.method: 'template' is the synthetic world's; with data.kind "
                       "'qa' use 'llm' (or 'auto')")
        if self.data.kind == "qa" and complete:
            out += [f"data.{key}: required when data.kind is 'qa'"
                    for key in ("corpus", "train_qa", "test_qa") if not getattr(self.data, key)]
            if self.model.name == "world":
                out.append("model.name: 'world' is the synthetic world's own model; with "
                           "data.kind 'qa' give a hub id or a local path")
        return out

    def __post_init__(self) -> None:
        pass  # cross-section checks need ``complete``: load_config runs them

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choices(section: type, name: str) -> tuple:
    """The values a ``Literal`` field of ``section`` takes (None included when optional)."""
    hint = get_type_hints(section)[name]
    if get_origin(hint) in (Union, types.UnionType):
        return tuple(v for a in get_args(hint) for v in (get_args(a) or (None,)))
    return get_args(hint)


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a YAML alias bomb expands to megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` (None: nothing). An int is
    a float; a bool is no int; a float must be finite."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return None if value in args else f"must be one of {args}, got {shown(value)}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        problem = _type_problem(value, inner)
        if problem and get_origin(inner) is Literal:
            return f"must be one of {(None, *get_args(inner))}, got {shown(value)}"
        return problem
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {shown(value)}"
        return next(filter(None, (_type_problem(v, args[0]) for v in value)), None)
    if isinstance(value, bool) and hint is not bool:
        return f"must be {hint.__name__}, got {shown(value)}"
    if hint is float and isinstance(value, int):
        return None
    if not isinstance(value, hint):
        return f"must be {hint.__name__}, got {shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {shown(value)}"
    return None


def _merge(base: dict, update: dict, where: str, problems: list[str]) -> dict:
    out = dict(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            problems.append(f"{path}: unknown key (known: {', '.join(sorted(base))})")
        elif isinstance(base[key], dict):
            if isinstance(value, dict):
                out[key] = _merge(base[key], value, path, problems)
            else:
                problems.append(f"{path}: must be a mapping, got {shown(value)}")
        else:
            out[key] = value
    return out


def _build(cls: type, values: dict, where: str, problems: list[str]):
    """``cls(**values)`` with every field's type checked and every bad value named (None when
    there is a problem)."""
    hints, kwargs, ok = get_type_hints(cls), {}, True
    for f in dataclasses.fields(cls):
        name, value, hint = f"{where}.{f.name}" if where else f.name, values[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value, name, problems)
            ok = ok and value is not None
        elif (problem := _type_problem(value, hint)) is not None:
            problems.append(f"{name}: {problem}")
            ok = False
        kwargs[f.name] = value
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems += [f"{where}.{p}" if where else p for p in err.problems]
        return None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); learning rates are written
    the short way, so also resolve ``[-+]?digits[.digits]e[-+]digits`` as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


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
    except RecursionError:
        raise ValueError(f"config {path} is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config {path}: 'base:' must be a file name (a string), got "
                         f"{type(base).__name__}")
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
    except RecursionError:
        raise ValueError(f"override {shown(text)}: the value is nested too deeply") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


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
                complete: bool = True) -> Config:
    """Defaults ← the file's ``base:`` chain ← the file ← overrides; validated (see
    ``Config.problems`` for ``complete``)."""
    problems: list[str] = []
    values = Config().to_dict()
    layers = _read_yaml(Path(path)) if path is not None else []
    for layer in [*layers, *(parse_override(o) for o in overrides)]:
        values = _merge(values, layer, "", problems)
    config = _build(Config, values, "", problems)
    if config is not None:
        problems += config.problems(complete)
    if problems:
        raise ConfigError(problems, f"config {path}" if path is not None else "config")
    return config


def dump(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
