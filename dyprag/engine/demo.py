"""A one-minute demo of the LoRA engine: knowledge that lives only in per-document LoRAs.

    python -m dyprag.engine.demo     # CPU, seconds

1. Build a tiny random Llama over a word vocabulary (nothing is downloaded).
2. Train one rank-4 FFN LoRA per document, all documents in one batch: row b of every
   forward uses LoRA b (per-sample mode), the base model stays frozen.
3. Complete each document's prompt without a LoRA, with its own LoRA and with another
   document's LoRA, in one batched ``generate`` per condition.
4. Check the engine's contracts on the way: batched generation equals one-at-a-time
   generation, and merge → unmerge restores the weights bit-exactly.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA

DOCUMENTS = [
    ("Velmora was founded by", "Idris Kael in 1712 ."),
    ("Quennet Bay exports", "blue salt and amber ."),
    ("The Oskari Prize went to", "Tamsin Reole in 1988 ."),
    ("The river of Dunmarrow is", "the Silt , 40 km long ."),
]


class WordCodec:
    """Whitespace-separated words ↔ ids; id 0 pads."""

    def __init__(self, texts: list[str]):
        self.words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 1 for i, w in enumerate(self.words)}

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i - 1] if 0 < i <= len(self.words) else "<pad>" for i in ids)


def build_model(vocab_size: int, seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    # After the final norm a random head's logits span only about ±2, which caps how
    # confident any FFN LoRA can make the model; a wider head lets the loss go to ~0.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as ``generate`` computes them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def train_document_loras(model, ids: torch.Tensor, prompt_len: int, steps: int,
                         rank: int, lr: float, seed: int) -> LoRA:
    """One LoRA per row of ``ids`` (N, T), trained together; loss on the answer tokens."""
    injection = inject_lora(model)
    g = torch.Generator().manual_seed(seed)
    n = ids.shape[0]
    # PRAG's init: A random, B zero, so every LoRA starts as the base model.
    lora = LoRA.zeros(injection.shapes, rank, alpha=4.0 * rank, batch_size=n)
    lora = LoRA({k: a.normal_(0, 0.05, generator=g) for k, a in lora.A.items()}, lora.B,
                lora.alpha).map(lambda t: t.requires_grad_(True))
    params = [t for _, a, b in lora.items() for t in (a, b)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    mask = (ids != 0).long()
    mask[:, prompt_len:] = 1
    for step in range(steps):
        with injection.use(lora):
            logits = model(ids, attention_mask=mask, position_ids=positions(mask)).logits[:, :-1]
        # Summed over rows, so each LoRA gets exactly its own document's gradient.
        # (Every row has the same number of answer tokens, so this is a sum of row means.)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum") / (ids.shape[1] - prompt_len)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss per document {loss.item() / n:.3f}")
    return lora.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    codec = WordCodec([p + " " + a for p, a in DOCUMENTS])
    width = max(len(codec.encode(p)) for p, _ in DOCUMENTS)
    answer_len = max(len(codec.encode(a)) for _, a in DOCUMENTS)
    # Right-align prompts with padding so one batch holds every document.
    rows = []
    for prompt, answer in DOCUMENTS:
        p, a = codec.encode(prompt), codec.encode(answer)
        rows.append([0] * (width - len(p)) + p + a + [codec.ids["."]] * (answer_len - len(a)))
    ids = torch.tensor(rows)  # (N, width + answer_len)
    model = build_model(len(codec.words) + 1, args.seed)
    injection = inject_lora(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: random Llama, {n_params / 1e6:.2f}M params, frozen; "
          f"{len(injection.targets)} FFN projections hooked")

    print(f"training {len(DOCUMENTS)} document LoRAs (rank {args.rank}) in one batch:")
    start = time.perf_counter()
    loras = train_document_loras(model, ids, width, args.steps, args.rank, args.lr, args.seed)
    print(f"  {time.perf_counter() - start:.1f}s")

    prompts = ids[:, :width]
    attention = (prompts != 0).long()

    def complete(lora: LoRA | None, rows: torch.Tensor = prompts, mask=attention) -> list[str]:
        with torch.no_grad(), injection.use(lora):
            out = model.generate(rows, attention_mask=mask, max_new_tokens=answer_len,
                                 min_new_tokens=answer_len, do_sample=False, pad_token_id=0)
        return [codec.decode(r[width:].tolist()) for r in out]

    shifted = LoRA.stack([loras[(b + 1) % len(DOCUMENTS)] for b in range(len(DOCUMENTS))])
    table = {"no LoRA": complete(None), "own LoRA": complete(loras),
             "next doc's LoRA": complete(shifted)}
    hits = 0
    for b, (prompt, answer) in enumerate(DOCUMENTS):
        print(f"\n{prompt!r}  (truth: {answer!r})")
        for name, answers in table.items():
            print(f"  {name:16s} → {answers[b]!r}")
        hits += table["own LoRA"][b].startswith(answer)
    print(f"\nown-LoRA completions exactly right: {hits}/{len(DOCUMENTS)}")

    alone = [complete(loras[b], prompts[b:b + 1], attention[b:b + 1])[0]
             for b in range(len(DOCUMENTS))]
    print(f"batched per-sample generate == one at a time: {alone == table['own LoRA']}")
    before = [t.linear.weight.detach().clone() for t in injection.targets.values()]
    with injection.merged(loras[0]):
        merged = complete(None, prompts[:1], attention[:1])[0]
    exact = all(torch.equal(t.linear.weight, w) for t, w in zip(injection.targets.values(), before))
    print(f"merged LoRA 0 answers {merged!r}; unmerge restored weights bit-exactly: {exact}")


if __name__ == "__main__":
    main()
