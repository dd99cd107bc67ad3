"""Task kinds: what differs between a classification task and a generation task, one file per kind.

    kind = kind_of("topic")          # the Kind whose tasks include "topic" (classification)
    kind.budget(fast=False), kind.run(methods, task, seeds, budget, quiet, on_result), kind.table(results, refs)

A kind states its tasks, the methods it compares and how it checks them, its budgets, how a comparison runs
(the model built around the backbone, its batches and loss, through the one loop ``minipeft.lab.train.run_epochs``),
the test references its predictions are scored against (paired tests), and its record's table and plot.
compare, report, transfer and the CLI ask ``kind_of(task)``; nothing else tests a task's name. A new kind is one
file here that calls ``register_kind``: importing this package imports every file in it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Kind:
    name: str
    tasks: Callable[[], list[str]]                  # the kind's task names
    methods: Callable[[], list[str]]                # the methods compared by default, in the course's order
    check_methods: Callable[[list, str], None]      # ValueError for a method that cannot run on the task
    budget: Callable[[bool], object]                # the Budget, fast (CI) or not
    run: Callable                                   # (methods, task, seeds, budget, quiet, on_result) -> [Result]
    planned: Callable[[list | None, list], int]     # how many runs ``run`` makes for (methods, seeds)
    references: Callable[[str, object], list]       # the test split's labels / reference texts (task, budget)
    table: Callable[[list, list], str]              # markdown table of the results (results, references)
    render: Callable                                # comparison.json path -> {"md": path, "png": path}


KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def all_tasks() -> list[str]:
    return [t for kind in KINDS.values() for t in kind.tasks()]


def kind_of(task: str) -> Kind:
    """The kind ``task`` belongs to; ValueError naming every task for an unknown one."""
    for kind in KINDS.values():
        if task in kind.tasks():
            return kind
    raise ValueError(f"unknown task {task!r}; available tasks: {all_tasks()}")


def run_each(jobs, line, on_result=None, quiet: bool = False) -> list:
    """Run ``jobs`` ((label, make): ``make()`` trains and returns one Result) in turn, the same way for every kind:
    ``on_result(results_so_far)`` after each run (``compare.main`` writes its files then), and unless ``quiet`` a
    line "<label>: <line(result)>"."""
    results = []
    for label, make in jobs:
        results.append(make())
        if on_result is not None:
            on_result(results)
        if not quiet:
            print(f"{label}: {line(results[-1])}", flush=True)
    return results


def render_task(path) -> dict:
    """The views of one task's ``comparison.json``: ``comparison.md`` (table + how it was made) and
    ``comparison.png`` next to it, as the task's kind draws them; returns their paths. The json is the record;
    these are remade from it."""
    from pathlib import Path

    from ..records import read_record

    return kind_of(read_record(path)["task"]).render(Path(path))


def check_runs(methods, tasks) -> None:
    """Refuse, before any model is built, a run that cannot be made: an unknown task, or a method its task's kind
    does not run (``Kind.check_methods``). ``methods``: names or recipes. The one check of (method, task) pairs:
    compare, train (``distributed.main``), transfer and the builders."""
    for task in tasks:
        kind_of(task).check_methods(list(methods), task)


def _register_every_kind() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):  # classification, generation, ...: each registers its kind
        importlib.import_module(f"{__name__}.{module.name}")


_register_every_kind()
