"""Answer questions with a trained run: retrieve, translate the documents into LoRAs, inject, generate.

    python infer.py --question "Where was Nerys Northcott born?"      # DyPRAG, the run's index.k
    python infer.py --question "..." --mode rag --k 3 --json
    python infer.py --questions-file questions.txt --mode dyprag+rag           # batched
    python infer.py --question "..." --export-peft adapter/                    # PEFT folder

Modes: vanilla (closed book), rag (the top-k passages in the prompt), prag (the sum of the
top-k documents' bank LoRAs; only documents in the run's bank), dyprag (the sum of the
translator's LoRAs of the top-k documents), prag+rag, dyprag+rag. Questions are answered in
batches, each with its own combined LoRA (per-sample injection: one batched forward per
decoding step, no merge/unmerge per question).

--k defaults to the run's index.k: 1 in the synthetic world (a question is about one
person, whose bio holds the answer), 3 in the paper configs.

--run defaults to the run under checkpoints/ whose translator was saved last. A questions file
holds one question per line, or jsonl lines with a "question" field; malformed lines are
reported and skipped. Errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dyprag.config import MODES
from dyprag.rundir import EMBEDDER_HELP

MODE_NAMES = [m for m in MODES if m != "vanilla"] + ["vanilla"]


def read_questions(path: Path) -> tuple[list[str], list[str]]:
    """(questions, problems) from a text or jsonl file; a bad line is a problem, not fatal."""
    if not path.is_file():
        raise FileNotFoundError(f"questions file {path} does not exist")
    questions, problems = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                text = json.loads(text)["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                problems.append(f"{path}:{n}: not a JSON object with a 'question' ({err})")
                continue
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{path}:{n}: 'question' must be a non-empty string")
                continue
        questions.append(text.strip())
    return questions, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    parser.add_argument("--questions-file", type=Path, help="one question per line, or jsonl")
    parser.add_argument("--run", type=Path, help="run directory (default: the latest)")
    parser.add_argument("--mode", default="dyprag", choices=MODE_NAMES)
    parser.add_argument("--embedder", metavar="NAME", help=EMBEDDER_HELP)
    parser.add_argument("--k", type=int, help="documents per question (default: the run's index.k)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--json", action="store_true", help="one JSON object per question")
    parser.add_argument("--export-peft", type=Path, metavar="DIR",
                        help="write the first question's LoRA as a PEFT adapter folder")
    parser.add_argument("--debug", action="store_true", help="a traceback instead of one line")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def utf8(text: str, what: str) -> str:
    """``text`` when it is valid UTF-8 (a non-UTF-8 argument reaches Python as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8: {raw!r} (re-encode it as UTF-8)") from None
    return text


def _run(args) -> int:
    from transformers.utils import logging as hf_logging

    from dyprag.run.trained_run import TrainedRun
    from dyprag.rundir import latest_run, reading

    hf_logging.disable_progress_bar()  # "Loading weights" bars: stderr is for errors here

    questions = [utf8(q, "--question").strip() for q in args.question]
    if any(not q for q in questions):
        raise ValueError("--question is empty")
    if args.questions_file:
        more, problems = read_questions(args.questions_file)
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        questions += more
    if not questions:
        raise ValueError("no question: pass --question or --questions-file")
    if args.k is not None and args.k < 1:
        raise ValueError(f"--k must be ≥ 1, got {args.k}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    path = args.run or latest_run()
    with reading(path):  # a rerun publishing meanwhile waits until the answers are out
        run = TrainedRun.open(path, embedder=args.embedder)
        k = args.k or run.config.index.k
        mode = args.mode if args.mode == "vanilla" else f"{args.mode}@{k}"
        hits = run.retrieve(questions, k)
        answers = run.answer(questions, hits, mode, max_new_tokens=args.max_new_tokens)
        for question, hit, reply in zip(questions, hits, answers):
            passages = [{"id": d, "score": round(s, 4), "text": run.knowledge.passages[d]}
                        for d, s in hit]
            if args.json:
                print(json.dumps({"question": question, "mode": mode, "answer": reply,
                                  "passages": passages}, ensure_ascii=False))
            else:
                print(f"Q: {question}")
                for p in passages:
                    print(f"  [{p['score']:.3f}] {p['id']}: {p['text']}")
                print(f"A ({mode}): {reply}\n")
        if args.export_peft:
            from dyprag.engine.lora_io import export_peft

            lora = run.lora(hits[0], mode)
            if lora is None:
                raise ValueError(f"mode {mode} injects no LoRA; nothing to export")
            export_peft(lora, run.model, args.export_peft, base_model_name_or_path=run.model_id)
            print(f"wrote the LoRA of {questions[0]!r} to {args.export_peft}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
