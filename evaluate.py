"""Evaluate a trained run: dataset × mode → EM / F1 / acc / latency, as markdown, JSON, a plot and W&B.

    python evaluate.py                                        # the latest run, its test set
    python evaluate.py --run checkpoints/world --modes vanilla rag@3 dyprag@1 dyprag+rag@3
    python evaluate.py --qa data/popqa/popQA.tsv --qa dev.json:2wqa --limit 300

Writes into ``<run>/eval/`` (or ``--out``): ``report.md`` (the grid and, with a DyPRAG mode
and questions about at least two documents, the translator's document dependence: dyprag@1
F1 with an irrelevant document and the mean cosine of the generated ΔW across documents),
``report.json`` (also F1 by mode and fact where the questions name their facts: the world's),
``predictions.jsonl`` (one line per dataset × question × mode: question, gold answers,
retrieved ids, prediction, EM, F1, acc), ``f1.png`` (F1 by mode, a bar per dataset), and logs the
grid as a table to a W&B run under the report directory (offline unless W&B is configured;
``--no-wandb`` to skip). Latency is the batched wall time per question, LoRA building and
injection included. Errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path

from dyprag.config import parse_mode
from dyprag.rundir import EMBEDDER_HELP


def datasets(args, run) -> list[tuple[str, list]]:
    from dyprag import rundir
    from dyprag.data.qa import load_qa

    if not args.qa:  # the run's own test split (--limit within it, never a training question)
        data = run.config.data
        name = "qa_test" if data.kind == "world" else Path(data.test_qa).stem
        return [(name, rundir.first(rundir.questions(run.config.data, run.path)[1], args.limit))]
    out = []
    for spec in args.qa:
        path, _, fmt = spec.partition(":")
        out.append((Path(path).stem, load_qa(path, fmt or None, args.limit)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run directory (default: the latest)")
    parser.add_argument("--embedder", metavar="NAME", help=EMBEDDER_HELP)
    parser.add_argument("--qa", action="append", default=[], metavar="FILE[:FORMAT]",
                        help="a QA file (repeatable); default: the run's test questions")
    parser.add_argument("--modes", nargs="+",
                        help="modes to answer in, e.g. vanilla rag@3 dyprag@1 (default: the "
                             "run's eval.modes; prag modes need the documents' bank LoRAs)")
    parser.add_argument("--limit", type=int, help="questions per dataset")
    parser.add_argument("--out", type=Path, help="report directory (default: <run>/eval)")
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of one line")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        for mode in args.modes or ():
            parse_mode(mode)
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from dyprag import rundir
    from dyprag.run.trained_run import TrainedRun

    path = args.run or rundir.latest_run()
    # Writing into the run (its eval/): not while train.py rewrites it, refused before the
    # model loads. Reading it: a rerun publishing meanwhile waits until the reports are out.
    writing = rundir.lock(path) if args.out is None and path.is_dir() else contextlib.nullcontext()
    with writing, rundir.reading(path):
        run = TrainedRun.open(path, embedder=args.embedder)
        args.modes = args.modes or run.config.eval.modes
        return _evaluate(args, run, args.out or run.path / rundir.REPORTS)


def _evaluate(args, run, out: Path) -> int:
    from dyprag.answering.answer import evaluate_questions, reads_translator
    from dyprag.answering.report import markdown, plot
    from dyprag.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
    from dyprag.metrics import score

    k = max(parse_mode(m)[1] for m in args.modes) or 1
    dyprag = reads_translator(args.modes)
    grid, dependence, by_fact, predictions = {}, {}, {}, []
    for name, examples in datasets(args, run):
        if not examples:
            raise ValueError(f"dataset {name} has no questions")
        retrieved = run.retrieve([qa.question for qa in examples], k)
        hits = [[d for d, _ in h] for h in retrieved]
        if dyprag:
            run.ensure_embeddings({d for h in hits for d in h})
        result = evaluate_questions(run.model, run.tokenizer, args.modes, examples, hits,
                                    run.knowledge, run.config.eval, run.fmt, run.config.run.seed,
                                    [[s for _, s in h] for h in retrieved],
                                    functools.partial(_progress, name))
        grid[name], by_fact[name], dependence[name] = result.grid, result.by_fact, result.dependence
        answers = result.predictions
        predictions += [{"dataset": name, "mode": m, "question": qa.question,
                         "answers": qa.answers, "retrieved": h, "prediction": answers[m][i],
                         **{k: v for k, v in score([answers[m][i]], [qa.answers]).items()
                            if k != "n"}}
                        for m in args.modes for i, (qa, h) in enumerate(zip(examples, hits))]
    out.mkdir(parents=True, exist_ok=True)
    dependence = {name: d for name, d in dependence.items() if d}  # ≥ 2 documents only
    by_fact = {name: by for name, by in by_fact.items() if by}  # questions that name facts
    report = markdown(grid, args.modes, dependence, by_fact)
    atomic_write_text(out / "report.md", report)
    atomic_write_json(out / "report.json", {"run": str(run.path), "modes": args.modes,
                                            "grid": grid, "document_dependence": dependence,
                                            "f1_by_fact": by_fact})
    atomic_write_jsonl(out / "predictions.jsonl", predictions)
    plot(grid, args.modes, out / "f1.png")
    if not args.no_wandb:
        from dyprag.run.loggers import log_grid

        log_grid(run.config, out, grid, args.modes, dependence)
    print(report)
    print(f"wrote {out}/report.md, report.json, predictions.jsonl, f1.png", file=sys.stderr)
    return 0


def _progress(dataset: str, step: str, scores: dict) -> None:
    if step != "document dependence":
        print(f"{dataset} {step}: F1 {scores['f1']:.3f}  acc {scores['acc']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
