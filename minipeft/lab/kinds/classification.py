"""The classification kind: a head on the encoder's pooled states, cross-entropy, accuracy, McNemar's paired test.

Tasks: ``minipeft.lab.tasks.TASKS``; methods: every registered recipe (``minipeft.core.RECIPES``); training:
``minipeft.lab.train.train`` (its loss ``classification_loss`` in the one loop); table and plot:
``minipeft.lab.report``.
"""
from __future__ import annotations

from ...api import apply_recipe
from ...core import RECIPES, Recipe, get_recipe, in_lesson_order
from ..train import Budget, SequenceClassifier, is_fast, seed_everything, train
from . import Kind, register_kind, run_each


def tasks() -> list[str]:
    from ..tasks import TASKS

    return sorted(TASKS)


def check_methods(methods, task: str) -> None:
    """Registered methods only, and none on a task it must not be compared on (``Recipe.not_for_tasks``: fusion's
    source adapters were trained on those tasks, so it would be no transfer)."""
    unknown = [m for m in methods if isinstance(m, str) and m not in RECIPES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered methods: {sorted(RECIPES)}")
    for spec in (RECIPES[m] if isinstance(m, str) else m for m in methods):
        if task in spec.not_for_tasks:
            raise ValueError(f"method {spec.name!r} cannot run on task {task!r}: it is built from adapters "
                             f"trained on {list(spec.not_for_tasks)}, no transfer on their own tasks; choose "
                             "another task")


def budget(fast: bool | None = None) -> Budget:
    fast = is_fast() if fast is None else fast
    return Budget.fast() if fast else Budget.lesson()


def build_classifier(spec: Recipe | str, task: str = "sentiment", seed: int = 0, encoder=None,
                     size=None) -> SequenceClassifier:
    """Seed, load the pretrained encoder (or use ``encoder``), add a head for ``task``, apply the recipe (its
    adapter at ``size`` on the recipe's knob, default the knob's default)."""
    from ...backbones.encoder import Encoder
    from ..tasks import TASKS

    spec = get_recipe(spec) if isinstance(spec, str) else spec
    if task not in TASKS:  # a classifier needs a classification task
        raise ValueError(f"unknown task {task!r}; available tasks: {sorted(TASKS)}")
    check_methods([spec], task)
    seed_everything(seed)
    model = SequenceClassifier(encoder or Encoder.from_pretrained(), num_labels=len(TASKS[task].label_names))
    return apply_recipe(model, spec, size)


def run(methods, task: str, seeds, budget: Budget | None, quiet: bool, on_result) -> list:
    """Each method (the compared ones by default) once per seed with the same budget."""
    budget = budget or Budget.from_env()

    def make(spec, seed):
        return lambda: train(build_classifier(spec, task, seed), task, spec.lr, budget, seed=seed,
                             method=spec.name, config=spec.config, quiet=quiet)

    jobs = [(f"{spec.name} seed {seed}", make(spec, seed))
            for spec in [get_recipe(m) for m in (methods or in_lesson_order())] for seed in seeds]
    return run_each(jobs, lambda r: f"test acc {r.test_acc:.3f}, {r.trainable_pct:.3g}% trained, "
                                    f"{r.sec_per_step:.2f} s/step", on_result, quiet)


def planned(methods, seeds) -> int:
    return len(methods or in_lesson_order()) * len(seeds)


def references(task: str, budget: Budget) -> list:
    """The labels of the test examples, in order (for paired tests)."""
    from ..tasks import load_task

    return list(load_task(task, max_train=1, max_eval=1, max_test=budget.max_test)["test"]["label"])


def table(results, labels) -> str:
    from ..report import markdown_table

    return markdown_table(results, labels)


def render(path):
    from ..report import render_classification

    return render_classification(path)


KIND = register_kind(Kind("classification", tasks, lambda: in_lesson_order(), check_methods, budget, run, planned,
                          references, table, render))
