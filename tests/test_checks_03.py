"""Lesson 03 checks accept the right answers and reject the plausible wrong ones with a useful message."""
import math

import pytest
import torch

from minipeft.course.checks.lesson03 import (BEST_N_CASES, check_best_n, check_compacter_count, check_kron_sum,
                                             check_low_rank_B, phm_weights, reference_best_n)
from minipeft.methods.compacter import compacter_count, paper_compacter_count, paper_phm_adapter_count
from minipeft.methods.phm import PHMLinear
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def kron_sum_right(A, B):
    return sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))


def test_kron_sum_accepts_the_loop_and_einsum(capsys):
    assert "✔ kron_sum" in assert_passes(capsys, (check_kron_sum, kron_sum_right), (
        check_kron_sum, lambda A, B: torch.einsum("iac,ibe->abce", A, B).reshape(A.shape[0] * B.shape[1], -1)))


@pytest.mark.parametrize("wrong,message", [
    (lambda A, B: sum(torch.kron(B[i], A[i]) for i in range(A.shape[0])), "B_i ⊗ A_i: the Kronecker product does not commute"),
    (lambda A, B: torch.kron(A[0], B[0]), r"only A_1 ⊗ B_1: W is the \*sum\*"),
    (lambda A, B: [W := torch.kron(A[i], B[i]) for i in range(A.shape[0])][-1], "overwrite W"),
    (lambda A, B: kron_sum_right(A, B) / A.shape[0], "mean of the n products"),
    (lambda A, B: torch.stack([torch.kron(A[i], B[i]) for i in range(A.shape[0])]), r"side by side. W is their \*sum\*"),
    (lambda A, B: A.sum(0), r"returned shape \(2, 2\)"),
    (lambda A, B: "W", "should return a torch.Tensor"),
    (lambda A, B: 1 / 0, "raised ZeroDivisionError"),
    (lambda A, B: sum(torch.kron(A[i], B[i].T) for i in range(A.shape[0])), "view size.*each used as it is"),
    (lambda A, B: sum(torch.kron(A[i], B[i].T.contiguous()) for i in range(A.shape[0])), r"\(n·q, n·p\), transposed"),
    (lambda A, B: sum(torch.kron(A[i].T.contiguous(), B[i]) for i in range(A.shape[0])), "A_i looks transposed"),
    (lambda A, B: sum(torch.kron(A[:, i].contiguous(), B[i]) for i in range(A.shape[0])), "wrong axis of A"),
    (lambda A, B: kron_sum_right(A, B) + 1, "check the order")])
def test_kron_sum_rejects(wrong, message):
    assert_rejects(check_kron_sum, wrong, message=message)


def test_unfilled_exercise_raises_not_implemented():
    assert_unfilled_stops(check_kron_sum, check_low_rank_B, check_compacter_count, check_best_n)


def test_low_rank_B_accepts(capsys):
    assert "✔ low_rank_B" in assert_passes(capsys, (check_low_rank_B, lambda s, t: s @ t.transpose(-1, -2)),
                                           (check_low_rank_B, lambda s, t: torch.einsum("ipr,iqr->ipq", s, t)))


@pytest.mark.parametrize("wrong,message", [
    (lambda s, t: t @ s.transpose(-1, -2), r"that is t_i s_iᵀ = B_iᵀ"),
    (lambda s, t: s[..., :1] @ t[..., :1].transpose(-1, -2), "only the first of the r columns"),
    (lambda s, t: s @ t.transpose(-1, -2) / s.shape[-1], "divided by r"),
    (lambda s, t: s.transpose(-1, -2) @ t, "calling it raised RuntimeError"),
    (lambda s, t: s * t.transpose(-1, -2), "raised RuntimeError.*matrix product that sums over the r columns"),
    # right unless p == q: the check itself used to crash there (a hint that could not be computed)
    (lambda s, t: s @ t.mT if s.shape[1] != t.shape[1] else t @ s.mT, r"that is t_i s_iᵀ = B_iᵀ"),
    (lambda s, t: s.sum(-1), "returned shape"),
    (lambda s, t: s @ t.transpose(-1, -2) + 1, "B_i = s_i t_iᵀ: for each i")])
def test_low_rank_B_rejects(wrong, message):
    assert_rejects(check_low_rank_B, wrong, message=message)


def test_compacter_count_accepts(capsys):
    assert "57,088" in assert_passes(capsys, (check_compacter_count, compacter_count))


@pytest.mark.parametrize("wrong, message", [
    (paper_compacter_count, r"the biases .* did you leave it out"),  # the paper's count has no biases
    (lambda d, L, k, n: compacter_count(d, L, k, n) - n ** 3, r"the shared A \(n³, stored once\).*leave it out"),
    (lambda d, L, k, n: compacter_count(d, L, k, n) + 4 * L * n ** 3 - n ** 3, "one copy of A per PHM layer"),
    (lambda d, L, k, n: compacter_count(d, L, k, n, sites=1), "one of the two adapters per layer"),
    (lambda d, L, k, n: float(compacter_count(d, L, k, n)),  # n·(d/n + k/n) is a float
     "return an integer count \\(int\\), not a float; use // not /"),
    (lambda d, L, k, n: paper_phm_adapter_count(d, L, k, n) + 2 * L * (k + d), "PHM-Adapter's count"),
])
def test_compacter_count_rejects(wrong, message):
    assert_rejects(check_compacter_count, wrong, message=message)


# ---- best_n ------------------------------------------------------------------------------------------------

def divisors(d, k):
    return [n for n in range(1, min(d, k) + 1) if d % n == 0 and k % n == 0]


def right_best_n(d, k):
    return min(divisors(d, k), key=lambda n: d * k // n + n ** 3)


def nearest_divisor(d, k, scale=lambda n: n):
    """The common divisor nearest to the continuous minimum (dk/3)^(1/4) of d·k/n + n³ (on ``scale``)."""
    return min(divisors(d, k), key=lambda n: abs(scale(n) - scale((d * k / 3) ** 0.25)))


def test_best_n_reference():
    assert reference_best_n(384, 24) == 8 and reference_best_n(768, 48) == 12
    layer = PHMLinear(384, 24, n=8)  # the count is the package's PHM layer without its bias
    assert sum(p.numel() for p in layer.parameters()) - 24 == phm_weights(384, 24, 8)
    for d, k in BEST_N_CASES:
        assert right_best_n(d, k) == reference_best_n(d, k)


def test_best_n_accepts_the_answer(capsys):
    assert "✔ best_n" in assert_passes(capsys, (check_best_n, right_best_n))


@pytest.mark.parametrize("wrong, message", [
    (lambda d, k: round((d * k / 3) ** 0.25), "does not divide both"),
    (nearest_divisor, "n=6 is on one side of it and n=12 on the other"),  # wrong for (1536, 12) only
    (lambda d, k: nearest_divisor(d, k, math.log), "not symmetric around that point"),  # wrong for (384, 8)
    (lambda d, k: max(n for n in divisors(d, k) if n <= (d * k / 3) ** 0.25), "compare the counts"),
    (lambda d, k: min(n for n in divisors(d, k) + [max(divisors(d, k))] if n >= (d * k / 3) ** 0.25),
     "compare the counts"),
    (lambda d, k: max(n for n in range(1, k + 1) if d % n == 0 and k % n == 0), "largest n"),
    (lambda d, k: 1, "dense matrix"),
    (lambda d, k: 2 if d > 10 else 1, "both parts"),
    (lambda d, k: float(right_best_n(d, k)), "integer"),
])
def test_best_n_rejects(wrong, message):
    assert_rejects(check_best_n, wrong, message=message)
