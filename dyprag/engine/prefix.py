"""The frozen layers below the first LoRA layer, computed once per training row.

With LoRAs on layers ``L..N−1`` only (``model.lora_layers``), the hidden states entering
layer ``L`` depend on the tokens alone: nothing below it is trained or injected. A training
row's states there are computed once (``states_below``) and every later forward of that row,
in every epoch and with every LoRA (the student's, the teacher's, a bank LoRA's), starts at
layer ``L`` (``hidden_from``). Exact: the same layers run on the same inputs. Logits are then
taken only where a loss reads them (``logits_at``): with a real vocabulary the output head
is a large part of a short row's cost.

    states = states_below(model, ids, mask, layer)          # once, no gradient
    hidden = hidden_from(model, states, mask, layer)        # each step, LoRA injected
    logits = logits_at(model, hidden, positions)            # (M, V) at the selected positions

It relies on the decoder feeding ``inputs_embeds`` unchanged to its first layer (Llama,
Qwen2, Mistral, Phi-3, Gemma) and the logits being the output head's alone (not Gemma2's,
which are softcapped): ``supports_prefix`` checks both.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dyprag.engine.inject import inject_lora


class _Captured(Exception):
    def __init__(self, states: Tensor):
        self.states = states


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (the module holding ``layers`` and ``norm``)."""
    return model.get_decoder()


@torch.no_grad()
def states_below(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 layer: int) -> Tensor:
    """The hidden states entering decoder layer ``layer``, ``(N, T, H)``; the layers above
    it are not run."""
    def capture(_module, args, kwargs):
        raise _Captured(args[0] if args else kwargs["hidden_states"])

    handle = decoder(model).layers[layer].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured as stop:
        return stop.states.detach()
    finally:
        handle.remove()
    raise AssertionError(f"layer {layer} was never called")


@contextmanager
def _layers_from(model: nn.Module, layer: int):
    stack = decoder(model)
    every = stack.layers
    stack.layers = nn.ModuleList(list(every)[layer:])
    try:
        yield stack
    finally:
        stack.layers = every


def hidden_from(model: nn.Module, states: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """The decoder's final (normed) hidden states ``(N, T, H)``, running layers ``layer..``
    on ``states`` (from ``states_below``), with whatever LoRA is injected."""
    if layer == 0:
        raise ValueError("hidden_from starts above layer 0; run the model itself there")
    with _layers_from(model, layer) as stack:
        return stack(inputs_embeds=states, attention_mask=attention_mask,
                     use_cache=False).last_hidden_state


def final_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 states: Tensor | None = None, layer: int = 0) -> Tensor:
    """The decoder's final hidden states: from ``states`` at ``layer`` when given, else from
    the tokens."""
    if states is not None:
        return hidden_from(model, states, attention_mask, layer)
    return decoder(model)(input_ids=input_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state


def logits_at(model: nn.Module, hidden: Tensor, positions: Tensor) -> Tensor:
    """Vocabulary logits (fp32) at the ``True`` entries of ``positions`` ``(N, T)``, row-major:
    ``(M, V)``."""
    return model.get_output_embeddings()(hidden[positions]).float()


@torch.no_grad()
def supports_prefix(model: nn.Module, layer: int) -> bool:
    """Whether ``logits_at(hidden_from(states_below(…, layer)))`` is the model's own forward
    on a short row (not when the decoder transforms its ``inputs_embeds`` before the first
    layer, or the causal LM transforms the output head's logits, as Gemma2's softcapping)."""
    ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    hidden = hidden_from(model, states_below(model, ids, mask, layer), mask, layer)
    return torch.allclose(logits_at(model, hidden, mask.bool()), full[0], rtol=1e-3, atol=1e-4)


def prefix_layer(model: nn.Module) -> int:
    """The layer a training forward of ``model`` can start at: its first LoRA layer
    (``dyprag.engine.inject``), or 0 when that is the first layer or the model does not support it."""
    first = inject_lora(model).layers[0]
    return first if first > 0 and supports_prefix(model, first) else 0
