"""The generation kind: the decoder with an adapter, the masked conditional LM loss, ROUGE, a paired test on
per-example ROUGE-L against zero-shot.

Tasks: ``minipeft.lab.generation_tasks.GENERATION_TASKS``; methods: ``GENERATION_LRS``; training and the
comparison: ``minipeft.lab.generation_train`` (its loss ``lm_loss`` in the one loop); table and plot:
``minipeft.lab.generation_report``.
"""
from __future__ import annotations

from ..train import Budget
from . import Kind, register_kind


def tasks() -> list[str]:
    from ..generation_tasks import GENERATION_TASKS

    return list(GENERATION_TASKS)


def methods() -> list[str]:
    from ..generation_train import GENERATION_LRS

    return list(GENERATION_LRS)


def check_methods(names, task: str) -> None:
    wrong = [m if isinstance(m, str) else m.name for m in names]
    wrong = [m for m in wrong if m not in methods()]
    if wrong:
        raise ValueError(f"method(s) {wrong} cannot run on the generation task {task!r}; allowed there: "
                         f"{methods()}")


def budget(fast: bool | None = None) -> Budget:
    return Budget.for_generation(fast)


def run(names, task: str, seeds, budget: Budget | None, quiet: bool, on_result) -> list:
    from ..generation_train import run_generation_comparison

    return run_generation_comparison(names, task, seeds, budget, quiet, on_result)


def planned(names, seeds) -> int:
    from ..generation_train import planned_runs

    return planned_runs(names, seeds)


def references(task: str, budget: Budget) -> list:
    """The reference headlines of the test split, in order (for paired tests)."""
    from ..generation_tasks import load_headline

    return list(load_headline(max_train=1, max_eval=1, max_test=budget.max_test)["test"]["headline"])


def table(results, references) -> str:
    from ..generation_report import generation_table

    return generation_table(results, references)


def render(path):
    from ..generation_report import render_generation

    return render_generation(path)


KIND = register_kind(Kind("generation", tasks, methods, check_methods, budget, run, planned, references, table,
                          render))
