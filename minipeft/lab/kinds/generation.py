"""The generation kind: the decoder with an adapter, the masked conditional LM loss, ROUGE, a paired test on
per-example ROUGE-L against zero-shot.

Tasks: ``minipeft.lab.generation_tasks.GENERATION_TASKS``; methods: ``GENERATION_LRS``; training:
``minipeft.lab.generation_train`` (its loss ``lm_loss`` in the one loop); table and plot:
``minipeft.lab.generation_report``.
"""
from __future__ import annotations

from ..train import Budget
from . import Kind, register_kind, run_each


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


def seeds_of(method: str, seeds) -> list[int]:
    """The seeds ``method`` is run with: zero-shot decodes greedily and trains nothing, so one run (the first
    seed) stands for every seed; the others run every seed."""
    from ..generation_train import GENERATION_LRS

    return list(seeds)[:1] if GENERATION_LRS[method] is None else list(seeds)


def run(names, task: str, seeds, budget: Budget | None, quiet: bool, on_result) -> list:
    """Each method (all of ``GENERATION_LRS`` by default) per seed (``seeds_of``) with one budget."""
    from ...core import get_recipe
    from ..generation_train import GENERATION_LRS, build_lm, train_lm

    budget = budget or Budget.for_generation()

    def make(name, seed):
        config = {} if GENERATION_LRS[name] is None else get_recipe(name).config
        return lambda: train_lm(build_lm(name, seed), task, GENERATION_LRS[name], budget, seed, name, config, quiet)

    jobs = [(f"{name} seed {seed}", make(name, seed)) for name in names or methods() for seed in seeds_of(name, seeds)]
    return run_each(jobs, lambda r: f"test ROUGE-L {100 * r.test_acc:.1f}, {r.trainable_pct:.3g}% trained, "
                                    f"{r.sec_per_step:.1f} s/step, {r.train_seconds:.0f} s", on_result, quiet)


def planned(names, seeds) -> int:
    return sum(len(seeds_of(m, seeds)) for m in names or methods())


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
