"""Results for people: the EM/F1/acc table train.py prints, the markdown grid and the F1 plot
evaluate.py writes, and what to try next."""

from __future__ import annotations

from pathlib import Path

from dyprag import rundir
from dyprag.files import atomic_path


def table(results: dict) -> str:
    """The final EM/F1/acc table, one row per mode."""
    lines = [f"{'mode':16s} {'EM':>6s} {'F1':>6s} {'acc':>6s}", "-" * 37]
    lines += [f"{m:16s} {results['em'][m]:6.3f} {f1:6.3f} {results['acc'][m]:6.3f}"
              for m, f1 in results["f1"].items()]
    recall = [f"{k} {v:.3f}" for k, v in results.items() if k.startswith("recall@")]
    lines += [", ".join(recall)] if recall else []
    lines += by_fact(results.get("f1_by_fact", {}))
    fit = results.get("translator_fit_f1", {})
    if fit.get("seen") is not None:
        lines.append(f"translator on its training documents' questions: F1 {fit['seen']:.3f}"
                     + (f"; on held-out documents': {fit['held_out']:.3f}"
                        if fit.get("held_out") is not None else ""))
    if "delta_cosine" in results:
        lines.append(f"dyprag@1 with an irrelevant document: F1 {results['dyprag_irrelevant']:.3f}"
                     f"; mean cosine of the generated ΔW across documents "
                     f"{results['delta_cosine']:.3f}")
    how = [f"{name}: {results[k]}" for k, name in (("prompt_format", "prompts"),
                                                   ("augment", "augmentation")) if k in results]
    return "\n".join(lines + [f"{results['questions']} test questions"
                              + (f" ({', '.join(how)})" if how else "")])


def by_fact(f1_by_fact: dict[str, dict[str, float]]) -> list[str]:
    """F1 by mode and fact (``{mode: {fact: F1}}``), one row per mode; nothing when empty."""
    if not f1_by_fact:
        return []
    names = list(next(iter(f1_by_fact.values())))
    lines = ["F1 by fact", f"{'mode':16s} " + " ".join(f"{n[:10]:>10s}" for n in names)]
    return lines + [f"{mode:16s} " + " ".join(f"{by.get(n, float('nan')):10.3f}" for n in names)
                    for mode, by in f1_by_fact.items()]


def markdown(grid: dict, modes: list[str], dependence: dict | None = None,
             f1_by_fact: dict | None = None) -> str:
    """The grid (dataset × mode), the translator's document dependence by dataset, then F1 by
    fact (``{dataset: {mode: {fact: F1}}}``) where the questions name their facts."""
    lines = ["| dataset | mode | EM | F1 | acc | ms / question |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {m} | {s[m]['em']:.3f} | {s[m]['f1']:.3f} | {s[m]['acc']:.3f} | "
              f"{s[m]['ms_per_question']:.1f} |" for name, s in grid.items() for m in modes]
    if dependence:
        lines += ["", "| dataset | dyprag@1 F1, irrelevant document | mean ΔW cosine across "
                  "documents |", "| --- | --- | --- |"]
        lines += [f"| {name} | {d['dyprag_irrelevant']:.3f} | {d['delta_cosine']:.3f} |"
                  for name, d in dependence.items()]
    for name, by_mode in (f1_by_fact or {}).items():
        names = list(next(iter(by_mode.values())))
        lines += ["", f"| {name}: mode | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        lines += [f"| {mode} | " + " | ".join(f"{by[n]:.3f}" for n in names) + " |"
                  for mode, by in by_mode.items()]
    return "\n".join(lines) + "\n"


def plot(grid: dict, modes: list[str], path: Path) -> Path:
    """F1 by mode, one bar per dataset (``grid``: dataset → mode → {"f1", ...}); written to a
    temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(modes), 3.6))
    width = 0.8 / len(grid)
    for i, (name, scores) in enumerate(grid.items()):
        ax.bar([j + i * width for j in range(len(modes))], [scores[m]["f1"] for m in modes],
               width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(modes))], modes, rotation=20)
    ax.set_ylabel("F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def next_steps(run: Path, results: dict) -> str:
    """Where the run is, its plot, and the infer.py command to try next (a test question)."""
    question = results["samples"][0]["question"] if results.get("samples") else "..."
    return "\n".join([
        f"run:   {run}  (config.yaml, eval.json, logs/, translator/)",
        f"plot:  {run / rundir.PLOT}",
        f"next:  python infer.py --run {run} --question {question!r}",
    ])
