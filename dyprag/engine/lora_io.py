"""Save and load LoRAs (safetensors + meta.json), and export one as a PEFT adapter.

On-disk layout of ``save_lora(lora, path)``::

    path/lora.safetensors   A.<layer>.<module>, B.<layer>.<module>  ((N,) r×in and out×r)
    path/meta.json          {"format": "dyprag-lora", "rank", "alpha", "batch_size", ...}

Files are written to a temporary name and renamed, ``meta.json`` last, so a directory with a
``meta.json`` is always complete. Nothing is pickled.

``export_peft`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
format so that ``PeftModel.from_pretrained`` (and vLLM's LoRA loader) can use a LoRA that
dyprag generated. A fused ``gate_up_proj`` gets one LoRA of rank 2r: ``A = [A_gate; A_up]``
and ``B = diag(B_gate, B_up)``, with ``rank_pattern``/``alpha_pattern`` keeping ``s = α/r``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.engine.models import MODULES, find_ffn_targets
from dyprag.files import atomic_path, atomic_write_json, read_meta, read_safetensors

FORMAT = "dyprag-lora"
WEIGHTS = "lora.safetensors"
META = "meta.json"


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary name and a rename."""
    with atomic_path(path) as tmp:
        save_file({k: t.detach().contiguous().cpu() for k, t in tensors.items()}, str(tmp),
                  metadata=metadata)


def lora_tensors(lora: LoRA) -> dict[str, torch.Tensor]:
    """The on-disk names of a LoRA's factors: ``A.<layer>.<module>``, ``B.<layer>.<module>``."""
    tensors = {}
    for (layer, module), a, b in lora.items():
        tensors[f"A.{layer}.{module}"] = a
        tensors[f"B.{layer}.{module}"] = b
    return tensors


def save_lora(lora: LoRA, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``lora`` to directory ``path``; ``meta`` (e.g. base model id) goes into meta.json."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(lora_tensors(lora), out / WEIGHTS)
    atomic_write_json(out / META, {
        **(meta or {}), "format": FORMAT, "rank": lora.rank, "alpha": lora.alpha,
        "batch_size": lora.batch_size, "dtype": str(lora.dtype).removeprefix("torch."),
        "layers": len(lora.layers), "modules": sorted({m for _, m in lora.keys},
                                                      key=MODULES.index),
    })
    return out


def load_lora(path: str | os.PathLike, device: str | torch.device = "cpu",
              base_model: str | None = None) -> tuple[LoRA, dict[str, Any]]:
    """Read a directory written by ``save_lora``; returns ``(lora, meta)``.

    With ``base_model``, refuse a LoRA whose meta.json names another base model.
    """
    src = Path(path)
    meta = read_meta(src, FORMAT, "LoRA", base_model)
    tensors = read_safetensors(src / WEIGHTS, str(device))
    A, B = {}, {}
    for name, tensor in tensors.items():
        kind, layer, module = name.split(".")
        (A if kind == "A" else B)[(int(layer), module)] = tensor
    return LoRA(A, B, alpha=meta["alpha"]), meta


def export_peft(lora: LoRA, model: torch.nn.Module, path: str | os.PathLike,
                base_model_name_or_path: str | None = None) -> Path:
    """Write one (unbatched) LoRA for ``model`` as a PEFT LoRA adapter folder."""
    if lora.batch_size not in (None, 1):
        raise ValueError(f"export_peft takes one LoRA, got a batch of {lora.batch_size}")
    if lora.batch_size == 1:
        lora = lora[0]
    injection = inject_lora(model)
    injection.check(lora)
    by_linear: dict[str, list] = {}  # qualified linear name → its targets, in output order
    for target in injection.targets.values():
        by_linear.setdefault(target.name, []).append(target)

    tensors: dict[str, torch.Tensor] = {}
    suffixes: set[str] = set()
    rank_pattern, alpha_pattern = {}, {}
    for name, parts in by_linear.items():
        if not any((t.layer, t.module) in lora.A for t in parts):
            continue
        suffix = name.rsplit(".", 1)[-1]
        suffixes.add(suffix)
        a_blocks, b_cols = [], []
        for t in parts:  # missing parts of a fused linear get a zero block
            key = (t.layer, t.module)
            a_blocks.append(lora.A.get(key, torch.zeros(lora.rank, t.in_features,
                                                         dtype=lora.dtype, device=lora.device)))
            b_cols.append(lora.B.get(key, torch.zeros(t.out_features, lora.rank,
                                                      dtype=lora.dtype, device=lora.device)))
        a = torch.cat(a_blocks, dim=0)  # (parts·r, in)
        b = torch.block_diag(*b_cols)  # (out, parts·r)
        if len(parts) > 1:
            rank_pattern[suffix] = len(parts) * lora.rank
            alpha_pattern[suffix] = len(parts) * lora.alpha
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    base = base_model_name_or_path or getattr(model.config, "_name_or_path", None) or None
    atomic_write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(suffixes), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None,
        # a LoRA on some layers only (model.lora_layers): PEFT adds adapters there alone
        "layers_to_transform": (None if lora.layers == sorted({t.layer for t in find_ffn_targets(model)})
                                else lora.layers),
    })
    return out
