"""Checks for the course's exercises: one module per lesson (``lesson00``, ``lesson01``, ...).

A check takes the learner's function or module, runs it on fixed inputs against the package's reference,
and either prints one success line (``passed``) or raises ``AssertionError`` saying what is wrong and where
to look. A lesson's checks are named ``check_<what>``; add yours in ``minipeft/course/checks/lessonNN.py`` and
import them in the notebook as ``from minipeft.course.checks.lessonNN import check_...``.
"""
from __future__ import annotations

import numbers

import torch


def passed(name: str, detail: str) -> None:
    """The success line every check prints."""
    print(f"✔ {name}: {detail}")


def fail(name: str, message: str):
    raise AssertionError(f"✘ {name}: {message}")


def explain(got: int, expected: int, terms: dict[str, int]) -> str:
    """Name the term that explains ``got - expected`` (one missing or extra term), if any does."""
    diff = got - expected
    for what, n in terms.items():
        if n and diff == -n:
            return f" The difference ({diff:+,}) is exactly {what}: did you leave it out?"
        if n and diff == n:
            return f" The difference ({diff:+,}) is exactly {what}: it should not be there."
    return ""


def call(name: str, fn, *args, hint: str = "", **kwargs):
    """Call the learner's function; NotImplementedError passes through, other errors are explained (+ ``hint``)."""
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
        said = f"calling it raised {type(e).__name__}: {e}"
        fail(name, f"{said.rstrip('.')}. {hint}" if hint else said)


def need_int(name: str, got, where: str) -> None:
    """A count must be an integer: a float fails even when its value is right (22713216.0)."""
    if isinstance(got, numbers.Integral) and not isinstance(got, bool):
        return
    fix = "not a float; use // not /" if isinstance(got, float) else f"not {type(got).__name__}"
    fail(name, f"gave {got!r} {where}: return an integer count (int), {fix}.")


def max_error(got: torch.Tensor, want: torch.Tensor) -> str:
    """The largest deviation, or how many values are nan/inf (a "max error nan" tells the learner nothing)."""
    bad = int((~torch.isfinite(got)).sum())
    if bad:
        return f"{bad} of {got.numel()} values are nan or inf"
    return f"max error {(got.double() - want.double()).abs().max():.3g}"


def name_the_mistake(name: str, got: torch.Tensor, mistakes: dict, atol: float = 1e-5) -> None:
    """Fail with the hint of the first plausible mistake (hint -> what it computes) that ``got`` equals."""
    for hint, wrong in mistakes.items():
        if wrong.shape == got.shape and torch.allclose(got, wrong, atol=atol):
            fail(name, hint + ".")
