"""LoRA factors for the FFN projections of every layer, and the math on them.

For a projection ``W ∈ R^{out×in}`` a LoRA adds ``ΔW = s · B A`` with ``A ∈ R^{r×in}``,
``B ∈ R^{out×r}`` and ``s = alpha / r``:

    x ──► W ────────────────┐
    │                       + ──► y = x Wᵀ + s · (x Aᵀ) Bᵀ
    └──► Aᵀ (in→r) ─► Bᵀ ───┘

A ``LoRA`` holds ``A`` and ``B`` for every ``(layer, module)`` of a model, optionally with a
leading batch dimension ``N`` (one LoRA per document or per question). Everything here is
plain tensor math: injecting a ``LoRA`` into a model lives in ``dyprag.engine.inject``; saving and
exporting in ``dyprag.engine.lora_io``.

Combining k documents is the sum of their deltas ``Σ w_i B_i A_i``, which is exactly rank
concatenation ``A = [A_1; …; A_k]``, ``B = [w_1 B_1 … w_k B_k]`` (DyPRAG instead averages A
and B separately, which adds cross terms ``B_i A_j``; we do not). Distances come in two
kinds: ``delta_distance`` in ΔW space (independent of how ΔW is factorised), computed from
r×r products without forming ΔW, and ``factor_mse`` in factor space (DyPRAG's loss).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from dyprag.engine.models import MODULES

Key = tuple[int, str]
"""(layer index, module name in dyprag.engine.models.MODULES)."""


def _order(key: Key) -> tuple[int, int, str]:
    """Sort targets by layer, then in MODULES order (gate, up, down)."""
    return key[0], MODULES.index(key[1]) if key[1] in MODULES else len(MODULES), key[1]


def _name(key: Key) -> str:
    return f"layer {key[0]} module {key[1]}"


class LoRA:
    """A and B factors for a set of (layer, module) targets, all of one rank.

    Shapes: ``A[key]`` is ``(r, in)`` and ``B[key]`` is ``(out, r)``, or ``(N, r, in)`` and
    ``(N, out, r)`` for a batch of N LoRAs. ``alpha`` is such that the scaling is
    ``alpha / r``. The constructor checks that every key has both factors, one rank and one
    batch size, and raises ``ValueError`` naming the first offender.
    """

    def __init__(self, A: Mapping[Key, Tensor], B: Mapping[Key, Tensor], alpha: float):
        if not A:
            raise ValueError("a LoRA needs at least one (layer, module) target")
        if set(A) != set(B):
            raise ValueError(f"A and B cover different targets: {sorted(set(A) ^ set(B))}")
        self.A = {key: A[key] for key in sorted(A, key=_order)}
        self.B = {key: B[key] for key in self.A}
        self.alpha = float(alpha)
        first = next(iter(self.A))
        lead = self.A[first].shape[:-2]
        rank = self.A[first].shape[-2]
        if len(lead) > 1:
            raise ValueError(f"{_name(first)}: A has shape {tuple(self.A[first].shape)}; "
                             "expected (r, in) or (N, r, in)")
        for key in self.A:
            a, b = self.A[key], self.B[key]
            if a.dim() != len(lead) + 2 or a.shape[:-2] != lead or a.shape[-2] != rank:
                raise ValueError(f"{_name(key)}: A has shape {tuple(a.shape)}, expected "
                                 f"{(*lead, rank, a.shape[-1])} (batch {tuple(lead)}, rank {rank})")
            if b.dim() != len(lead) + 2 or b.shape[:-2] != lead or b.shape[-1] != rank:
                raise ValueError(f"{_name(key)}: B has shape {tuple(b.shape)}, expected "
                                 f"{(*lead, b.shape[-2], rank)} (batch {tuple(lead)}, rank {rank})")
            if a.dtype != b.dtype or a.device != b.device:
                raise ValueError(f"{_name(key)}: A is {a.dtype} on {a.device} but B is "
                                 f"{b.dtype} on {b.device}")
        self.rank = int(rank)
        self.batch_size: int | None = int(lead[0]) if lead else None

    # ---- views -------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def keys(self) -> list[Key]:
        return list(self.A)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.A})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.A.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.A.values())).device

    def items(self) -> Iterator[tuple[Key, Tensor, Tensor]]:
        for key, a in self.A.items():
            yield key, a, self.B[key]

    def delta(self, key: Key) -> Tensor:
        """The formed ``ΔW = s · B A`` of one target, ``(out, in)`` or ``(N, out, in)``."""
        return self.scaling * (self.B[key] @ self.A[key])

    def __repr__(self) -> str:
        batch = "" if self.batch_size is None else f", batch={self.batch_size}"
        return (f"LoRA(targets={len(self.A)}, layers={len(self.layers)}, rank={self.rank}, "
                f"alpha={self.alpha:g}{batch}, dtype={self.dtype})")

    # ---- transforms ------------------------------------------------------------------------
    def map(self, fn) -> LoRA:
        """A new LoRA with ``fn`` applied to every factor."""
        return LoRA({k: fn(a) for k, a in self.A.items()}, {k: fn(b) for k, b in self.B.items()},
                    self.alpha)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoRA:
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> LoRA:
        return self.map(Tensor.detach)

    def __getitem__(self, index: int | slice | Tensor) -> LoRA:
        """Select samples of a batched LoRA: an int gives an unbatched LoRA."""
        if self.batch_size is None:
            raise TypeError("this LoRA has no batch dimension to index")
        return self.map(lambda t: t[index])

    @staticmethod
    def stack(loras: Sequence[LoRA]) -> LoRA:
        """Unbatched LoRAs of one rank and alpha → one batched LoRA with N = len(loras)."""
        first = _check_compatible(loras)
        if first.batch_size is not None:
            raise ValueError("LoRA.stack takes unbatched LoRAs")
        return LoRA({k: torch.stack([x.A[k] for x in loras]) for k in first.A},
                    {k: torch.stack([x.B[k] for x in loras]) for k in first.A}, first.alpha)

    # ---- constructors ---------------------------------------------------------------------
    @staticmethod
    def zeros(shapes: Mapping[Key, tuple[int, int]], rank: int, alpha: float,
              batch_size: int | None = None, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> LoRA:
        """All-zero factors for targets ``{key: (in_features, out_features)}``."""
        lead = () if batch_size is None else (batch_size,)
        return LoRA({k: torch.zeros(*lead, rank, i, dtype=dtype, device=device)
                     for k, (i, o) in shapes.items()},
                    {k: torch.zeros(*lead, o, rank, dtype=dtype, device=device)
                     for k, (i, o) in shapes.items()}, alpha)

    @staticmethod
    def random(shapes: Mapping[Key, tuple[int, int]], rank: int, alpha: float,
               batch_size: int | None = None, std: float = 0.02,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoRA:
        """Gaussian factors with standard deviation ``std`` (B too, so ΔW ≠ 0)."""
        lora = LoRA.zeros(shapes, rank, alpha, batch_size, torch.float32, "cpu")
        fill = lambda t: t.normal_(0.0, std, generator=generator)  # noqa: E731
        return lora.map(fill).to(device, dtype)


def _check_compatible(loras: Sequence[LoRA]) -> LoRA:
    if not loras:
        raise ValueError("need at least one LoRA")
    first = loras[0]
    for i, other in enumerate(loras[1:], start=1):
        if other.keys != first.keys:
            raise ValueError(f"LoRA {i} covers other targets than LoRA 0")
        if other.batch_size != first.batch_size:
            raise ValueError(f"LoRA {i} has batch size {other.batch_size}, LoRA 0 has "
                             f"{first.batch_size}")
        if (other.rank, other.alpha) != (first.rank, first.alpha):
            raise ValueError(f"LoRA {i} has rank {other.rank} alpha {other.alpha:g}, LoRA 0 "
                             f"has rank {first.rank} alpha {first.alpha:g}")
    return first


def combine(loras: Sequence[LoRA], weights: Sequence[float] | Tensor | None = None) -> LoRA:
    """Sum of the deltas of k LoRAs, as one LoRA of rank ``Σ r_i`` (rank concatenation).

    ``weights`` is ``(k,)``, or ``(N, k)`` for batched LoRAs (e.g. per-question retrieval
    scores); the result's delta is ``Σ_i w_i · s_i B_i A_i``. The result keeps the first
    LoRA's scaling ``s``, so its alpha is ``s · Σ r_i``.
    """
    if not loras:
        raise ValueError("combine needs at least one LoRA")
    first = loras[0]
    for i, other in enumerate(loras):
        if other.keys != first.keys or other.batch_size != first.batch_size:
            raise ValueError(f"LoRA {i} does not match LoRA 0 in targets or batch size")
    w = torch.ones(len(loras)) if weights is None else torch.as_tensor(weights)
    if w.shape[-1] != len(loras) or w.dim() > 2:
        raise ValueError(f"weights of shape {tuple(w.shape)} for {len(loras)} LoRAs")
    scale = []  # per LoRA: w_i · s_i / s, shaped to broadcast over B (N, out, r) or (out, r)
    for i, x in enumerate(loras):
        wi = w[..., i].to(device=x.device, dtype=x.dtype) * (x.scaling / first.scaling)
        scale.append(wi[:, None, None] if wi.dim() == 1 else wi)
    A = {k: torch.cat([x.A[k] for x in loras], dim=-2) for k in first.A}
    B = {k: torch.cat([x.B[k] * c for x, c in zip(loras, scale)], dim=-1) for k in first.A}
    rank = sum(x.rank for x in loras)
    return LoRA(A, B, alpha=first.scaling * rank)


def _trace_product(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """``tr((B1 A1)ᵀ (B2 A2)) = tr((B1ᵀ B2)(A2 A1ᵀ))`` from r×r products."""
    bb = b1.transpose(-1, -2) @ b2  # (..., r1, r2)
    aa = a2 @ a1.transpose(-1, -2)  # (..., r2, r1)
    return (bb * aa.transpose(-1, -2)).sum(dim=(-1, -2))


def delta_distance(x: LoRA, y: LoRA, per_target: bool = False) -> Tensor:
    """``Σ_targets ‖ΔW_x − ΔW_y‖²_F`` without forming any ΔW; ``(N,)`` for batched LoRAs
    (``(N, K)``, one column per target in ``x.keys`` order, with ``per_target``).

    Uses ``‖X − Y‖² = tr(XᵀX) − 2 tr(XᵀY) + tr(YᵀY)`` with every trace an r×r product, so
    the cost is O(r² (in + out)) per target instead of O(in · out).
    """
    if x.keys != y.keys:
        raise ValueError("the two LoRAs cover different targets")
    sx, sy = x.scaling, y.scaling
    columns = []
    for key, a1, b1 in x.items():
        a2, b2 = y.A[key], y.B[key]
        columns.append(sx * sx * _trace_product(b1, a1, b1, a1)
                       - 2 * sx * sy * _trace_product(b1, a1, b2, a2)
                       + sy * sy * _trace_product(b2, a2, b2, a2))
    # Rounding can push an exact zero slightly below it.
    distances = torch.stack(columns, -1).clamp_min(0.0)
    return distances if per_target else distances.sum(-1)


def factor_mse(x: LoRA, y: LoRA) -> Tensor:
    """Mean over targets of ``mse(A, A') + mse(B, B')``; ``(N,)`` for batched LoRAs.

    This is DyPRAG's distillation distance. Unlike ``delta_distance`` it depends on the
    factorisation: ``(cA, B/c)`` has the same delta as ``(A, B)`` but a nonzero MSE.
    """
    if x.keys != y.keys or x.rank != y.rank:
        raise ValueError("factor_mse needs LoRAs with the same targets and rank")
    dims = (-1, -2)
    total = sum(((x.A[k] - y.A[k]) ** 2).mean(dims) + ((x.B[k] - y.B[k]) ** 2).mean(dims)
                for k in x.keys)
    return total / len(x.keys)


def sum_groups(lora: LoRA, k: int, weights: Tensor | None = None) -> LoRA:
    """Rows ``i·k … i·k + k − 1`` of a batched LoRA summed into row ``i`` (rank
    concatenation): ``N·k`` documents' LoRAs → ``N`` combined ones; ``weights`` ``(N, k)``
    scales each document's delta (``combine``)."""
    if lora.batch_size is None or lora.batch_size % k:
        raise ValueError(f"a batch of {lora.batch_size} LoRAs does not split into groups of {k}")
    if k == 1 and weights is None:
        return lora
    rows = torch.arange(lora.batch_size // k, device=lora.device) * k
    return combine([lora[rows + j] for j in range(k)], weights)


def delta_cosines(lora: LoRA) -> Tensor:
    """Cosine similarity of the N deltas of a batched LoRA, ``(N, N)``: each document's
    ``ΔW`` over all targets as one vector. Traces of r×r products (``_trace_product``'s
    identity, batched as one Gram matrix of the stacked factors per target), so no ΔW is
    formed."""
    if lora.batch_size is None:
        raise ValueError("delta_cosines needs a batched LoRA")
    n, r = lora.batch_size, lora.rank
    gram = 0
    for _, a, b in lora.items():
        a, b = a.double(), b.double()
        bb = b.transpose(1, 2).reshape(n * r, -1) @ b.transpose(1, 2).reshape(n * r, -1).T
        aa = a.reshape(n * r, -1) @ a.reshape(n * r, -1).T  # (N·r, N·r)
        # tr((B_i A_i)ᵀ B_j A_j) = Σ_kl (B_iᵀ B_j)[k, l] · (A_i A_jᵀ)[k, l]
        gram = gram + (bb * aa).view(n, r, n, r).sum((1, 3))
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return (gram / norms[:, None] / norms[None, :]).to(lora.dtype)
