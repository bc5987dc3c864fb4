"""Baselines on the synthetic world's held-out test entities, from a clean checkpoints/.

    python bench/world_baselines.py                       # default world, default retriever
    python bench/world_baselines.py --out /tmp/world-bench --retriever bm25

Stages (each cached under --out, like train.py's): generate the world, pretrain the tiny
base model (timed), index the corpus, augment the documents (templates) and train the LoRA
bank of every document retrieved for a test question, then answer every test question:

- ``vanilla``: closed book; the base model never saw these entities, so this is chance;
- ``rag@k``: the top-k retrieved passages in the prompt;
- ``prag@k``: no passage in the prompt; the sum of the top-k documents' bank LoRAs injected;
- ``prag+rag@3``: both.

Prints one JSON object as its last line: ``recall@1``, ``recall@3`` (the entity's bio among
the top k), ``f1`` (keyed by mode), ``em`` (likewise) and ``pretrain_seconds``.
Targets: recall@3 ≥ 0.95, rag@3 F1 ≥ 0.90, vanilla F1 ≤ 0.15, pretraining ≤ 600 s on
2 CPU cores; prag@1 ≥ 0.80, prag+rag@3 ≥ rag@3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dyprag.augment import TemplateAugmenter, augment_corpus, read_augmented
from dyprag.bank import WORLD_BANK, LoRABank, build_bank
from dyprag.corpus import iter_corpus
from dyprag.files import read_json
from dyprag.metrics import score
from dyprag.models import load_model
from dyprag.pretrain import pretrain_base
from dyprag.prompts import generate_answers, qa_prompt
from dyprag.qa import load_qa
from dyprag.retrieval import build_retriever
from dyprag.world import generate_world, load_schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/world.yaml")
    parser.add_argument("--out", default="checkpoints/world-bench")
    parser.add_argument("--retriever", default="dense", choices=["dense", "bm25", "hybrid"])
    parser.add_argument("--limit", type=int, default=None, help="test questions (default all)")
    args = parser.parse_args()
    out = Path(args.out)

    world = generate_world(load_schema(args.config), out / "world")
    start = time.perf_counter()
    base = pretrain_base(world, out / "base")
    print(f"base model ready in {time.perf_counter() - start:.0f}s (cached runs take ~0s)")
    pretrain_seconds = read_json(base / "pretrain.json")["seconds"]
    retriever = build_retriever(world / "corpus.jsonl", out / f"index-{args.retriever}",
                                method=args.retriever)
    model, tokenizer = load_model(base)

    test = load_qa(world / "qa_test.jsonl", limit=args.limit)
    bios = {p.id: p.text for p in iter_corpus(world / "corpus.jsonl")}
    questions = [qa.question for qa in test]
    hits = retriever.retrieve(questions, k=3)  # per question: [(doc id, score)] best first
    recall = {k: sum(qa.meta["doc_id"] in [d for d, _ in h[:k]] for qa, h in zip(test, hits))
              / len(test) for k in (1, 3)}
    print(f"retrieval ({args.retriever}) over {len(bios)} bios: recall@1 {recall[1]:.3f}, "
          f"recall@3 {recall[3]:.3f}")

    augmented = world / "augmented.jsonl"
    augment_corpus(iter_corpus(world / "corpus.jsonl"), TemplateAugmenter(world), augmented)
    needed = {d for h in hits for d, _ in h}
    start = time.perf_counter()
    bank_dir = build_bank(model, tokenizer, [r for r in read_augmented(augmented)
                                             if r.doc_id in needed],
                          out / "bank", WORLD_BANK, base_model=str(base))
    bank = LoRABank(bank_dir, base_model=str(base))
    print(f"bank of {len(bank)} documents ready in {time.perf_counter() - start:.0f}s")

    golds = [qa.answers for qa in test]
    results = {}
    modes = (("vanilla", 0, 0), ("rag@1", 1, 0), ("rag@3", 3, 0), ("prag@1", 0, 1),
             ("prag@3", 0, 3), ("prag+rag@3", 3, 3))
    for mode, k, k_lora in modes:
        prompts = [qa_prompt(q, [bios[d] for d, _ in h[:k]]) for q, h in zip(questions, hits)]
        lora = bank.combined([[d for d, _ in h[:k_lora]] for h in hits]) if k_lora else None
        start = time.perf_counter()
        results[mode] = score(generate_answers(model, tokenizer, prompts, lora=lora), golds)
        print(f"{mode:8s} EM {results[mode]['em']:.3f}  F1 {results[mode]['f1']:.3f}  "
              f"({len(prompts)} questions, {time.perf_counter() - start:.1f}s)")
    print(json.dumps({"recall@1": round(recall[1], 4), "recall@3": round(recall[3], 4),
                      "f1": {m: round(r["f1"], 4) for m, r in results.items()},
                      "em": {m: round(r["em"], 4) for m, r in results.items()},
                      "pretrain_seconds": pretrain_seconds,
                      "bank_seconds": read_json(bank_dir / "meta.json")["train_seconds"]}))


if __name__ == "__main__":
    main()
