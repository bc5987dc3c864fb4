"""Per-question latency of every RAG mode, measured side by side in one run.

    python bench/latency.py                       # CPU, the shapes below
    python bench/latency.py --device cuda --dtype bf16

Model: bench/lora_overhead.py's random Llama (hidden 512, 8 layers, intermediate 1408, vocab
32000). A question is 16 tokens; each of its k = 3 documents ~130 tokens (~100 words); 32
new tokens, greedy, always 32. Modes, one question at a time, knowledge injected per sample
as ``dyprag.engine.generate.generate_answers`` does:

- ``vanilla``: the question alone, no knowledge (the floor of every mode without passages);
- ``rag``: the 3 passages in the prompt (~400 tokens);
- ``prag``: the sum of 3 stored bank LoRAs (rank 2 each) injected, the question alone;
- ``dyprag``: the translator (DyPRAG's per-layer MLPs, 384-d document embeddings) makes the
  3 LoRAs, summed and injected, then the question alone;
- ``dyprag+rag``: both.

Keys (the last line is one JSON object): ``latency_s`` by mode (median), ``dyprag_over_rag``
(target ≤ 0.70), ``vanilla_over_rag`` (its floor on this model and device),
``inject_over_decode_step`` (translate + combine + inject of one question
over one decoding step; target ≤ 1.0), ``batched_speedup`` (32 questions with their own
DyPRAG LoRAs: one at a time over one batched ``generate`` with per-sample injection; target
≥ 5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_overhead import build_model, timed

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA, sum_groups
from dyprag.engine.models import resolve_dtype
from dyprag.training.translator import ParameterTranslator

NEW_TOKENS, QUESTION, PASSAGE, K = 32, 16, 130, 3


def generate(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--head-scale", type=float, default=8.0)
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype)
    model = build_model(args)
    injection = inject_lora(model)
    torch.manual_seed(1)
    translator = ParameterTranslator(injection.shapes, 384, rank=2, alpha=32.0,
                                     architecture="per_layer").to(args.device, dtype)
    with torch.no_grad():  # nonzero B heads: the generated LoRAs are real work, not zeros
        for p in translator.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    g = torch.Generator().manual_seed(2)
    question = torch.randint(3, 32000, (1, QUESTION), generator=g).to(args.device)
    passages = torch.randint(3, 32000, (1, K * PASSAGE), generator=g).to(args.device)
    with_passages = torch.cat([passages, question], 1)
    doc_emb = torch.randn(K, 384, generator=g).to(args.device, dtype)
    bank = LoRA.random(injection.shapes, rank=2, alpha=32.0, batch_size=K, std=0.01,
                       generator=g).to(args.device, dtype)

    def translate() -> LoRA:  # (1, K·r, in) / (1, out, K·r): one question's knowledge
        return sum_groups(translator(doc_emb), K)

    def stored() -> LoRA:
        return sum_groups(bank, K)

    def answer(ids, knowledge=None):
        if knowledge is None:
            return generate(model, ids)
        with injection.use(knowledge()):
            return generate(model, ids)

    modes = {"vanilla": lambda: answer(question), "rag": lambda: answer(with_passages),
             "prag": lambda: answer(question, stored),
             "dyprag": lambda: answer(question, translate),
             "dyprag+rag": lambda: answer(with_passages, translate)}
    latency = {m: [] for m in modes}
    with torch.inference_mode():
        for fn in modes.values():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved, so drift hits every mode alike
            for mode, fn in modes.items():
                latency[mode].append(timed(fn, args.device)[0])
        median = {m: statistics.median(ts) for m, ts in latency.items()}

        def inject_only():
            with injection.use(translate()):
                pass

        steps = [timed(lambda: generate(model, question, NEW_TOKENS), args.device)[0]
                 - timed(lambda: generate(model, question, 1), args.device)[0]
                 for _ in range(args.repeats)]
        decode_step = statistics.median(steps) / (NEW_TOKENS - 1)
        inject = statistics.median(timed(inject_only, args.device)[0] for _ in range(args.repeats))

        many = torch.randint(3, 32000, (args.batch, QUESTION), generator=g).to(args.device)
        embs = torch.randn(args.batch * K, 384, generator=g).to(args.device, dtype)

        def per_question() -> LoRA:
            return sum_groups(translator(embs), K)  # question-major: q0d0, q0d1, q0d2, q1d0, ...

        def batched():
            with injection.use(per_question()):
                return generate(model, many)

        def one_at_a_time():
            lora = per_question()
            return torch.cat([_alone(model, injection, many[i:i + 1], lora[i:i + 1])
                              for i in range(args.batch)])

        t_batched, out_batched = timed(batched, args.device)
        t_loop, out_loop = timed(one_at_a_time, args.device)
    print(f"median latency per question ({NEW_TOKENS} new tokens): "
          + ", ".join(f"{m} {t * 1000:.0f} ms" for m, t in median.items()))
    print(f"translate + inject {inject * 1000:.1f} ms, one decoding step {decode_step * 1000:.1f} ms")
    print(f"{args.batch} questions: batched {t_batched:.2f}s, one at a time {t_loop:.2f}s, "
          f"identical tokens: {torch.equal(out_batched, out_loop)}")
    print(json.dumps({
        "latency_s": {m: round(t, 4) for m, t in median.items()},
        "dyprag_over_rag": round(median["dyprag"] / median["rag"], 3),
        "vanilla_over_rag": round(median["vanilla"] / median["rag"], 3),
        "inject_over_decode_step": round(inject / decode_step, 3),
        "batched_speedup": round(t_loop / t_batched, 2)}))


def _alone(model, injection, ids: torch.Tensor, lora: LoRA) -> torch.Tensor:
    with injection.use(lora):
        return generate(model, ids)


if __name__ == "__main__":
    main()
