"""Reading results: one row per method with its mean, 95% interval and a paired test against full fine-tuning.

    rows = summarise(results, labels)      # Result records of one task (seeds of a method grouped)
    print(markdown_table(results, labels))

A row's ``vs_full`` compares the method with full fine-tuning seed by seed on the same test examples
(``minipeft.lab.stats.compare``: paired bootstrap + exact McNemar, verdict "better" / "within noise" / "worse").
``pct_of_full`` is mean accuracy / mean accuracy of full fine-tuning, in percent (the design document's
"> 90% of full fine-tuning").
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..core import RECIPES, in_lesson_order
from .records import added_lines, by_method, load_record, read_json, save_figure, training_memory_mb, write_atomic
from .stats import Comparison, compare, correctness, mean_interval
from .train import Result

REFERENCE = "full"


def paired_against(runs: list[Result], reference: list[Result], labels) -> Comparison | None:
    """``runs`` vs ``reference`` on the seeds both have (seed s with seed s); None without predictions."""
    ref = {r.seed: r for r in reference}
    pairs = [(r, ref[r.seed]) for r in runs if r.seed in ref and r.test_predictions and ref[r.seed].test_predictions]
    if labels is None or not pairs:
        return None
    a = correctness([r.test_predictions for r, _ in pairs], labels)
    b = correctness([f.test_predictions for _, f in pairs], labels)
    return compare(a, b)


def summarise(results: list[Result], labels=None, reference: str = REFERENCE) -> list[dict]:
    """One row per method: sizes, test accuracy mean and 95% t half-width over seeds, % of ``reference``,
    the paired comparison with it (when ``labels`` are given), median s/step, peak and formula memory."""
    groups = by_method(results)
    ref_mean = statistics.mean(r.test_acc for r in groups[reference]) if reference in groups else math.nan
    rows = []
    for name, rs in groups.items():
        mean, half = mean_interval([r.test_acc for r in rs])
        spec = RECIPES.get(name)
        rows.append({
            "method": name, "lesson": spec.lesson if spec else "", "lr": rs[0].lr, "seeds": [r.seed for r in rs],
            "trainable": rs[0].trainable_params, "stored": rs[0].stored_params,
            "trainable_pct": rs[0].trainable_pct, "stored_pct": rs[0].stored_pct,
            "test_acc": mean, "half_width": half, "accs": [r.test_acc for r in rs],
            "val_acc": statistics.mean(r.val_acc[-1] for r in rs), "pct_of_full": 100 * mean / ref_mean,
            "vs_full": None if name == reference else paired_against(rs, groups.get(reference, []), labels),
            "sec_per_step": statistics.median(r.sec_per_step for r in rs),
            "peak_memory_mb": max(r.peak_memory_mb for r in rs), "train_state_mb": rs[0].train_state_mb,
            "training_memory_mb": max(training_memory_mb(r) for r in rs)})
    return rows


def fmt_acc(row: dict) -> str:
    """"0.781 ± 0.012" (mean ± 95% half-width over seeds) or "0.781" with one seed."""
    return f"{row['test_acc']:.3f}" + ("" if math.isnan(row["half_width"]) else f" ± {row['half_width']:.3f}")


def fmt_vs_full(c: Comparison | None) -> str:
    if c is None:
        return "—"
    return f"{100 * c.difference:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}], p={c.p_mcnemar:.2g}: {c.verdict}"


def markdown_table(results: list[Result], labels=None) -> str:
    """The per-task table (accuracy in points of the ``labels`` test split; paired columns need labels)."""
    head = ("| method | lesson | lr | trainable | % trained | % stored | test acc (95% CI) | % of full "
            "| vs full: Δ points [95% CI], McNemar p | s/step | training MiB, measured | weights+grads+AdamW MiB |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['method']} | {r['lesson']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.3g} "
        f"| {r['stored_pct']:.3g} | {fmt_acc(r)} | {r['pct_of_full']:.1f} | {fmt_vs_full(r['vs_full'])} "
        f"| {r['sec_per_step']:.2f} | {r['training_memory_mb']:.0f} | {r['train_state_mb']:.0f} |\n"
        for r in summarise(results, labels))


def plot(results: list[Result], path, labels=None) -> None:
    """Test accuracy (mean, 95% interval over seeds) vs % of the backbone trained, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in summarise(results, labels):
        half = 0.0 if math.isnan(row["half_width"]) else row["half_width"]
        ax.errorbar([row["trainable_pct"]], [row["test_acc"]], yerr=[half], fmt="o", capsize=3)
        ax.annotate(row["method"], (row["trainable_pct"], row["test_acc"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("trainable parameters, % of the frozen backbone (log)")
    ax.set_ylabel("test accuracy (mean, 95% interval over seeds)")
    ax.set_title(f"{results[0].task}: accuracy vs parameters trained")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def render_classification(path) -> dict[str, Path]:
    """A classification task's views (``kinds.render_task``): the accuracy table, its notes, the plot."""
    path = Path(path)
    record = load_record(path)
    results, labels, m = record["results"], record_labels(record), record.get("machine")
    paths = {"md": path.with_suffix(".md"), "png": path.with_suffix(".png")}
    r0 = results[0]
    partial = "" if record["status"] == "complete" else f"**{record['status'].capitalize()}.**\n\n"
    if record.get("note"):
        partial += f"Note: {record['note']}\n\n"
    budget = ", ".join(f"{k}={v}" for k, v in r0.budget.items())
    versions = ", ".join(f"{k} {v}" for k, v in r0.versions.items())
    write_atomic(paths["md"],
        f"# Comparison on `{r0.task}`\n\n{partial}{markdown_table(results, labels)}\n"
        f"Seeds: {sorted({r.seed for r in results})}; test accuracy on all {len(labels)} test examples, mean ± the "
        "half-width of its 95% Student t interval over seeds. `vs full`: the paired difference from full "
        "fine-tuning (same seeds, same examples), its 95% paired-bootstrap interval, the exact McNemar p and the "
        "verdict (`minipeft.lab.stats`). `% trained` / `% stored` = parameters / the frozen encoder's (the head counts "
        "as trained). s/step: median of the run's steps (other work on the machine slows it: see the load average "
        "below; `bench/costs.py` measures the ratios side by side). Training MiB: the measured peak "
        f"({r0.memory_measure}), the fp32 weights included; the last column is the formula 4·(N + 3·N_trainable) "
        f"bytes.\n\nCommand: `{record['command']}`\n\n"
        + added_lines(record)
        + f"Budget: {budget}\n\nDevice: {r0.device}"
        + (f" ({m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads); load average (1, 5, 15 min) at "
           f"the start {m['load_average']['start']}, at the end {m['load_average']['end']}" if m else "")
        + f"; versions: {versions}\n")
    plot(results, paths["png"], labels)
    return paths


# ---- the design document's table, measured ------------------------------------------------------------------

def record_labels(record: dict) -> list[int]:
    """The test labels the record's runs were scored on (older records lack them: read from the task)."""
    if "test_labels" in record:
        return record["test_labels"]
    from .tasks import load_task

    budget = record["budget"]
    return list(load_task(record["task"], max_test=budget.get("max_test", budget["max_eval"]))["test"]["label"])


def load_all(results_dir="results", unreadable: dict | None = None) -> tuple[dict[str, dict], dict | None]:
    """({task: record} for every ``<results_dir>/<task>/comparison.json``, the costs record or None).

    A file that cannot be read raises ``ValueError`` naming it; given a dict ``unreadable``, it is left out and
    listed there instead ({path: what is wrong}), so the readable tasks are still reported."""
    root, records, costs = Path(results_dir), {}, None

    def read(path, reader):
        try:
            return reader(path)
        except ValueError as e:
            if unreadable is None:
                raise
            unreadable[path] = str(e)

    for path in sorted(root.glob("*/comparison.json")):
        record = read(path, load_record)
        # results/<task>/ only, classification (accuracy) only
        if record is not None and record["task"] == path.parent.name and record["results"][0].metric == "accuracy":
            records[path.parent.name] = record
    if (root / "costs.json").exists():
        costs = read(root / "costs.json", read_json)
    return records, costs


def recorded_difference(a: str, b: str, tasks=("question", "topic"), results_dir="results") -> str:
    """Method ``a`` against ``b`` on each task's committed runs, paired seed by seed on the same test examples:
    one line per task with both means, the difference in points, its 95% bootstrap interval, McNemar p, verdict."""
    lines = []
    for task in tasks:
        path = Path(results_dir) / task / "comparison.json"
        if not path.exists():
            lines.append(f"{task}: no {path}")
            continue
        record = load_record(path)
        runs = by_method(record["results"])
        missing = [m for m in (a, b) if m not in runs]
        if missing:
            lines.append(f"{task}: {path} has no runs of {', '.join(missing)}")
            continue
        c = paired_against(runs[a], runs[b], record_labels(record))
        mean_a, mean_b = (statistics.mean(r.test_acc for r in runs[m]) for m in (a, b))
        seeds = sorted({r.seed for r in runs[a]} & {r.seed for r in runs[b]})
        lines.append(f"{task} (seeds {seeds}, {len(record_labels(record))} test examples): {a} {mean_a:.3f} vs {b} "
                     f"{mean_b:.3f}: {fmt_vs_full(c)}")
    return "\n".join(lines)


def design_rows(records: dict[str, dict], costs: dict | None = None) -> list[dict]:
    """One row per method (in lesson order): sizes, costs (side by side, ``bench/costs.py``), measured training
    memory and its formula (first task's runs), and per task the ``summarise`` row (accuracy, interval, verdict)."""
    per_task = {t: {r["method"]: r for r in summarise(rec["results"], record_labels(rec))}
                for t, rec in records.items()}
    rank = {m: i for i, m in enumerate(in_lesson_order(ablations=True))}
    methods = sorted({m for rows in per_task.values() for m in rows}, key=lambda m: rank.get(m, len(rank)))
    out = []
    for m in methods:
        first = next(rows[m] for rows in per_task.values() if m in rows)
        cost = (costs or {}).get("methods", {}).get(m, {})
        out.append({"method": m, "trainable_pct": first["trainable_pct"], "stored_pct": first["stored_pct"],
                    "training_memory_mb": first["training_memory_mb"], "train_state_mb": first["train_state_mb"],
                    "step_vs_full": cost.get("step_vs_full", math.nan), "merges": cost.get("merges"),
                    "batch1_vs_base": cost.get("batch 1 vs base", math.nan),
                    "batch32_vs_base": cost.get("batch 32 vs base", math.nan),
                    "tasks": {t: rows.get(m) for t, rows in per_task.items()}})
    return out


def fmt_ratio(x: float) -> str:
    """A measured ratio, or "—" where ``bench/costs.py`` did not measure it (lesson 06's ablations)."""
    return "—" if math.isnan(x) else f"{x:.2f}"


def summary_markdown(records: dict[str, dict], costs: dict | None = None) -> str:
    """The short table (the README's): sizes, step vs full, and per task accuracy, % of full and verdict."""
    tasks = list(records)
    head = ("| method | trained % | stored % | step vs full | " + " | ".join(
        f"{t}: acc ± 95% CI (% of full), vs full" for t in tasks) + " |\n|---|---:|---:|---:|" + "---|" * len(tasks) + "\n")

    def cell(x):
        if x is None:
            return "not run"
        return f"{fmt_acc(x)} ({x['pct_of_full']:.1f}%), {'—' if x['vs_full'] is None else x['vs_full'].verdict}"

    return head + "".join(
        f"| {r['method']} | {r['trainable_pct']:.3g} | {r['stored_pct']:.3g} | {fmt_ratio(r['step_vs_full'])} | "
        + " | ".join(cell(r["tasks"][t]) for t in tasks) + " |\n" for r in design_rows(records, costs))


def design_markdown(records: dict[str, dict], costs: dict | None = None) -> str:
    tasks = list(records)
    head = ("| method | % trained | % stored | train step vs full | training MiB (formula) | merges | inference b1 / b32 "
            "vs base | " + " | ".join(f"{t}: acc ± 95% CI (% of full), vs full" for t in tasks) + " |\n"
            "|---|---:|---:|---:|---:|---|---:|" + "---|" * len(tasks) + "\n")

    def task_cell(row):
        if row is None:
            return "not run"
        verdict = ("reference" if row["method"] == REFERENCE else
                   "no paired runs" if row["vs_full"] is None else row["vs_full"].verdict)
        return f"{fmt_acc(row)} ({row['pct_of_full']:.1f}%), {verdict}"

    def merges(r):  # the baselines have no adapter to merge
        spec = RECIPES.get(r["method"])
        return "—" if spec is not None and spec.make is None else {True: "yes", False: "no", None: "—"}[r["merges"]]

    return head + "".join(
        f"| {r['method']} | {r['trainable_pct']:.3g} | {r['stored_pct']:.3g} | {fmt_ratio(r['step_vs_full'])} "
        f"| {r['training_memory_mb']:.0f} ({r['train_state_mb']:.0f}) | {merges(r)} "
        f"| {fmt_ratio(r['batch1_vs_base'])} / {fmt_ratio(r['batch32_vs_base'])} | "
        + " | ".join(task_cell(r["tasks"][t]) for t in tasks) + " |\n" for r in design_rows(records, costs))
