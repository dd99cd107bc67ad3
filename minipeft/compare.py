"""The comparison harness: every registered method, one shared budget, one task -> results/.

    python -m minipeft compare [--task sentiment] [--seeds 0 1] [--fast] [--methods full head] [--out results]

writes ``comparison.json`` (every Result), ``comparison.md`` (a table, the command, budget and versions) and
``comparison.png`` (test accuracy vs % of the backbone trained, log x).

The methods are the recipes their own files register (``minipeft.core.Recipe``), e.g. in ``methods/lora.py``::

    register_recipe(Recipe.adapter("lora", lesson="02", lr=2e-3, make=lambda r: LoRAConfig(r=r, alpha=2 * r),
                                   knob=Knob("rank r", (1, 2, 4, 8, 16), 8), description="LoRA (Hu et al. 2021)"))

``build_model`` is the one builder of task models: lessons, this harness and the tests use it, so the same
method, task and seed give the same numbers everywhere.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable

from .api import apply_recipe
from .core import RECIPES, Recipe, get_recipe, register_recipe
from .train import Budget, Result, SequenceClassifier, seed_everything, train


# Each method file registers its recipes (``minipeft.core.Recipe``); the harness reads them, in lesson order.
MethodSpec, register, get_method = Recipe, register_recipe, get_recipe
METHODS = RECIPES


def in_lesson_order() -> list[str]:
    return sorted(RECIPES, key=lambda name: RECIPES[name].lesson)


def build_model(spec: MethodSpec | str, task: str = "sentiment", seed: int = 0, encoder=None) -> SequenceClassifier:
    """Seed, load the pretrained encoder (or use ``encoder``), add a head for ``task``, apply the recipe."""
    from .backbones.encoder import Encoder
    from .tasks import TASKS

    spec = get_method(spec) if isinstance(spec, str) else spec
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
    seed_everything(seed)
    model = SequenceClassifier(encoder or Encoder.from_pretrained(), num_labels=len(TASKS[task].label_names))
    return apply_recipe(model, spec)


def run_comparison(methods=None, task: str = "sentiment", seeds=(0,), budget: Budget | None = None,
                   quiet: bool = False, on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Train each method (all registered ones by default) once per seed with the same budget.

    ``on_result(results_so_far)`` is called after each run (``main`` writes the files then, so a crash or an
    interrupt keeps what finished)."""
    budget = budget or Budget.from_env()
    specs = [get_method(m) for m in (methods or in_lesson_order())]
    results = []
    for spec in specs:
        for seed in seeds:
            model = build_model(spec, task, seed)
            results.append(train(model, task, spec.lr, budget, seed=seed, method=spec.name,
                                 config=spec.config, quiet=quiet))
            if on_result is not None:
                on_result(results)
            if not quiet:
                r = results[-1]
                print(f"{spec.name} seed {seed}: test acc {r.test_acc:.3f}, {r.trainable_pct:.3g}% trained, "
                      f"{r.sec_per_step:.2f} s/step", flush=True)
    return results


# ---- writing results/ ----------------------------------------------------------------------------------------

def summarise(results: list[Result]) -> list[dict]:
    """One row per method: mean (and std over seeds) of the numbers, in the order they were run."""
    rows: dict[str, list[Result]] = {}
    for r in results:
        rows.setdefault(r.method, []).append(r)

    def ms(xs):
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    out = []
    for name, rs in rows.items():
        spec = METHODS.get(name)
        out.append({"method": name, "lesson": spec.lesson if spec else "", "lr": rs[0].lr, "seeds": len(rs),
                    "trainable": rs[0].trainable_params, "stored": rs[0].stored_params,
                    "trainable_pct": rs[0].trainable_pct, "stored_pct": rs[0].stored_pct,
                    "val_acc": ms([r.val_acc[-1] for r in rs]), "test_acc": ms([r.test_acc for r in rs]),
                    "sec_per_step": statistics.median([r.sec_per_step for r in rs]),
                    "peak_memory_mb": max(r.peak_memory_mb for r in rs), "train_state_mb": rs[0].train_state_mb})
    return out


def markdown_table(results: list[Result]) -> str:
    head = ("| method | lesson | lr | trainable | % of backbone | stored | val acc | test acc | s/step "
            "| peak mem (MiB) | weights+grads+AdamW (MiB) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    pm = lambda m_s: f"{m_s[0]:.3f}" + (f" ± {m_s[1]:.3f}" if m_s[1] else "")  # noqa: E731
    return head + "".join(
        f"| {r['method']} | {r['lesson']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.3g} "
        f"| {r['stored']:,} | {pm(r['val_acc'])} | {pm(r['test_acc'])} | {r['sec_per_step']:.2f} "
        f"| {r['peak_memory_mb']:.0f} | {r['train_state_mb']:.0f} |\n" for r in summarise(results))


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in summarise(results):
        (m, s), x = row["test_acc"], row["trainable_pct"]
        ax.errorbar([x], [m], yerr=[s] if s else None, fmt="o", capsize=3, label=row["method"])
        ax.annotate(row["method"], (x, m), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set_xlabel("trainable parameters, % of the frozen backbone (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{results[0].task}: accuracy vs parameters trained")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: list[Result], out_dir, command: str, planned: int | None = None) -> dict[str, Path]:
    """Write comparison.json / .md / .png into ``out_dir``; return their paths.

    ``planned``: the number of runs the command was to make; when fewer finished, the files say so."""
    if not results:
        raise ValueError("no results to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"comparison.{k}" for k in ("json", "md", "png")}
    r0 = results[0]
    partial = planned is not None and len(results) < planned
    status = f"partial: {len(results)} of {planned} runs finished" if partial else "complete"
    paths["json"].write_text(json.dumps({"command": command, "status": status, "task": r0.task, "budget": r0.budget,
                                         "versions": r0.versions, "results": [r.to_dict() for r in results]},
                                        indent=1) + "\n")
    budget = ", ".join(f"{k}={v}" for k, v in r0.budget.items())
    versions = ", ".join(f"{k} {v}" for k, v in r0.versions.items())
    paths["md"].write_text(
        f"# Comparison on `{r0.task}`\n\n" + (f"**Partial results: {len(results)} of {planned} runs finished.**\n\n"
                                                if partial else "") + f"{markdown_table(results)}\n"
        f"Seeds: {sorted({r.seed for r in results})}; accuracies are the mean (± std over seeds). "
        "`% of backbone` = trainable / parameters of the frozen encoder (the head counts as trainable). "
        f"Peak memory: {r0.memory_measure}; the last column is the formula 4·(N + 3·N_trainable) bytes.\n\n"
        f"Command: `{command}`\n\nBudget: {budget}\n\nDevice: {r0.device}; versions: {versions}\n")
    plot(results, paths["png"])
    return paths


def load_results(path) -> list[Result]:
    return [Result.from_dict(d) for d in json.loads(Path(path).read_text())["results"]]


def main(argv=None) -> list[Result]:
    from .tasks import TASKS

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minipeft compare",
                                description="train registered methods with one budget on one task")
    p.add_argument("--task", default="sentiment", choices=sorted(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fast", action="store_true", help="the CI budget (Budget.fast()); also MINIPEFT_FAST=1")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"default: all registered ({' '.join(in_lesson_order())})")
    p.add_argument("--out", default="results", help="output folder (default results/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods or [] if m not in METHODS]
    if unknown:  # fail before any training
        p.error(f"unknown method(s) {unknown}; registered methods: {sorted(METHODS)}")
    budget = Budget.fast() if args.fast else Budget.from_env()
    command = "python -m minipeft compare" + ("" if not argv else " " + shlex.join(argv))
    planned = len(args.methods or METHODS) * len(args.seeds)
    results = run_comparison(args.methods, args.task, args.seeds, budget, quiet=args.quiet,
                             on_result=lambda rs: write_results(rs, args.out, command, planned))
    paths = write_results(results, args.out, command)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return results
