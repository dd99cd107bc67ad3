"""Reading a generation task's results (``headline``): ROUGE per method, and a paired test against zero-shot.

    rows = generation_rows(results, references)    # Result records of one task (seeds of a method grouped)
    print(generation_table(results, references))

A row's ``vs_zero_shot`` compares the method's headlines with the untrained model's on the same test articles,
example by example (``minipeft.lab.stats.compare_scores``: per-article ROUGE-L difference averaged over seeds,
bootstrap interval, paired t-test, verdict). Zero-shot decodes greedily and trains nothing, so every seed of it
writes the same headlines: one run of it is paired with every seed of the others.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .generation_tasks import rouge_per_example
from .records import added_lines, by_method, load_record, save_figure, training_memory_mb, write_atomic
from .stats import ScoreComparison, compare_scores, mean_interval
from .train import Result

BASELINE = "zero_shot"


def paired_scores(runs: list[Result], baseline: list[Result], references: list[str]) -> ScoreComparison | None:
    """ROUGE-L of ``runs`` vs ``baseline`` (any other method's runs) per test article, seed s with the baseline's
    seed s (or its first run: zero-shot has one)."""
    if not runs or not baseline or not all(r.test_predictions for r in runs + baseline):
        return None
    by_seed = {r.seed: r for r in baseline}
    per = lambda r: rouge_per_example(r.test_predictions, references)["rougeL"]  # noqa: E731
    return compare_scores([per(r) for r in runs], [per(by_seed.get(r.seed, baseline[0])) for r in runs])


def generation_rows(results: list[Result], references: list[str] | None = None, baseline: str = BASELINE) -> list[dict]:
    """One row per method: sizes, test ROUGE-L mean and 95% t half-width over seeds, ROUGE-1/2 means, the paired
    comparison with ``baseline`` (when ``references`` are given), median s/step, run time, measured memory."""
    groups = by_method(results)
    rows = []
    for name, rs in groups.items():
        mean, half = mean_interval([r.test_acc for r in rs])
        steps = [r.sec_per_step for r in rs if not math.isnan(r.sec_per_step)]
        rows.append({
            "method": name, "lr": rs[0].lr, "seeds": [r.seed for r in rs], "trainable": rs[0].trainable_params,
            "trainable_pct": rs[0].trainable_pct, "stored_pct": rs[0].stored_pct,
            "rougeL": mean, "half_width": half, "rougeLs": [r.test_acc for r in rs],
            "rouge1": statistics.mean(r.test_scores["rouge1"] for r in rs),
            "rouge2": statistics.mean(r.test_scores["rouge2"] for r in rs),
            "vs_zero_shot": None if name == baseline or references is None
            else paired_scores(rs, groups.get(baseline, []), references),
            "sec_per_step": statistics.median(steps) if steps else math.nan,
            "run_seconds": statistics.mean(r.train_seconds for r in rs),
            "training_memory_mb": max(training_memory_mb(r) for r in rs)})
    return rows


def fmt_rouge(row: dict) -> str:
    """"24.1 ± 1.3" (ROUGE-L F1 in points, mean ± 95% half-width over seeds) or "24.1" with one run."""
    return f"{100 * row['rougeL']:.1f}" + ("" if math.isnan(row["half_width"]) else f" ± {100 * row['half_width']:.1f}")


def fmt_p(p: float) -> str:
    """"p=0.023", or "p<0.0001" (below that, the t distribution's tail is lost in float rounding anyway)."""
    return "p<0.0001" if p < 1e-4 else f"p={p:.2g}"


def fmt_vs(c: ScoreComparison | None) -> str:
    if c is None:
        return "—"
    return f"{100 * c.difference:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}], {fmt_p(c.p_t)}: {c.verdict}"


def generation_table(results: list[Result], references: list[str] | None = None) -> str:
    """The per-task table (ROUGE in points, i.e. F1 × 100)."""
    head = ("| method | lr | trainable | % trained | % stored | ROUGE-L (95% CI) | ROUGE-1 | ROUGE-2 "
            "| vs zero-shot: Δ ROUGE-L [95% CI], paired t p | s/step | run s (train + eval) | training MiB, measured |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n")
    lines = []
    for r in generation_rows(results, references):
        lr = f"{r['lr']:g}" if r["lr"] else "—"  # zero-shot trains nothing
        step = "—" if math.isnan(r["sec_per_step"]) else f"{r['sec_per_step']:.1f}"
        lines.append(f"| {r['method']} | {lr} | {r['trainable']:,} | {r['trainable_pct']:.3g} | {r['stored_pct']:.3g} "
                     f"| {fmt_rouge(r)} | {100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | {fmt_vs(r['vs_zero_shot'])} "
                     f"| {step} | {r['run_seconds']:.0f} | {r['training_memory_mb']:.0f} |\n")
    return head + "".join(lines)


def plot_generation(results: list[Result], path) -> None:
    """Test ROUGE-L per method: each seed a dot, the mean a bar, its 95% interval a whisker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = generation_rows(results)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, row in enumerate(rows):
        half = 0.0 if math.isnan(row["half_width"]) else 100 * row["half_width"]
        ax.bar(i, 100 * row["rougeL"], color="#9ecae1", yerr=half, capsize=4)
        ax.plot([i] * len(row["rougeLs"]), [100 * x for x in row["rougeLs"]], "k.", ms=5)
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['trainable_pct']:.2g}% trained" for r in rows])
    ax.set_ylabel("test ROUGE-L F1 (points)")
    ax.set_title(f"{results[0].task}: ROUGE-L per method (dots: seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def render_generation(path) -> dict[str, Path]:
    """``comparison.md`` and ``comparison.png`` of a generation task's ``comparison.json``; returns their paths."""
    path = Path(path)
    record = load_record(path)
    results, references, m = record["results"], record["test_labels"], record["machine"]
    paths = {"md": path.with_suffix(".md"), "png": path.with_suffix(".png")}
    r0 = results[0]
    partial = "" if record["status"] == "complete" else f"**{record['status'].capitalize()}.**\n\n"
    budget = ", ".join(f"{k}={v}" for k, v in r0.budget.items())
    write_atomic(paths["md"],
        f"# Comparison on `{r0.task}`\n\n{partial}{generation_table(results, references)}\n"
        f"Seeds: {sorted({r.seed for r in results})}; ROUGE F1 × 100 on all {len(references)} test articles "
        "(greedy headlines), mean ± the half-width of its 95% Student t interval over seeds. `vs zero-shot`: the "
        "paired difference in ROUGE-L from the untrained model's headlines on the same articles, its 95% bootstrap "
        "interval and the paired t-test (`minipeft.lab.stats.compare_scores`). Zero-shot trains nothing and decodes "
        "greedily: one run stands for every seed. s/step: median over the steps; run s: training and writing the "
        f"validation and test headlines.\n\nCommand: `{record['command']}`\n\n"
        + added_lines(record)
        + f"Budget: {budget}\n\nDevice: {r0.device} ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
          f"threads); load average (1, 5, 15 min) at the start {m['load_average']['start']}, at the end "
          f"{m['load_average']['end']}\n")
    plot_generation(results, paths["png"])
    return paths
