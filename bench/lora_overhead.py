"""Cost of LoRA injection, measured side by side in one run.

    python bench/lora_overhead.py              # CPU, the shapes below
    python bench/lora_overhead.py --device cuda --dtype bf16

Model: a random Llama of a realistic small shape (hidden 512, 8 layers, intermediate 1408,
vocab 32000). Two ratios:

- ``per_sample_overhead``: forward of a batch where every row has its own rank-6 LoRA
  (3 documents × r=2, combined as the sum of deltas) over the base model's forward.
  Target ≤ 1.10.
- ``batched_vs_merge_loop``: 32 prompts of 64 tokens, each with its own LoRA, 32 new tokens
  greedy: a loop of merge → generate → unmerge per prompt over one batched ``generate`` with
  per-sample LoRAs. Target ≥ 5. The two must produce the same tokens; the output head is
  scaled so that greedy decoding has no near-ties.

The last line printed is one JSON object with exactly those two keys.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, combine
from dyprag.engine.models import resolve_dtype


def build_model(args) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked logits: greedy decoding is decided by a wide margin
        model.lm_head.weight.mul_(args.head_scale)
    return model.to(args.device, resolve_dtype(args.dtype))


def doc_loras(shapes, n: int, args, seed: int) -> LoRA:
    """n questions × 3 documents × r=2, combined per question → rank 6."""
    g = torch.Generator().manual_seed(seed)
    docs = [LoRA.random(shapes, rank=2, alpha=4.0, batch_size=n, std=args.lora_std, generator=g)
            for _ in range(3)]
    return combine(docs).to(args.device, resolve_dtype(args.dtype))


def timed(fn, device: str):
    """(seconds, fn's result), synchronising the GPU around the call."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def per_sample_overhead(model, base, args) -> float:
    injection = inject_lora(model)
    loras = doc_loras(injection.shapes, args.batch, args, seed=1)
    ids = torch.randint(3, 32000, (args.batch, args.seq), device=args.device)

    def with_lora():
        with injection.use(loras):
            model(ids)

    with torch.inference_mode():
        for _ in range(2):  # warm-up
            base(ids), with_lora()
        ratios = []
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            t_base, _ = timed(lambda: base(ids), args.device)
            t_lora, _ = timed(with_lora, args.device)
            ratios.append(t_lora / t_base)
    print(f"forward {args.batch}×{args.seq}: per-sample rank-6 LoRA / base = "
          f"median {statistics.median(ratios):.3f} over {args.repeats} pairs")
    return statistics.median(ratios)


def batched_vs_merge_loop(model, args) -> float:
    injection = inject_lora(model)
    n = args.prompts
    loras = doc_loras(injection.shapes, n, args, seed=2)
    ids = torch.randint(3, 32000, (n, args.prompt_len), device=args.device,
                        generator=torch.Generator(device=args.device).manual_seed(3))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0)

    def batched():
        with injection.use(loras):
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    def loop():
        out = []
        for b in range(n):
            with injection.merged(loras[b]):
                out.append(model.generate(ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]),
                                          **kwargs)[0])
        return torch.stack(out)

    with torch.inference_mode():
        batched(), loop()  # warm-up
        t_batched, out_batched = timed(batched, args.device)
        t_loop, out_loop = timed(loop, args.device)
    same = torch.equal(out_batched, out_loop)
    distinct = len({tuple(r.tolist()) for r in out_batched[:, args.prompt_len:]})
    print(f"generate {n} prompts × {args.new_tokens} tokens: batched {t_batched:.2f}s, "
          f"merge loop {t_loop:.2f}s, identical outputs: {same}, distinct answers: {distinct}")
    if not same:
        raise SystemExit("batched per-sample generation differs from the merge loop")
    return t_loop / t_batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=4, help="rows of the forward benchmark")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--head-scale", type=float, default=50.0)
    parser.add_argument("--lora-std", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, "
          f"threads {torch.get_num_threads()}")

    model = build_model(args)
    base = copy.deepcopy(model)  # never injected: the true base forward
    overhead = per_sample_overhead(model, base, args)
    del base
    speedup = batched_vs_merge_loop(model, args)
    print(json.dumps({"per_sample_overhead": round(overhead, 4),
                      "batched_vs_merge_loop": round(speedup, 2)}))


if __name__ == "__main__":
    main()
