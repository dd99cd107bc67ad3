"""The comparison harness: every registered method, one shared budget, each task -> one folder of results.

    python -m minipeft compare [--tasks topic] [--seeds 0] [--fast] [--methods full head] [--out runs]

writes, per task, ``<out>/<task>/comparison.json`` (every Result, the test labels, the machine and its load
average, versions, the command), ``comparison.md`` (the table of ``minipeft.report``: mean and 95% interval
over seeds, paired test against full fine-tuning) and ``comparison.png`` (accuracy vs % of the backbone trained).

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
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from .api import apply_recipe
from .core import RECIPES, Recipe, get_recipe, register_recipe
from .report import markdown_table, plot, render_task, summarise  # noqa: F401  (lessons read them here)
from .train import Budget, Result, SequenceClassifier, seed_everything, train


# Each method file registers its recipes (``minipeft.core.Recipe``); the harness reads them, in lesson order.
MethodSpec, register, get_method = Recipe, register_recipe, get_recipe
METHODS = RECIPES


def in_lesson_order(ablations: bool = False) -> list[str]:
    """The compared methods in the order the course teaches them (lesson 06's ablations too if asked)."""
    return [n for n in sorted(RECIPES, key=lambda name: RECIPES[name].lesson) if ablations or not RECIPES[n].ablation]


def build_model(spec: MethodSpec | str, task: str = "sentiment", seed: int = 0, encoder=None,
                size=None) -> SequenceClassifier:
    """Seed, load the pretrained encoder (or use ``encoder``), add a head for ``task``, apply the recipe (its
    adapter at ``size`` on the recipe's knob, default the knob's default)."""
    from .backbones.encoder import Encoder
    from .tasks import TASKS

    spec = get_method(spec) if isinstance(spec, str) else spec
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
    seed_everything(seed)
    model = SequenceClassifier(encoder or Encoder.from_pretrained(), num_labels=len(TASKS[task].label_names))
    return apply_recipe(model, spec, size)


def run_comparison(methods=None, task: str = "sentiment", seeds=(0,), budget: Budget | None = None,
                   quiet: bool = False, on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Train each method (all registered ones by default) once per seed with the same budget.

    ``on_result(results_so_far)`` is called after each run (``main`` writes the files then, so a crash or an
    interrupt keeps what finished)."""
    from .generation_tasks import GENERATION_TASKS

    if task in GENERATION_TASKS:
        from .generation_train import run_generation_comparison

        return run_generation_comparison(methods, task, seeds, budget, quiet, on_result)
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


def recorded_runs(methods=("full", "head"), task: str = "sentiment", budget: Budget | None = None,
                  results_dir="results", quiet: bool = True) -> dict[str, list[Result]]:
    """Runs of registered ``methods`` on ``task``, by seed: read from ``<results_dir>/<task>/comparison.json`` when
    it holds them with this budget (every recorded seed), else trained here through ``build_model`` (seed 0).

    Lessons read their baselines this way instead of retraining them; it prints where each came from."""
    budget = budget or Budget.from_env()
    path = Path(results_dir) / task / "comparison.json"
    recorded: dict[str, list[Result]] = {}
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("budget") == asdict(budget):
            for d in record["results"]:
                recorded.setdefault(d["method"], []).append(Result.from_dict(d))
    runs = {}
    for name in methods:
        if name in recorded:
            runs[name] = sorted(recorded[name], key=lambda r: r.seed)
            where = f"read from {path} (seeds {[r.seed for r in runs[name]]})"
        else:
            spec = get_method(name)
            runs[name] = [train(build_model(spec, task, 0), task, spec.lr, budget, seed=0, method=name,
                                config=spec.config, quiet=quiet)]
            where = f"trained here, seed 0 ({path} has no {name} run with this budget)"
        print(f"{name}: {where}")
    return runs


# ---- writing results/ ----------------------------------------------------------------------------------------

def machine() -> dict:
    """What ran it: CPU model, cores, torch threads, and the 1/5/15-minute load average now."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": load}


def test_labels(task: str, budget: Budget) -> list:
    """The labels of the test examples the runs were scored on, in order (for paired tests); on a generation task
    the reference texts (the headlines)."""
    from .generation_tasks import GENERATION_TASKS, load_headline
    from .tasks import load_task

    if task in GENERATION_TASKS:
        return list(load_headline(max_train=1, max_eval=1, max_test=budget.max_test)["test"]["headline"])
    return list(load_task(task, max_train=1, max_eval=1, max_test=budget.max_test)["test"]["label"])


def write_results(results: list[Result], out_dir, command: str, planned: int | None = None,
                  started: dict | None = None, earlier: dict | None = None) -> dict[str, Path]:
    """Write comparison.json into ``out_dir`` and its views (.md, .png, ``report.render_task``); return the paths.

    ``planned``: the number of runs the command was to make; when fewer finished, the files say so.
    ``started``: ``machine()`` when the command began (its load average is recorded next to the one now).
    ``earlier``: a record these runs are added to (``--add``): its runs stay, except a (method, seed) run again;
    its command and machine stay, and this command is listed under ``added``."""
    if not results:
        raise ValueError("no results to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r0, now = results[0], machine()
    status = (f"partial: {len(results)} of {planned} runs finished" if planned is not None and len(results) < planned
              else "complete")
    load = {"start": (started or now)["load_average"], "end": now["load_average"]}
    this = {"command": command, "status": status, "machine": {**now, "load_average": load}}
    record = {**this, "task": r0.task, "budget": r0.budget, "versions": r0.versions,
              "test_labels": test_labels(r0.task, Budget(**r0.budget)), "results": [r.to_dict() for r in results]}
    if earlier is not None:
        rerun = {(r.method, r.seed) for r in results}
        kept = [d for d in earlier["results"] if (d["method"], d["seed"]) not in rerun]
        record = {**earlier, "added": earlier.get("added", []) + [this], "results": kept + record["results"]}
    path = out / "comparison.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    return {"json": path, **render_task(path)}


def load_results(path) -> list[Result]:
    return [Result.from_dict(d) for d in json.loads(Path(path).read_text())["results"]]


def earlier_record(path: Path, task: str, budget: Budget) -> dict | None:
    """The record ``--add`` extends (None if there is none yet); refuse one made with another task or budget,
    whose runs could not be compared with the new ones."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("task") != task or record.get("budget") != asdict(budget):
        raise SystemExit(f"--add: {path} holds task {record.get('task')!r} with budget {record.get('budget')}; "
                         f"this command trains {task!r} with {asdict(budget)}: runs with another budget cannot be "
                         "added to it (choose another --out)")
    return record


QUICK_TASKS, FULL_TASKS, FULL_SEEDS = ["topic"], ["question", "topic"], [0, 1, 2]
FULL_COMMAND = (f"python -m minipeft compare --tasks {' '.join(FULL_TASKS)} --seeds {' '.join(map(str, FULL_SEEDS))} "
                "--out results --quiet")


def main(argv=None) -> list[Result]:
    """The default profile (every method, seed 0, ``topic``, into runs/) is ``make compare``; the committed
    results/ come from ``FULL_COMMAND`` (``make results``)."""
    from .generation_report import generation_table
    from .generation_tasks import GENERATION_TASKS
    from .generation_train import GENERATION_LRS, planned_runs
    from .tasks import TASKS

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minipeft compare",
                                description="train registered methods with one budget on one or more tasks; "
                                            f"results/ is made by: {FULL_COMMAND}")
    all_tasks = sorted(TASKS) + list(GENERATION_TASKS)
    p.add_argument("--tasks", "--task", nargs="+", default=QUICK_TASKS, choices=all_tasks, metavar="TASK",
                   help=f"default: {' '.join(QUICK_TASKS)}; available: {' '.join(all_tasks)} (generation: "
                        f"{' '.join(GENERATION_TASKS)}, with the methods {' '.join(GENERATION_LRS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fast", action="store_true", help="the CI budget (Budget.for_task(task, fast=True)); also MINIPEFT_FAST=1")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"default: the compared methods ({' '.join(in_lesson_order())}); lesson 06's ablations: "
                        f"{' '.join(sorted(set(in_lesson_order(True)) - set(in_lesson_order())))}")
    p.add_argument("--out", default="runs", help="output folder, one sub-folder per task (default runs/)")
    p.add_argument("--add", action="store_true",
                   help="add these runs to <out>/<task>/comparison.json (same budget) instead of replacing it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for task in args.tasks:  # fail before any training
        if task in GENERATION_TASKS:
            wrong = [m for m in args.methods or [] if m not in GENERATION_LRS]
            if wrong:
                p.error(f"method(s) {wrong} cannot run on the generation task {task!r}; allowed there: "
                        f"{list(GENERATION_LRS)}")
        else:
            unknown = [m for m in args.methods or [] if m not in METHODS]
            if unknown:
                p.error(f"unknown method(s) {unknown}; registered methods: {sorted(METHODS)}")
    clash = [(m, t) for m in args.methods or [] for t in args.tasks if m in METHODS and t in METHODS[m].not_for_tasks]
    if clash:
        m, t = clash[0]
        p.error(f"method {m!r} cannot be compared on task {t!r}: it is built from adapters trained on "
                f"{list(METHODS[m].not_for_tasks)}; choose another task")
    budgets = {t: Budget.for_task(t, fast=True if args.fast else None) for t in args.tasks}
    command = "python -m minipeft compare" + ("" if not argv else " " + shlex.join(argv))
    earlier = {t: earlier_record(Path(args.out) / t / "comparison.json", t, budgets[t]) if args.add else None
               for t in args.tasks}  # checked before any training
    started, everything = machine(), []
    for task in args.tasks:
        out, budget, generation = Path(args.out) / task, budgets[task], task in GENERATION_TASKS
        planned = (planned_runs(args.methods, args.seeds) if generation
                   else len(args.methods or in_lesson_order()) * len(args.seeds))
        results = run_comparison(args.methods, task, args.seeds, budget, quiet=args.quiet,
                                 on_result=lambda rs: write_results(rs, out, command, planned, started, earlier[task]))
        paths = write_results(results, out, command, started=started, earlier=earlier[task])
        table = generation_table if generation else markdown_table
        print(f"## {task}\n" + table(results, test_labels(task, budget)))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        everything += results
    return everything
