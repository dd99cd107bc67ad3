"""The comparison harness: every registered method, one shared budget, each task -> one folder of results.

    python -m minipeft compare [--tasks topic] [--seeds 0] [--fast] [--methods full head] [--out runs]

writes, per task, ``<out>/<task>/comparison.json`` (every Result, the test labels, the machine and its load
average, versions, the command), ``comparison.md`` (the table of ``minipeft.lab.report``: mean and 95% interval
over seeds, paired test against full fine-tuning) and ``comparison.png`` (accuracy vs % of the backbone trained).

The methods are the recipes their own files register (``minipeft.core.Recipe``), e.g. in ``methods/lora.py``::

    register_recipe(Recipe.adapter("lora", lesson="02", lr=2e-3, make=lambda r: LoRAConfig(r=r, alpha=2 * r),
                                   knob=Knob("rank r", (1, 2, 4, 8, 16), 8), description="LoRA (Hu et al. 2021)"))

``build_model`` is the one builder of task models: lessons, this harness and the tests use it, so the same
method, task and seed give the same numbers everywhere.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ..core import Recipe, get_recipe, in_lesson_order
from .kinds import all_tasks, check_runs, kind_of, render_task
from .kinds.classification import build_classifier
from .records import check_output_dir, read_json, read_record, write_json
from .train import Budget, Result, SequenceClassifier, train



def build_model(spec: Recipe | str, task: str = "sentiment", seed: int = 0, encoder=None,
                size=None) -> SequenceClassifier:
    """Seed, load the pretrained encoder (or use ``encoder``), add a head for ``task``, apply the recipe (its
    adapter at ``size`` on the recipe's knob, default the knob's default): ``kinds.classification``'s builder."""
    return build_classifier(spec, task, seed, encoder, size)


HEAD_FILE = "head.safetensors"  # a saved task adapter's head, beside the adapter's own files


def trained_adapters(directory, recipe: str, tasks, budget: Budget | None = None, seed: int = 0,
                     quiet: bool = True) -> dict[str, dict]:
    """``recipe`` trained on each task and saved to ``directory/<task>/``: the adapter, its head (``HEAD_FILE``) and
    ``scores.json`` (test and validation accuracy, test predictions); a task saved there is read, not retrained.
    Returns {task: scores}, each adapter on its own task, alone (AdapterFusion's sources, lesson 12's tasks)."""
    from safetensors.torch import save_file

    from ..api import save_adapter

    directory, budget, spec = Path(directory), budget or Budget.lesson(), get_recipe(recipe)
    for task in tasks:
        folder = directory / task
        if not (folder / "scores.json").exists():
            model = build_model(spec, task, seed)
            r = train(model, task, spec.lr, budget, seed=seed, method=recipe, config=spec.config, quiet=quiet)
            save_adapter(model, recipe, folder)
            save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(folder / HEAD_FILE))
            write_json(folder / "scores.json", {"test_acc": r.test_acc, "val_acc": r.val_acc[-1], "budget": r.budget,
                                                "seed": seed, "train_seconds": r.train_seconds,
                                                "test_predictions": r.test_predictions})
    return {task: read_json(directory / task / "scores.json") for task in tasks}


def run_comparison(methods=None, task: str = "sentiment", seeds=(0,), budget: Budget | None = None,
                   quiet: bool = False, on_result: Callable[[list[Result]], None] | None = None) -> list[Result]:
    """Train each method (all the task kind compares by default) once per seed with the same budget.

    ``on_result(results_so_far)`` is called after each run (``main`` writes the files then, so a crash or an
    interrupt keeps what finished)."""
    return kind_of(task).run(methods, task, seeds, budget, quiet, on_result)


def recorded_runs(methods=("full", "head"), task: str = "sentiment", budget: Budget | None = None,
                  results_dir="results", quiet: bool = True) -> dict[str, list[Result]]:
    """Runs of registered ``methods`` on ``task``, by seed: read from ``<results_dir>/<task>/comparison.json`` when
    it holds them with this budget (every recorded seed), else trained here through ``build_model`` (seed 0).

    Lessons read their baselines this way instead of retraining them; it prints where each came from."""
    budget = budget or Budget.from_env()
    path = Path(results_dir) / task / "comparison.json"
    recorded: dict[str, list[Result]] = {}
    if path.exists():
        record = read_record(path)
        if record["budget"] == asdict(budget):
            for d in record["results"]:
                recorded.setdefault(d["method"], []).append(Result.from_dict(d))
    runs = {}
    for name in methods:
        if name in recorded:
            runs[name] = sorted(recorded[name], key=lambda r: r.seed)
            where = f"read from {path} (seeds {[r.seed for r in runs[name]]})"
        else:
            spec = get_recipe(name)
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
    """The references of the test examples the runs were scored on, in order (for paired tests): the labels, or
    on a generation task the reference texts (``Kind.references``)."""
    return kind_of(task).references(task, budget)


def write_results(results: list[Result], out_dir, command: str, planned: int | None = None,
                  started: dict | None = None, earlier: dict | None = None) -> dict[str, Path]:
    """Write comparison.json into ``out_dir`` and its views (.md, .png, ``kinds.render_task``); return the paths.

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
    path = write_json(out / "comparison.json", record)  # whole or not at all: a reader never sees half a file
    return {"json": path, **render_task(path)}


def load_results(path) -> list[Result]:
    return [Result.from_dict(d) for d in read_record(path)["results"]]


def earlier_record(path: Path, task: str, budget: Budget) -> dict | None:
    """The record ``--add`` extends (None if there is none yet); ``ValueError`` for one that cannot be read or was
    made with another task or budget (its runs could not be compared with the new ones)."""
    if not path.exists():
        return None
    record = read_record(path)
    if record["task"] != task or record["budget"] != asdict(budget):
        raise ValueError(f"--add: {path} holds task {record['task']!r} with budget {record['budget']}; this "
                         f"command trains {task!r} with {asdict(budget)}: runs with another budget cannot be added "
                         "to it (choose another --out)")
    return record


RECORD_FILES = ("comparison.json", "comparison.md", "comparison.png")  # what write_results writes per task


class Once(argparse.Action):
    """An option given at most once, its values without repeats: ``--seeds 0 --seeds 1`` would silently run seed
    1 only, ``--seeds 0 0`` seed 0 twice (one run replacing the other in the record)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, "_given_" + self.dest, False):
            parser.error(f"argument {'/'.join(self.option_strings)}: given twice; list all its values after one "
                         f"{option_string}")
        setattr(namespace, "_given_" + self.dest, True)
        if isinstance(values, list):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                parser.error(f"argument {option_string}: {repeated} given more than once; each is run once, "
                             "list it once")
        setattr(namespace, self.dest, values)


QUICK_TASKS, FULL_TASKS, FULL_SEEDS = ["topic"], ["question", "topic"], [0, 1, 2]
FULL_COMMAND = (f"python -m minipeft compare --tasks {' '.join(FULL_TASKS)} --seeds {' '.join(map(str, FULL_SEEDS))} "
                "--out results --quiet")


def main(argv=None) -> list[Result]:
    """The default profile (every method, seed 0, ``topic``, into runs/) is ``make compare``; the committed
    results/ come from ``FULL_COMMAND`` (``make results``)."""
    from .kinds import KINDS

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m minipeft compare",
                                description="train registered methods with one budget on one or more tasks; "
                                            f"results/ is made by: {FULL_COMMAND}")
    tasks = all_tasks()
    by_kind = "; ".join(f"{k.name}: {' '.join(k.tasks())}, with the methods {' '.join(k.methods())}"
                        for k in KINDS.values() if k.methods() != in_lesson_order())
    p.add_argument("--tasks", "--task", nargs="+", default=QUICK_TASKS, choices=tasks, metavar="TASK",
                   action=Once,
                   help=f"default: {' '.join(QUICK_TASKS)}; available: {' '.join(tasks)} ({by_kind})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], action=Once)
    p.add_argument("--fast", action="store_true", help="the CI budget (kind_of(task).budget(fast=True)); also MINIPEFT_FAST=1")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME", action=Once,
                   help=f"default: the compared methods ({' '.join(in_lesson_order())}); lesson 06's ablations: "
                        f"{' '.join(sorted(set(in_lesson_order(True)) - set(in_lesson_order())))}")
    p.add_argument("--out", default="runs", action=Once, help="output folder, one sub-folder per task (default runs/)")
    p.add_argument("--add", action="store_true",
                   help="add these runs to <out>/<task>/comparison.json (same budget) instead of replacing it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:  # every check before any training; a refused command leaves the files as they were
        check_runs(args.methods or [], args.tasks)
    except ValueError as e:
        p.error(str(e))
    budgets = {t: kind_of(t).budget(True if args.fast else None) for t in args.tasks}
    command = "python -m minipeft compare" + ("" if not argv else " " + shlex.join(argv))
    try:
        for task in args.tasks:
            check_output_dir(Path(args.out) / task, RECORD_FILES)
        earlier = {t: earlier_record(Path(args.out) / t / "comparison.json", t, budgets[t]) if args.add else None
                   for t in args.tasks}
    except ValueError as e:
        sys.exit(f"error: {e}")
    started, everything = machine(), []
    for task in args.tasks:
        out, budget, kind = Path(args.out) / task, budgets[task], kind_of(task)
        planned = kind.planned(args.methods, args.seeds)
        results = run_comparison(args.methods, task, args.seeds, budget, quiet=args.quiet,
                                 on_result=lambda rs: write_results(rs, out, command, planned, started, earlier[task]))
        paths = write_results(results, out, command, started=started, earlier=earlier[task])
        print(f"## {task}\n" + kind.table(results, test_labels(task, budget)))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        everything += results
    return everything
