"""The parameter translator: a hypernetwork from a document embedding to FFN LoRA weights.

    emb (N, D) ──► per (layer, module): A (N, r, in), B (N, out, r) ──► LoRA (scaling α/r)

Architectures (docs/design.md §3):

- ``per_layer`` (DyPRAG's): one 2-layer MLP ``D → hidden → r·(in + out)`` per (layer,
  module), hidden width 32 by default. Its parameter count grows with layers × modules.
- ``shared``: one trunk MLP over ``[emb; layer embedding; module embedding]`` shared by
  every target, then one output head per module type (gate, up, down). Far smaller: the big
  output heads exist 3 times instead of 3 × layers times.

The B half of every output head starts at zero, so the first generated deltas ``s·BA`` are
exactly zero (the model starts as the base model), while A starts random so gradients reach
B. A third, ``linear`` (the world's default until issue 24; its size is Σ out·r·D, so for small
models), standardises the embedding, makes B linear in it (zero at init) and A one learned
matrix per target shared by all documents: a document's delta is then linear in the mean of
its words, which generalises to unseen documents. The standardisation is per dimension, with
the training documents' mean and standard deviation (``standardize``): documents share most
of their words, so their embeddings differ in a small part of their norm, which this makes
the whole input (the world's translator learned in one epoch what took it two with a
LayerNorm, and better: bench/RESULTS.md). A ``linear`` translator saved with a LayerNorm'd
input, before the standardisation, is refused with its fix. The generated
LoRA carries the bank's alpha and rank, hence the same scaling as the teacher (DyPRAG's
reference code drops the scaling from generated deltas; we do not).

``attention`` (the world's default) reads the passage token by token (``token_list``: the
base model's input embeddings of its first tokens) rather than their mean, in which a birth
year is one word among forty and a hundred years look alike. Learned queries sort the tokens
into slots as slot attention does (each token shares itself among the queries by a softmax
over them; a slot is the weighted mean of its tokens), the slots are normalised per feature
across documents (batch normalisation: what every bio's slot shares is subtracted), and B is
linear in them, A shared as in ``linear``. A softmax over the tokens instead (each query
picking tokens) read some facts perfectly and others not at all, by chance of which the
queries found; with LayerNorm'd slots the birth year was learned in some fits and not at all
in others: bench/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dyprag.config import TranslatorConfig, choices
from dyprag.engine.lora import Key, LoRA
from dyprag.engine.lora_io import atomic_save_tensors
from dyprag.engine.models import MODULES
from dyprag.files import atomic_write_json, read_meta, read_safetensors

ARCHITECTURES = choices(TranslatorConfig, "architecture")
TOKEN_ARCHITECTURES = ("attention",)  # read token lists (``embedding: token_list``)


def _head(hidden: int, rank: int, in_features: int, out_features: int) -> nn.Linear:
    """``hidden → r·in + out·r``, with the B part zeroed (ΔW = 0 at initialisation)."""
    head = nn.Linear(hidden, rank * (in_features + out_features))
    with torch.no_grad():
        head.weight[rank * in_features:].zero_()
        head.bias.zero_()
    return head


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer


class ParameterTranslator(nn.Module):
    """Embeddings ``(N, embed_dim)`` → a batched LoRA for every target in ``shapes``.

    ``shapes``: ``{(layer, module): (in_features, out_features)}``, e.g.
    ``inject_lora(model).shapes``. ``alpha`` and ``rank`` should be the bank's.
    """

    def __init__(self, shapes: Mapping[Key, tuple[int, int]], embed_dim: int, rank: int,
                 alpha: float, architecture: str, hidden: int = TranslatorConfig.hidden,
                 target_embed_dim: int = TranslatorConfig.target_embed_dim,
                 bottleneck: int = TranslatorConfig.bottleneck,
                 token_dim: int = 0, queries: int = TranslatorConfig.queries):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if rank < 1 or embed_dim < 1 or hidden < 1:
            raise ValueError(f"rank, embed_dim and hidden must be ≥ 1, got {rank}, "
                             f"{embed_dim}, {hidden}")
        self.shapes = dict(shapes)
        self.keys = sorted(self.shapes, key=lambda k: (k[0], MODULES.index(k[1])))
        self.embed_dim, self.rank, self.alpha = embed_dim, rank, float(alpha)
        self.architecture, self.hidden = architecture, hidden
        self.target_embed_dim = target_embed_dim
        if bottleneck < 0:
            raise ValueError(f"bottleneck must be ≥ 0, got {bottleneck}")
        reads_tokens = architecture in TOKEN_ARCHITECTURES
        self.bottleneck = bottleneck if architecture == "linear" or reads_tokens else 0
        self.token_dim = token_dim if reads_tokens else 0
        self.queries = queries if reads_tokens else 0
        if reads_tokens and (token_dim < 1 or embed_dim % token_dim or queries < 1):
            raise ValueError(f"the {architecture} translator reads (N, T·token_dim) token lists "
                             f"with ≥ 1 queries; got embed_dim {embed_dim}, token_dim "
                             f"{token_dim}, queries {queries}")
        if reads_tokens:
            self.token_norm = nn.LayerNorm(token_dim, elementwise_affine=False)
        if architecture == "attention":
            # Learned queries sort the passage's tokens into slots (``pool``); B is linear in
            # the slots, through the bottleneck when there is one.
            g = torch.Generator().manual_seed(1)
            self.query = nn.Parameter(torch.randn(queries, token_dim, generator=g)
                                      * token_dim ** -0.5)
            self.key = nn.Linear(token_dim, token_dim, bias=False)
            # Slots normalised per feature across documents (batch statistics in training,
            # their running averages after), as ``linear`` standardises its input: what every
            # bio's slot shares (template words) is subtracted, what tells bios apart is scaled
            # up to the whole input.
            self.slot_norm = nn.BatchNorm1d(queries * token_dim, affine=False)
        if architecture == "linear" or reads_tokens:
            # Per target: B linear in the embedding (zero at init), A one learned matrix. With a
            # bottleneck, every target reads one shared projection of the embedding to that
            # width (still linear in it): Σ out·r·bottleneck weights instead of Σ out·r·D.
            g = torch.Generator().manual_seed(0)
            pooled = queries * token_dim if reads_tokens else embed_dim
            if self.bottleneck:
                self.project = nn.Linear(pooled, self.bottleneck)
            width = self.bottleneck or pooled
            self.b_maps = nn.ModuleDict({f"{layer}_{module}": _zero_linear(
                width, rank * self.shapes[(layer, module)][1]) for layer, module in self.keys})
            # Embeddings standardised first (a token-mean embedding's entries are tiny: a
            # linear map of them would need huge weights, which Adam grows slowly).
            if architecture == "linear":  # set by ``standardize``
                self.register_buffer("in_mean", torch.zeros(embed_dim))
                self.register_buffer("in_std", torch.ones(embed_dim))
            self.a = nn.ParameterDict({f"{layer}_{module}": nn.Parameter(
                torch.randn(rank, self.shapes[(layer, module)][0], generator=g)
                * self.shapes[(layer, module)][0] ** -0.5) for layer, module in self.keys})
        elif architecture == "per_layer":
            self.mlps = nn.ModuleDict({
                f"{layer}_{module}": nn.Sequential(
                    nn.Linear(embed_dim, hidden), nn.ReLU(),
                    _head(hidden, rank, *self.shapes[(layer, module)]))
                for layer, module in self.keys})
        else:
            modules = sorted({m for _, m in self.keys}, key=MODULES.index)
            for m in modules:
                sizes = {self.shapes[k] for k in self.keys if k[1] == m}
                if len(sizes) > 1:
                    raise ValueError(f"the shared translator needs one shape per module type; "
                                     f"{m} has {sorted(sizes)}")
            layers = sorted({layer for layer, _ in self.keys})
            self.layer_index = {layer: i for i, layer in enumerate(layers)}
            self.module_index = {m: i for i, m in enumerate(modules)}
            self.layer_embed = nn.Embedding(len(layers), target_embed_dim)
            self.module_embed = nn.Embedding(len(modules), target_embed_dim)
            self.trunk = nn.Sequential(nn.Linear(embed_dim + 2 * target_embed_dim, hidden),
                                       nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
            self.heads = nn.ModuleDict({
                m: _head(hidden, rank, *next(self.shapes[k] for k in self.keys if k[1] == m))
                for m in modules})

    def forward(self, emb: Tensor) -> LoRA:
        if emb.dim() != 2 or emb.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be (N, {self.embed_dim}), got {tuple(emb.shape)}")
        n, r = emb.shape[0], self.rank
        A, B = {}, {}
        if self.architecture in TOKEN_ARCHITECTURES:
            emb = self.pool(emb)
        elif self.architecture == "linear":
            emb = (emb - self.in_mean) / self.in_std
        if self.architecture == "linear" or self.architecture in TOKEN_ARCHITECTURES:
            if self.bottleneck:
                emb = self.project(emb)
            for key in self.keys:
                name = f"{key[0]}_{key[1]}"
                A[key] = self.a[name].expand(n, -1, -1)  # (N, r, in), shared by every document
                B[key] = self.b_maps[name](emb).view(n, self.shapes[key][1], r)  # (N, out, r)
            return LoRA(A, B, self.alpha)
        if self.architecture == "per_layer":
            outputs = {k: self.mlps[f"{k[0]}_{k[1]}"](emb) for k in self.keys}
        else:
            outputs = self._shared(emb)
        for key in self.keys:
            i, o = self.shapes[key]
            flat = outputs[key]  # (N, r·in + o·r)
            A[key] = flat[:, :r * i].view(n, r, i)
            B[key] = flat[:, r * i:].view(n, o, r)
        return LoRA(A, B, self.alpha)

    def pool(self, emb: Tensor) -> Tensor:
        """``attention``: token lists ``(N, T·token_dim)`` (all-zero rows are padding) → one
        slot per query, each the weighted mean of the LayerNorm'd tokens assigned to it,
        concatenated and batch-normalised, ``(N, queries·token_dim)``. A batch of one row
        in training is normalised with the running statistics."""
        n, h = emb.shape[0], self.token_dim
        tokens = emb.view(n, -1, h)
        real = tokens.abs().sum(-1) > 0  # (N, T)
        if not bool(real.any(1).all()):
            raise ValueError("a document's token list is empty (every row zero)")
        tokens = self.token_norm(tokens)
        scores = torch.einsum("qh,nth->nqt", self.query, self.key(tokens))
        # Slot attention's competition: each token shares itself among the queries (softmax
        # over them), so every token lands in some slot; a slot is the weighted mean of its
        # tokens. (A softmax over the tokens instead let several queries pick one fact and
        # none another: a fact was read perfectly or not at all, which one by chance.)
        weights = scores.softmax(1) * real[:, None]  # (N, Q, T)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
        slots = (weights @ tokens).flatten(1)  # (N, Q·H)
        norm = self.slot_norm
        return nn.functional.batch_norm(slots, norm.running_mean, norm.running_var,
                                        training=self.training and n > 1,
                                        momentum=norm.momentum, eps=norm.eps)

    @torch.no_grad()
    def standardize(self, embeddings: Tensor) -> None:
        """Set the ``linear`` translator's input statistics from its training documents'
        embeddings ``(N, D)``: per dimension, their mean and standard deviation."""
        if self.architecture != "linear":
            return
        self.in_mean.copy_(embeddings.mean(0))
        self.in_std.copy_(embeddings.std(0).clamp_min(1e-8) if len(embeddings) > 1
                          else torch.ones_like(self.in_std))

    def _shared(self, emb: Tensor) -> dict[Key, Tensor]:
        """Every target's trunk features in one batch, then each module type's head."""
        n = emb.shape[0]
        layers = torch.tensor([self.layer_index[k[0]] for k in self.keys], device=emb.device)
        modules = torch.tensor([self.module_index[k[1]] for k in self.keys], device=emb.device)
        targets = torch.cat([self.layer_embed(layers), self.module_embed(modules)], -1)  # (K, 2E)
        x = torch.cat([emb.unsqueeze(1).expand(n, len(self.keys), -1),
                       targets.unsqueeze(0).expand(n, -1, -1)], -1)  # (N, K, D + 2E)
        features = self.trunk(x)  # (N, K, H)
        return {key: self.heads[key[1]](features[:, t]) for t, key in enumerate(self.keys)}

    def config(self) -> dict:
        """Everything needed to rebuild this module (for checkpoints' meta.json)."""
        return {"architecture": self.architecture, "embed_dim": self.embed_dim,
                "rank": self.rank, "alpha": self.alpha, "hidden": self.hidden,
                "target_embed_dim": self.target_embed_dim,
                "input_norm": "standard",  # marks a save made since the standardisation
                "bottleneck": self.bottleneck, "token_dim": self.token_dim,
                "queries": self.queries,
                "shapes": {f"{k[0]}.{k[1]}": list(v) for k, v in self.shapes.items()}}


# ---- checkpoints ----------------------------------------------------------------------------------
FORMAT = "dyprag-translator"


def save_translator(translator: ParameterTranslator, path: str | Path,
                    meta: Mapping[str, Any] | None = None) -> Path:
    """``path/translator.safetensors`` + ``path/meta.json`` (rebuild config, base model id,
    embedder, ...), both written atomically, meta last."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(translator.state_dict(), out / "translator.safetensors")
    atomic_write_json(out / "meta.json", {**(meta or {}), "format": FORMAT,
                                          "translator": translator.config()})
    return out


def load_translator(path: str | Path, base_model: str | None = None,
                    shapes: Mapping[Key, tuple[int, int]] | None = None,
                    device: str | torch.device = "cpu") -> tuple[ParameterTranslator, dict]:
    """Rebuild a saved translator; refuse one made for another base model id or shape."""
    src = Path(path)
    if not (src / "meta.json").is_file():
        raise FileNotFoundError(f"{src} holds no translator checkpoint (no meta.json)")
    meta = read_meta(src, FORMAT, "translator", base_model)
    config = dict(meta["translator"])
    # Saved before standardisation (no "input_norm" then), a linear translator read a LayerNorm'd input.
    if config.pop("input_norm", "layer") != "standard" and config["architecture"] == "linear":
        raise ValueError(f"translator {src} was saved by an older dyprag (a LayerNorm'd input); "
                         "make it again: python train.py ... --rebuild translator")
    saved = {tuple((int(k.split(".")[0]), k.split(".")[1])): tuple(v)
             for k, v in config.pop("shapes").items()}
    if shapes is not None and dict(shapes) != saved:
        diff = next(k for k in sorted(set(saved) | set(shapes), key=lambda k: (k[0], MODULES.index(k[1])))
                    if saved.get(k) != shapes.get(k))
        raise ValueError(f"translator {src} was trained for a model whose layer {diff[0]} "
                         f"{diff[1]} is (in, out) {saved.get(diff)}; this model has "
                         f"{shapes.get(diff)}")
    translator = ParameterTranslator(saved, **config)
    translator.load_state_dict(read_safetensors(src / "translator.safetensors", str(device)))
    return translator.to(device).eval(), meta  # for answering: running statistics, no dropout
