"""Inject LoRA into a Hugging Face causal LM's FFN projections, without an adapter library.

``inject_lora(model)`` wraps every FFN linear once with a forward hook and freezes the model.
The hook adds the *active* LoRA's delta to the linear's output; nothing is active by
default, so the model behaves exactly as before. The module tree, parameter names and
``save_pretrained`` stay untouched, and no modeling file is copied, so any architecture that
``dyprag.engine.models.find_ffn_targets`` understands works.

    injection = inject_lora(model)
    with injection.use(lora):              # one forward, or a whole generate (KV cache on)
        out = model.generate(**batch)

Three modes:
- broadcast: an unbatched LoRA applies to every row.
- per-sample: a LoRA with batch size N; row b of the batch uses LoRA b, through two ``bmm``
  on ``(N, T, in) × (N, in, r)`` with the base GEMM shared. A batch of ``N·m`` rows (beam
  search or ``num_return_sequences`` expand each input m times, consecutively) is viewed as
  ``(N, m·T, in)``, so A is never repeated per row or per token.
- merged: ``W ← W + s·BA`` for a single LoRA (fastest for one query); ``unmerge`` copies the
  original weights back, bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from dyprag.engine.lora import Key, LoRA
from dyprag.engine.models import FFNTarget, find_ffn_targets

_ATTR = "_dyprag_injection"  # on the model: its LoRAInjection
_STATE = "_dyprag_lora"  # on each hooked linear: (batch size or None, [_Slot], last_only) or None

# Per hooked linear: one (rows, Aᵀ, Bᵀ, scaling) entry per logical projection it holds;
# rows is None when the projection owns the whole output, Aᵀ/Bᵀ None when it has no LoRA.
_Slot = tuple[slice | None, Tensor | None, Tensor | None, float]


def _lora_hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
    """Forward hook of every injected linear: add the active LoRA's delta to ``out``.

    The active LoRA is stored on the linear itself (not in a closure), so a deep copy of
    the model carries its own state and hooks.
    """
    state = getattr(module, _STATE, None)
    if state is None:
        return None
    n, slots, last_only = state
    x = args[0]
    out = out.contiguous()  # a no-op for nn.Linear; makes the views below valid
    if last_only and x.dim() == 3:  # only each sequence's last position: (rows, 1, in)
        x, full, out = x[:, -1:], out, out[:, -1:]
    else:
        full = out
    if any(a_t is not None and a_t.dtype != out.dtype for _, a_t, _, _ in slots):
        # Under autocast the linear's output is in the autocast dtype, and in-place ops are
        # not autocast: bring the factors to it (differentiably).
        slots = [(rows, None if a_t is None else a_t.to(out.dtype),
                  None if b_t is None else b_t.to(out.dtype), s) for rows, a_t, b_t, s in slots]
    # Adding in place into the linear's fresh output saves a full (rows, out) allocation and
    # copy per projection; autograd allows it since a linear's backward never reads its output.
    if n is None:  # broadcast: flatten every leading dim into rows
        x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
        out2 = out.view(-1, out.shape[-1])  # (rows, out), a view of ``full``
        for rows, a_t, b_t, s in slots:
            if a_t is not None:
                target = out2 if rows is None else out2[:, rows]
                target.addmm_(x2 @ a_t, b_t, alpha=s)  # (rows, r) @ (r, out)
    else:
        if x.dim() != 3 or x.shape[0] % n:
            raise ValueError(f"per-sample LoRA has {n} samples but the projection input "
                             f"has shape {tuple(x.shape)}; expected (N·m, T, in) with N={n}")
        # Rows b·m … b·m+m−1 belong to sample b (generate expands inputs consecutively).
        x3 = x.reshape(n, -1, x.shape[-1])  # (N, m·T, in)
        out3 = out.view(n, -1, out.shape[-1])  # (N, m·T, out), a view of ``full``
        for rows, a_t, b_t, s in slots:
            if a_t is not None:
                target = out3 if rows is None else out3[..., rows]
                target.baddbmm_(torch.bmm(x3, a_t), b_t, alpha=s)  # (N, m·T, r) @ (N, r, out)
    return full


def inject_lora(model: nn.Module, layers: Sequence[int] | None = None) -> LoRAInjection:
    """Install the LoRA hooks on ``model`` (once) and freeze its parameters.

    ``layers``: the decoder layers whose FFN projections take LoRAs (None: every layer;
    ``dyprag.engine.models.lora_layers`` reads ``model.lora_layers``). Calling it again on the same
    model returns the same injection; asking it for other layers then is an error.
    """
    existing = getattr(model, _ATTR, None)
    if existing is not None:
        if layers is not None and list(layers) != existing.layers:
            raise ValueError(f"this model's LoRA targets are layers {existing.layers}, not "
                             f"{list(layers)}; load the model again to change them")
        return existing
    injection = LoRAInjection(model, layers)
    setattr(model, _ATTR, injection)
    return injection


class LoRAInjection:
    """The LoRA hooks of one model: set the active LoRA, merge and unmerge."""

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None):
        self.model = model
        every = find_ffn_targets(model)
        count = 1 + max(t.layer for t in every)
        wanted = set(range(count) if layers is None else layers)
        if not wanted or not wanted <= set(range(count)):
            raise ValueError(f"LoRA layers {sorted(wanted)} are not a non-empty subset of the "
                             f"model's {count} layers (0..{count - 1})")
        self.targets: dict[Key, FFNTarget] = {(t.layer, t.module): t for t in every
                                              if t.layer in wanted}
        model.requires_grad_(False)
        # Group logical targets by the nn.Linear that holds them (two for gate_up_proj).
        self._linears: list[nn.Linear] = []
        self._parts: list[list[FFNTarget]] = []
        for target in self.targets.values():
            if not self._linears or self._linears[-1] is not target.linear:
                self._linears.append(target.linear)
                self._parts.append([])
            self._parts[-1].append(target)
        self._originals: list[Tensor] | None = None
        for linear in self._linears:
            setattr(linear, _STATE, None)
            linear.register_forward_hook(_lora_hook)

    # ---- shapes and checks ----------------------------------------------------------------
    @property
    def shapes(self) -> dict[Key, tuple[int, int]]:
        """``{(layer, module): (in_features, out_features)}`` of every target."""
        return {k: (t.in_features, t.out_features) for k, t in self.targets.items()}

    @property
    def layers(self) -> list[int]:
        """The layers that take LoRAs, ascending."""
        return sorted({layer for layer, _ in self.targets})

    def check(self, lora: LoRA) -> None:
        """Raise ``ValueError`` naming the first target where ``lora`` does not fit."""
        if lora.layers != self.layers:
            raise ValueError(f"LoRA covers layers {lora.layers} but this model takes LoRAs on "
                             f"layers {self.layers}")
        model_device = next(iter(self.targets.values())).linear.weight.device
        autocast = torch.is_autocast_enabled(model_device.type)
        for key, a, b in lora.items():
            target = self.targets.get(key)
            if target is None:
                raise ValueError(f"layer {key[0]} module {key[1]}: the model has no such FFN "
                                 f"projection (modules: gate, up, down)")
            lead = a.shape[:-2]
            want_a = (*lead, lora.rank, target.in_features)
            want_b = (*lead, target.out_features, lora.rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"layer {key[0]} module {key[1]}: expected A {want_a} and B "
                                 f"{want_b}, got A {tuple(a.shape)} and B {tuple(b.shape)}")
            weight = target.linear.weight
            if a.device != weight.device:
                raise ValueError(f"layer {key[0]} module {key[1]}: LoRA is on {a.device}, "
                                 f"expected {weight.device} (the model's device)")
            if a.dtype != weight.dtype and not autocast:
                raise ValueError(f"layer {key[0]} module {key[1]}: LoRA is {a.dtype}, expected "
                                 f"{weight.dtype} (the model's dtype; or run under autocast)")

    # ---- the active LoRA ------------------------------------------------------------------
    @contextmanager
    def use(self, lora: LoRA | None, last_only: bool = False) -> Iterator[None]:
        """Make ``lora`` active for the forward passes inside the block (``None``: none).

        ``last_only``: the LoRA acts only on the last position of each forward's sequences.
        With a KV cache, a ``generate`` then reads the prompt with the base model and applies
        the LoRA where the answer is produced (the prompt's last token, every new token).
        Nesting restores the outer LoRA on exit. Gradients flow to ``lora``'s tensors.
        """
        previous = [getattr(linear, _STATE) for linear in self._linears]
        if lora is not None:
            self.check(lora)
        for linear, parts in zip(self._linears, self._parts):
            slots = None if lora is None else self._slots(parts, lora)
            setattr(linear, _STATE, (lora.batch_size, slots, last_only) if slots else None)
        try:
            yield
        finally:
            for linear, state in zip(self._linears, previous):
                setattr(linear, _STATE, state)

    @staticmethod
    def _slots(parts: list[FFNTarget], lora: LoRA) -> list[_Slot]:
        """The hook's view of ``lora`` for one linear; empty when ``lora`` skips all of it.

        A fused linear has a slot per part (``None`` factors for a part the LoRA skips).
        """
        slots = []
        for t in parts:
            rows = None if t.out_features == t.linear.out_features else t.rows
            key = (t.layer, t.module)
            if key in lora.A:
                slots.append((rows, lora.A[key].transpose(-1, -2),
                              lora.B[key].transpose(-1, -2), lora.scaling))
            else:
                slots.append((rows, None, None, 0.0))
        return slots if any(a_t is not None for _, a_t, _, _ in slots) else []

    # ---- merge ----------------------------------------------------------------------------
    @property
    def is_merged(self) -> bool:
        return self._originals is not None

    @torch.no_grad()
    def merge(self, lora: LoRA) -> None:
        """Add ``s·BA`` into the weights (computed in fp32, cast once).

        ``lora`` must be unbatched (or have batch size 1). Raises ``RuntimeError`` if a LoRA
        is already merged: unmerge first.
        """
        if self._originals is not None:
            raise RuntimeError("a LoRA is already merged into this model; call unmerge() first")
        if lora.batch_size is not None:
            if lora.batch_size != 1:
                raise ValueError(f"merge takes one LoRA, got a batch of {lora.batch_size}")
            lora = lora[0]
        self.check(lora)
        self._originals = [linear.weight.detach().clone() for linear in self._linears]
        for linear, parts in zip(self._linears, self._parts):
            weight = linear.weight
            for target in parts:
                key = (target.layer, target.module)
                if key in lora.A:
                    delta = lora.scaling * (lora.B[key].float() @ lora.A[key].float())
                    rows = weight[target.rows]
                    rows.copy_((rows.float() + delta).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weights saved by ``merge`` bit-exactly; a no-op when nothing is merged."""
        if self._originals is None:
            return
        for linear, original in zip(self._linears, self._originals):
            linear.weight.copy_(original)
        self._originals = None

    @contextmanager
    def merged(self, lora: LoRA) -> Iterator[None]:
        """``merge(lora)`` for the block, ``unmerge()`` after it (also on error)."""
        self.merge(lora)
        try:
            yield
        finally:
            self.unmerge()

    def remove(self) -> None:
        """Unmerge, remove the hooks and forget the injection (parameters stay frozen)."""
        self.unmerge()
        for linear in self._linears:
            hooks = linear._forward_hooks  # by value: handles would not survive a deepcopy
            for hook_id in [i for i, fn in hooks.items() if fn is _lora_hook]:
                del hooks[hook_id]
            if hasattr(linear, _STATE):
                delattr(linear, _STATE)
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
