"""The GPU path in one run, sized to a lent GPU machine (≤ 8 min, no network, 64 MiB carried).

    python bench/gpu_check.py --dry-run          # the same plumbing on CPU, tiny sizes (~15 s)
    python bench/gpu_check.py --out /tmp/gc      # on a CUDA machine; exits 2 without one

The lent machine (torch, transformers, Lightning, peft; no faiss, bm25s, gguf, wandb, MiniLM)
needs bm25s's wheel (76 KB, pure Python, numpy only). Here, once: ``echo /.whl/ >>
.git/info/exclude; pip download --no-deps -d .whl bm25s==0.3.16``; then ``carry=[".whl"]``,
``timeout_s=600`` and the command::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export \
      PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 timeout 540 python3 bench/gpu_check.py --out $OUT

faiss is not needed: ``dyprag.retrieval.dense_index`` imports it only to build or read a dense index.

1. ``inject``: our hooks (``dyprag.engine.inject``) vs PEFT with the same A and B on a random Llama,
   one LoRA broadcast to every row and one LoRA per row, fp32 then bf16: max abs logit
   difference, the LoRA's own effect, ``tol`` (see FP32_RTOL below) and ``pass``.
2. ``bank``: ``bench/bank_throughput.py`` (batched bank vs. a PRAG-style PEFT loop, bf16
   autocast on GPU), its JSON: ``speedup``, ``loss_batched``, ``loss_sequential``.
3. ``world``: the default ``train.py`` job with ``index.method=bm25 wandb.mode=disabled
   train.accelerator=gpu`` from an empty run root and cache (``--dry-run``: a 30 + 12 + 6-people
   world, a 2-layer model, CPU): ``stage_seconds`` and ``f1`` by mode from its eval.json.
4. ``peak_gpu_mib``: ``torch.cuda.max_memory_allocated`` per check, and ``max`` (CPU: null);
5. ``skipped``: what could not run, each with a one-line reason.

A check that raises is recorded as ``{"error": ...}`` and the others still run; ``<out>/gpu_check.json``
is rewritten after each check (a timeout keeps it). The last line printed is one JSON object;
exit status 1 when a check failed (listed in ``failed``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dyprag is not installed on the lent machine; tests/ holds the tiny world's run config
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import bank_throughput  # noqa: E402 (in bench/)
import torch  # noqa: E402
import transformers  # noqa: E402

from dyprag.engine.inject import inject_lora  # noqa: E402
from dyprag.engine.lora import LoRA  # noqa: E402
from dyprag.files import atomic_write_json  # noqa: E402

# Pass: max |ours - PEFT| ≤ FP32_RTOL × max |logit| in fp32, ≤ BF16_FACTOR × PEFT's own bf16 error
# (max |PEFT bf16 - PEFT fp32|) in bf16; and the LoRA's effect > 2 × that (not a vacuous check).
FP32_RTOL, BF16_FACTOR = 1e-4, 1.5
MODEL = {"full": dict(bank_throughput.SHAPES["small"], vocab_size=32000),  # random Llamas
         "tiny": dict(bank_throughput.SHAPES["world"], vocab_size=256)}
DRY_RUN_MODES = "eval.modes=[vanilla,rag@1,prag@1,dyprag@1]"


def check_inject(args) -> dict:
    """Ours vs PEFT, in fp32 then bf16: one LoRA broadcast to 3 rows, and 3 LoRAs, one per row."""
    from peft_oracle import peft_twin  # tests/; imports peft, needed by this check alone

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODEL[args.size], max_position_embeddings=256, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # logits of order 10, so that a relative tolerance means something
        model.lm_head.weight.mul_(10.0)
    injection = inject_lora(model)
    g = torch.Generator().manual_seed(1)
    loras = LoRA.random(injection.shapes, rank=2, alpha=4.0, batch_size=3, std=0.05, generator=g)
    ids = torch.randint(3, config.vocab_size, (3, 32), generator=g).to(args.device)
    twins = [peft_twin(model, loras[b]) for b in range(3)]  # from the fp32 weights, then cast
    out, reference = {}, []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(args.device, dtype)
        lora = loras.to(args.device, dtype)
        diff = effect = scale = noise = 0.0
        with torch.inference_mode():
            base = model(ids).logits.float()
            with injection.use(lora):
                per_row = model(ids).logits.float()
            with injection.use(lora[0]):
                broadcast = model(ids).logits.float()
            for b, twin in enumerate(twins):
                theirs = twin.to(args.device, dtype)(ids).logits.float()
                twin.cpu()
                diff = max(diff, (per_row[b] - theirs[b]).abs().max().item(),
                           (broadcast - theirs).abs().max().item() if b == 0 else 0.0)
                effect = max(effect, (per_row[b] - base[b]).abs().max().item())
                scale = max(scale, theirs.abs().max().item())
                if dtype == torch.float32:
                    reference.append(theirs)
                else:  # PEFT's own bf16 error, against its fp32 logits
                    noise = max(noise, (theirs - reference[b]).abs().max().item())
        name = str(dtype).removeprefix("torch.")
        tol = FP32_RTOL * scale if dtype == torch.float32 else BF16_FACTOR * noise
        out[name] = {"max_abs_diff": diff, "tol": tol, "max_abs_logit": round(scale, 3),
                     "lora_effect": round(effect, 4), "pass": diff <= tol and effect > 2 * tol,
                     **({"peft_bf16_error": noise} if noise else {})}
    model.cpu()
    return {**out, "pass": all(v["pass"] for v in out.values())}


def check_bank(args) -> dict:
    """bench/bank_throughput.py's main, in this process (so its GPU memory is counted)."""
    argv = ["--device", args.device, "--dtype", args.dtype, "--docs", str(args.bank_docs),
            "--docs-per-step", str(args.bank_docs), "--model", args.bank_model]
    return {"argv": " ".join(argv), **bank_throughput.main(argv)}


def check_world(args, root: Path) -> dict:
    """The default job (tiny under --dry-run) through dyprag.run.pipeline.run, from empty directories."""
    from dyprag.config import load_config
    from dyprag.files import read_json
    from dyprag.run.pipeline import run

    os.environ["DYPRAG_CACHE"] = str(root / "cache")  # empty: timed as a machine's first run
    overrides = [f"run.root={root}", "run.name=gpu-check", "index.method=bm25", "wandb.mode=disabled",
                 f"train.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}"]
    config = None
    if args.dry_run:  # the tests' tiny world (tests/tiny_world.py), four modes
        from tiny_world import tiny_run_config

        config = tiny_run_config(root)
        overrides.append(DRY_RUN_MODES)
    start = time.perf_counter()
    run(load_config(config, [*overrides, *args.overrides]))
    seconds, results = time.perf_counter() - start, read_json(root / "gpu-check" / "eval.json")
    return {"seconds": round(seconds, 1), "stage_seconds": results["stage_seconds"],
            "f1": {m: round(v, 4) for m, v in results["f1"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: test the plumbing")
    parser.add_argument("--out", help="folder for gpu_check.json (rewritten after each check)")
    parser.add_argument("--bank-docs", type=int, help="bank_throughput's --docs (default 64; dry run 8)")
    parser.add_argument("--bank-model", choices=sorted(bank_throughput.SHAPES),
                        help="bank_throughput's --model (default small; dry run world)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inject", "bank", "world"])
    parser.add_argument("overrides", nargs="*", help="world job config overrides, as train.py's")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "--dry-run runs the same plumbing on CPU", file=sys.stderr)
        sys.exit(2)
    args.device, args.dtype, args.size = ("cpu", "fp32", "tiny") if args.dry_run else ("cuda", "bf16", "full")
    args.bank_docs = args.bank_docs or (8 if args.dry_run else 64)
    args.bank_model = args.bank_model or ("world" if args.dry_run else "small")
    out = Path(args.out).resolve() if args.out else None
    os.chdir(ROOT)  # bank_throughput reads configs/ from the working directory
    cuda = args.device == "cuda"
    result = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "inject": None, "bank": None, "world": None, "peak_gpu_mib": {},
              "skipped": [{"check": c, "reason": "--skip"} for c in args.skip]}
    for package, why in (("bm25s", "index.method=bm25 needs it: carry its wheel, see this "
                                   "script's docstring"),
                         ("matplotlib", "the job's F1 plot needs it")):
        if "world" not in args.skip and importlib.util.find_spec(package) is None:
            args.skip.append("world")
            result["skipped"].append({"check": "world", "reason": f"{package} is not installed ({why})"})
    started = time.perf_counter()

    def save() -> None:  # complete after each check, never half-written
        if out:
            atomic_write_json(out / "gpu_check.json", result)

    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            for name, fn in [("inject", lambda: check_inject(args)),
                             ("bank", lambda: check_bank(args)),
                             ("world", lambda: check_world(args, Path(tmp)))]:
                if name in args.skip:
                    continue
                print(f"== {name}", flush=True)
                try:
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    result[name] = fn()
                    if cuda:
                        result["peak_gpu_mib"][name] = round(
                            torch.cuda.max_memory_allocated() / 2**20, 1)
                except (Exception, SystemExit) as err:  # recorded; the other checks still run
                    traceback.print_exc()
                    result[name] = {"error": f"{type(err).__name__}: {err}"}
                save()
    finally:  # the JSON line comes out whatever happened above
        result["peak_gpu_mib"]["max"] = max(result["peak_gpu_mib"].values(), default=None)
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["failed"] = [k for k in ("inject", "bank", "world") if isinstance(result[k], dict)
                            and ("error" in result[k] or result[k].get("pass") is False)]
        save()
        print(json.dumps(result))
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
