"""What one training row of a real LLM costs: SmolLM2-135M-Instruct, forward + backward into
per-sample FFN LoRAs, input tokens per second, three ways side by side in one process on the
same rows (issue 23):

- ``full``: LoRAs on all 30 layers, the whole vocabulary's logits at every position, every
  layer run each step (the translator's step before ``model.lora_layers``);
- ``cached``: LoRAs on ``--layers`` (default 20-29), the frozen states entering the first
  one computed once per row (``dyprag.engine.prefix``; its cost included), logits on the answer only
  (the default recipe of configs/smollm2-world.yaml);
- ``answer_only``: as ``cached``, but the LoRA acts only where the answer is produced
  (``knowledge.inject=answer``): the prompt is the base model's, so its keys and values are
  computed once per row (cost included) and a step runs the answer's tokens alone.

    python bench/train_step.py [--rows 16] [--prompt 45] [--answer 4] [--steps 3]

Rows are random tokens of the chat prompt's length (45 tokens for a closed-book question) and
a short answer; the cost depends on the shapes alone. Prints one JSON object last:
tokens per second of each and the ratios to ``full``. The answer-only way is measured for its
cost only: training the translator that way is not built (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.engine.models import load_model
from dyprag.engine.prefix import final_hidden, logits_at, states_below


def _lora(model, layers, rows):
    shapes = inject_lora(model, layers).shapes
    return LoRA.random(shapes, 8, 32.0, batch_size=rows, std=0.01).map(
        lambda t: t.requires_grad_(True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=45)
    parser.add_argument("--answer", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per row (epochs)")
    parser.add_argument("--layers", default="20-29")
    args = parser.parse_args()
    first, last = map(int, args.layers.split("-"))
    layers = list(range(first, last + 1))
    torch.manual_seed(0)
    n, p, a = args.rows, args.prompt, args.answer
    ids = torch.randint(100, 40000, (n, p + a))
    mask = torch.ones_like(ids)
    targets = torch.full_like(ids, -100)
    targets[:, p - 1:p + a - 1] = ids[:, p:]  # position t predicts token t + 1: the answer
    at = targets != -100
    tokens = n * (p + a) * args.steps
    result = {}

    model, _ = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    lora = _lora(model, None, n)
    start = time.perf_counter()
    for _ in range(args.steps):
        with inject_lora(model).use(lora):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        F.cross_entropy(logits.transpose(1, 2), targets).backward()
    result["full"] = tokens / (time.perf_counter() - start)

    model, _ = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    lora = _lora(model, layers, n)
    start = time.perf_counter()
    states = states_below(model, ids, mask, first)
    for _ in range(args.steps):
        with inject_lora(model).use(lora):
            hidden = final_hidden(model, ids, mask, states, first)
        F.cross_entropy(logits_at(model, hidden, at), targets[at]).backward()
    result["cached"] = tokens / (time.perf_counter() - start)

    start = time.perf_counter()
    with torch.no_grad():  # the prompt but its last token, read by the base model once
        cache = model(input_ids=ids[:, :p - 1], attention_mask=mask[:, :p - 1],
                      use_cache=True).cache
    for _ in range(args.steps):
        with inject_lora(model).use(lora):
            logits = model(input_ids=ids[:, p - 1:p + a - 1], attention_mask=mask,
                           cache=cache, use_cache=True).logits.float()  # (n, a, V)
        F.cross_entropy(logits.transpose(1, 2), ids[:, p:]).backward()
        cache.crop(-a)  # drop the answer span the step appended, and its autograd history
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    result["answer_only"] = tokens / (time.perf_counter() - start)

    print(json.dumps({"rows": n, "prompt_tokens": p, "answer_tokens": a, "steps": args.steps,
                      "lora_layers": args.layers, "threads": torch.get_num_threads(),
                      "tokens_per_s": {k: round(v, 1) for k, v in result.items()},
                      "speedup": {k: round(v / result["full"], 2) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
