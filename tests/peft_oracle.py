"""PEFT as the oracle of dyprag's injection: the same model with the same LoRA set through
PEFT's layers. Used by the tests and by bench/gpu_check.py (peft is a test dependency;
nothing under dyprag/ imports it)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA


def peft_twin(model, lora: LoRA):
    """The same model with ``lora``'s A and B set through PEFT's LoRA layers (the oracle)."""
    injection = inject_lora(model)
    fused = any(t.linear.out_features != t.out_features for t in injection.targets.values())
    suffixes = ["gate_up_proj", "down_proj"] if fused else ["gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=suffixes,
                        lora_dropout=0.0, init_lora_weights=False,
                        rank_pattern={"gate_up_proj": 2 * lora.rank} if fused else {},
                        alpha_pattern={"gate_up_proj": 2 * lora.alpha} if fused else {})
    base = copy.deepcopy(model)
    inject_lora(base).remove()
    peft_model = get_peft_model(base, config)
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for layer in injection.layers:
            mlp = f"base_model.model.model.layers.{layer}.mlp"
            if fused:
                gate, up = (layer, "gate"), (layer, "up")
                a = torch.cat([lora.A[gate], lora.A[up]])
                b = torch.block_diag(lora.B[gate], lora.B[up])
                _set_peft(modules[f"{mlp}.gate_up_proj"], a, b)
            else:
                for module in ("gate", "up"):
                    _set_peft(modules[f"{mlp}.{module}_proj"], lora.A[(layer, module)],
                              lora.B[(layer, module)])
            _set_peft(modules[f"{mlp}.down_proj"], lora.A[(layer, "down")], lora.B[(layer, "down")])
    return peft_model.eval()


def _set_peft(module, a, b) -> None:
    module.lora_A["default"].weight.copy_(a)
    module.lora_B["default"].weight.copy_(b)
