"""Lesson 08's checks accept the solution notebook's own functions (and other right answers), reject each usual
mistake with a message that names it, and the unfilled exercise stops with NotImplementedError."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from minipeft.course.checks.lesson08 import (check_discordant_rate, check_examples_needed, check_mcnemar_p,
                                             check_training_state_mb)
from checking import assert_passes, assert_rejects, assert_unfilled_stops
from helpers import notebook_functions

NAME = "08_comparison.ipynb"
PRELUDE = "import math\nimport numpy as np\nfrom statistics import NormalDist"


def function_from(folder: str, name: str):
    """The function ``name`` defined in a notebook of ``folder`` (solutions/ or exercises/), executed alone."""
    return notebook_functions(NAME, folder, [name], PRELUDE)[name]


CHECKS = {"mcnemar_p": check_mcnemar_p, "training_state_mb": check_training_state_mb,
          "examples_needed": check_examples_needed, "discordant_rate": check_discordant_rate}


@pytest.mark.parametrize("name", CHECKS)
def test_the_solution_passes(name, capsys):
    assert f"✔ {name}:" in assert_passes(capsys, (CHECKS[name], function_from("solutions", name)))


@pytest.mark.parametrize("name", CHECKS)
def test_the_unfilled_exercise_stops_with_not_implemented(name):
    assert_unfilled_stops(CHECKS[name], exercise=function_from("exercises", name))


# ---- 1. McNemar -------------------------------------------------------------------------------------------------

def tail(k, n):
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n if k >= 0 else 0.0


def counts(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())


def mcnemar(kind="exact"):
    """An exact McNemar p with one deliberate mistake (the default is the right answer)."""
    def fn(a, b):
        nb, nc = counts(a, b)
        n, k = nb + nc, min(nb, nc)
        if kind == "one_sided":
            return tail(k, n)
        if kind == "not_clipped":
            return 2 * tail(k, n)
        if kind in ("chi2", "chi2_corrected"):
            z = (abs(nb - nc) - (kind == "chi2_corrected")) / math.sqrt(n)
            return math.erfc(max(z, 0) / math.sqrt(2))
        if kind == "point":
            return min(1.0, 2 * math.comb(n, k) / 2**n)
        if kind == "strict":
            return min(1.0, 2 * tail(k - 1, n))
        if kind == "upper":
            return min(1.0, 2 * (1 - tail(k - 1, n)))
        if kind == "used_b":
            return min(1.0, 2 * tail(nb, n))
        if kind == "all_examples":
            return min(1.0, 2 * tail(k, np.size(a)))
        return min(1.0, 2 * tail(k, n))
    return fn


def concordant(a, b):
    a, b = np.asarray(a), np.asarray(b)
    both, neither = int(((a == 1) & (b == 1)).sum()), int(((a == 0) & (b == 0)).sum())
    n = both + neither
    return min(1.0, 2 * tail(min(both, neither), n))


def marginals(a, b):
    na, nb = int(np.sum(a)), int(np.sum(b))
    return min(1.0, 2 * tail(min(na, nb), na + nb))


def per_seed_mean(a, b):
    return float(np.mean([mcnemar()(r, s) for r, s in zip(np.atleast_2d(a), np.atleast_2d(b))]))


def first_seed(a, b):
    return mcnemar()(np.atleast_2d(a)[0], np.atleast_2d(b)[0])


def test_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_mcnemar_p, lambda a, b: mcnemar()(b, a)),  # b and c swapped: the test is symmetric
                  (check_mcnemar_p, lambda a, b: np.float64(mcnemar()(a, b))))


@pytest.mark.parametrize("wrong, message", [
    (mcnemar("one_sided"), "half the answer: a one-sided p"),
    (mcnemar("not_clipped"), "above 1.* clip it"),
    (mcnemar("chi2"), "chi-square \\(normal\\) approximation"),
    (mcnemar("chi2_corrected"), "continuity correction"),
    (mcnemar("point"), "one term only"),
    (mcnemar("strict"), "with ≤, not <"),
    (mcnemar("upper"), "the wrong tail"),
    (mcnemar("used_b"), "taken at b whatever its size"),
    (mcnemar("all_examples"), "not Binomial\\(N, 1/2\\)"),
    (concordant, "those are the concordant counts"),
    (marginals, "ignores the pairing"),
    (per_seed_mean, "mean of one p-value per seed"),
    (first_seed, "only the first seed"),
    (lambda a, b: counts(a, b) + (mcnemar()(a, b),), "return one number"),
    (lambda a, b: 0.5, "Count b = #\\(A right, B wrong\\)"),
])
def test_mcnemar_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_mcnemar_p, wrong, message=message)


def test_mcnemar_says_what_p_is_without_discordant_pairs():
    def unguarded(a, b):
        nb, nc = counts(a, b)
        assert nb + nc >= 0 and min(nb, nc) / (nb + nc) >= 0  # divides by b + c
        return mcnemar()(a, b)

    def zero(a, b):
        return mcnemar()(a, b) if sum(counts(a, b)) else 0.0

    assert_rejects(check_mcnemar_p, unguarded, message="ZeroDivisionError.*never discordant \\(b \\+ c = 0\\)")
    assert_rejects(check_mcnemar_p, zero, message="nothing tells them apart, so p = 1")


def test_the_small_case_tells_exact_from_approximate():
    """b = 1, c = 6: exact 0.125, chi-square 0.059, with continuity correction 0.131."""
    a, b = np.array([1] + [0] * 6 + [1] * 5), np.array([0] + [1] * 6 + [1] * 5)
    assert mcnemar()(a, b) == pytest.approx(0.125)
    assert mcnemar("chi2")(a, b) == pytest.approx(0.0588, abs=1e-4)
    assert mcnemar("chi2_corrected")(a, b) == pytest.approx(0.1306, abs=1e-4)


# ---- 2. memory --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, message", [
    (lambda n, t: 4 * (3 * n + t) / 2**20, "moments are counted for every parameter"),
    (lambda n, t: 16 * n / 2**20, "as if everything were trained"),
    (lambda n, t: 4 * (n + 2 * t) / 2**20, "counted twice instead of three times"),
    (lambda n, t: 4 * ((n - t) + 3 * t) / 2**20, "counted twice instead of three times"),
    (lambda n, t: 4 * (n + 4 * t) / 2**20, "trainable weights are counted twice"),
    (lambda n, t: 12 * t / 2**20, "only the trainable state"),
    (lambda n, t: 4 * n / 2**20, "the weights alone"),
    (lambda n, t: 4 * (n + 3 * t) / 1e6, "MB \\(10\\^6 bytes\\)"),
    (lambda n, t: 2 * (n + 3 * t) / 2**20, "2 bytes per value"),
    (lambda n, t: 32 * (n + 3 * t) / 2**20, "bits of an fp32 number"),
    (lambda n, t: 4 * (n + 3 * t), "that is in bytes"),
    (lambda n, t: 4 * (n + 3 * t) / 2**30, "GiB"),
    (lambda n, t: None, "return one number"),
    (lambda n, t: 4 * (n + 3 * t) / 2**20 + 1, "divide the bytes by 2\\^20"),
])
def test_memory_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_training_state_mb, wrong, message=message)


def test_memory_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_training_state_mb, lambda n, t: (4 * n + 4 * t + 8 * t) / 1024 / 1024))


# ---- 3. examples needed -----------------------------------------------------------------------------------------

z = NormalDist().inv_cdf


def needed(kind="right"):
    def fn(q, delta, alpha=0.05, power=0.80):
        za, zb = z(1 - alpha / 2), z(power)
        return {"right": (za + zb) ** 2 * q / delta**2,
                "rounded": math.ceil((1.96 + 0.84) ** 2 * q / delta**2),
                "hardcoded": 7.85 * q / delta**2,
                "one_sided": (z(1 - alpha) + zb) ** 2 * q / delta**2,
                "no_power": za**2 * q / delta**2,
                "sum_squares": (za**2 + zb**2) * q / delta**2,
                "not_squared": (za + zb) * q / delta**2,
                "wrong_sign": (za + z(1 - power)) ** 2 * q / delta**2,
                "lower_alpha": (z(alpha / 2) + zb) ** 2 * q / delta**2,
                "delta_linear": (za + zb) ** 2 * q / delta,
                "q_squared": (za + zb) ** 2 * q**2 / delta**2,
                "doubled": 2 * (za + zb) ** 2 * q / delta**2}[kind]
    return fn


def test_needed_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_examples_needed, needed()), (
        check_examples_needed, lambda q, d, alpha=0.05, power=0.8: math.ceil(needed()(q, d, alpha, power))), (
        # Connor (1987): the variance under the alternative is q − δ² (within 1% here)
        check_examples_needed, lambda q, d, alpha=0.05, power=0.8:
        (z(1 - alpha / 2) * math.sqrt(q) + z(power) * math.sqrt(q - d * d)) ** 2 / d**2))


def test_needed_rounded_z_passes_with_default_arguments_only():
    assert_rejects(check_examples_needed, needed("rounded"), message="whatever alpha and power are")


@pytest.mark.parametrize("kind, message", [
    ("hardcoded", "whatever alpha and power are"),
    ("one_sided", "one-sided, 1.645"),
    ("no_power", "leaves out z_β"),
    ("sum_squares", "added first, then squared"),
    ("not_squared", "is not squared: n = "),
    ("wrong_sign", "wrong sign"),
    ("lower_alpha", "wrong sign"),
    ("delta_linear", "δ is not squared"),
    ("q_squared", "q is squared"),
    ("doubled", "two independent samples"),
])
def test_needed_rejects_plausible_mistakes(kind, message):
    assert_rejects(check_examples_needed, needed(kind), message=message)


def test_needed_says_how_it_is_called():
    assert_rejects(check_examples_needed, lambda q, delta: needed()(q, delta),
                   message="TypeError.*alpha=..., power=...")


# ---- the discordant rate ----------------------------------------------------------------------------------------

def right(p, y):
    return np.asarray(p) == np.asarray(y)


@pytest.mark.parametrize("wrong, message", [
    (lambda a, b, y: float((np.asarray(a) != np.asarray(b)).mean()), "the two \\*predictions\\* differ"),
    (lambda a, b, y: float((np.asarray(a) == np.asarray(b)).mean()), "the predictions agree"),
    (lambda a, b, y: float((right(a, y) == right(b, y)).mean()), "concordant fraction"),
    (lambda a, b, y: float((right(a, y) & ~right(b, y)).mean()), "only one direction"),
    (lambda a, b, y: abs(float(right(a, y).mean() - right(b, y).mean())), "accuracy difference"),
    (lambda a, b, y: int((right(a, y) != right(b, y)).sum()), "that is the count b \\+ c"),
    (lambda a, b, y: (right(a, y) != right(b, y)).sum() / len(y), "divided by the number of examples only"),
    (lambda a, b, y: float((np.atleast_2d(right(a, y))[0] != np.atleast_2d(right(b, y))[0]).mean()),
     "only the first seed"),
])
def test_discordant_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_discordant_rate, wrong, message=message)


def test_discordant_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_discordant_rate, lambda a, b, y: np.mean(np.logical_xor(right(a, y), right(b, y)))))
