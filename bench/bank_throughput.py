"""Bank training throughput: our batched per-document LoRAs vs. a PRAG-style loop, one run.

    python bench/bank_throughput.py                       # CPU, 64 documents
    python bench/bank_throughput.py --device cuda --dtype bf16 --model qwen2-0.5b --docs 256

Both train one FFN LoRA (gate/up/down, r=2, alpha=32, AdamW lr 3e-4) per document with
PRAG's recipe (5 examples per document: 2 QA × {passage, rewrite} + 1 closed-book, 1 epoch,
so 5 optimizer steps per document) on the same random model and the same documents:

- ``batched``: ``dyprag.training.bank.build_bank``, ``--docs-per-step`` documents per forward;
- ``sequential``: PEFT's LoRA, one document at a time, batch 1, as PRAG trains (without its
  padding of every example to 3,000 tokens, which would only slow it further).

Documents are the synthetic world's bios with template augmentation. Prints the documents
per second of each, and as its last line one JSON object: ``speedup`` (batched over
sequential docs/s), ``loss_batched`` and ``loss_sequential`` (mean final-epoch training loss
per document; equal recipes should give about equal losses). Target: speedup ≥ 10 on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from dyprag.config import BankConfig, load_config
from dyprag.data.augment import TemplateAugmenter
from dyprag.data.corpus import iter_corpus
from dyprag.data.world import generate_world, load_schema
from dyprag.engine.models import resolve_dtype
from dyprag.files import read_json
from dyprag.training.bank import bank_recipe, build_bank, row_losses
from dyprag.training.examples import collate, document_examples
from dyprag.training.world_base import build_tokenizer

PAPER = Path(__file__).resolve().parents[1] / "configs" / "base" / "paper.yaml"
SHAPES = {  # random models; vocab comes from the world's word-level tokenizer
    # the synthetic world's base model (dyprag.training.world_base defaults): what CPU banks are built for
    "world": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2),
}


def build(args, tokenizer) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cls, model_cls = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
                      if args.model.startswith("qwen2") else
                      (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    config = cls(vocab_size=len(tokenizer), max_position_embeddings=1024,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=tokenizer.bos_token_id, **SHAPES[args.model])
    return model_cls(config).eval().to(args.device, resolve_dtype(args.dtype))


def sequential_peft(model, tokenizer, examples, config: BankConfig, device: str) -> list[float]:
    """PRAG's loop: per document a fresh PEFT LoRA, batch 1, one step per example."""
    import peft

    lora_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                  target_modules=["gate_proj", "up_proj", "down_proj"])
    wrapped = peft.get_peft_model(model, lora_config)
    initial = {k: v.detach().clone() for k, v in wrapped.named_parameters() if v.requires_grad}
    losses = []
    for doc_examples in examples:
        with torch.no_grad():  # every document starts from the same init, as in PRAG
            for name, p in wrapped.named_parameters():
                if p.requires_grad:
                    p.copy_(initial[name])
        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        total = 0.0
        for example in doc_examples:
            batch = {k: v.to(device) for k, v in collate(tokenizer, [example]).items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                loss = row_losses(wrapped, batch).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        losses.append(total / len(doc_examples))
    wrapped.unload()
    return losses


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark on ``argv`` (the command line's when None); prints and returns its
    result."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--docs-per-step", type=int, default=64)
    parser.add_argument("--model", default="world", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and args.dtype != "fp32":
        args.dtype = "fp32"  # weights stay fp32; both sides run under bf16 autocast on GPU

    with tempfile.TemporaryDirectory() as tmp:
        schema = load_schema("configs/world.yaml")
        schema["splits"] = {"pretrain": 0, "train": args.docs, "test": 0}
        world = generate_world(schema, Path(tmp) / "world")
        passages = list(iter_corpus(world / "corpus.jsonl"))
        docs = TemplateAugmenter(world).augment(passages)
        tokenizer = build_tokenizer([p.text for p in passages]
                                    + [r for d in docs for r in d.rewrites]
                                    + [q["question"] for d in docs for q in d.qa]
                                    + ["Passage: Question: Answer:"])
        model = build(args, tokenizer)
        # PRAG's recipe (configs/base/paper.yaml), many documents per step.
        config = dataclasses.replace(load_config(PAPER, complete=False).bank,
                                     docs_per_step=args.docs_per_step, shard_size=max(args.docs, 1))
        examples = [document_examples(d, bank_recipe(config), tokenizer) for d in docs]
        tokens = statistics.mean(len(tokenizer(t)["input_ids"])
                                 for ex in examples for seg in ex for t, _ in seg[:1])
        print(f"{len(docs)} documents × {len(examples[0])} examples (~{tokens:.0f} prompt "
              f"tokens), random {args.model} model on {args.device}")

        start = time.perf_counter()
        out = build_bank(model, tokenizer, docs, Path(tmp) / "bank", config, progress=False)
        batched_s = time.perf_counter() - start
        loss_batched = read_json(out / "meta.json")["mean_final_loss"]
        print(f"batched   : {len(docs) / batched_s:8.2f} docs/s ({batched_s:.1f}s), "
              f"mean final loss {loss_batched:.4f}")

        start = time.perf_counter()
        losses = sequential_peft(model, tokenizer, examples, config, args.device)
        sequential_s = time.perf_counter() - start
        loss_sequential = statistics.mean(losses)
        print(f"sequential: {len(docs) / sequential_s:8.2f} docs/s ({sequential_s:.1f}s), "
              f"mean final loss {loss_sequential:.4f}")
    result = {"speedup": round(sequential_s / batched_s, 2), "loss_batched": round(loss_batched, 4),
              "loss_sequential": round(loss_sequential, 4)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
