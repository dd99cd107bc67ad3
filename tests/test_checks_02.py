"""Lesson 02's checks accept the reference answers and reject plausible wrong ones with a useful message."""
import pytest
import torch

from minipeft.course.checks.lesson02 import (CASES, RANK_CASES, check_lora_forward, check_lora_parameters, check_merge,
                                             check_rank_for_budget, reference_forward, reference_merge,
                                             reference_rank_for_budget)
from minipeft.methods.lora import lora_count
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def right_forward(x, W0, b, A, B, alpha, r):
    return x @ W0.T + b + (alpha / r) * (x @ A.T @ B.T)


def right_merge(W0, A, B, alpha, r):
    return W0 + (alpha / r) * (B @ A)


def test_references_pass(capsys):
    assert_passes(capsys, (check_lora_forward, right_forward), (check_merge, right_merge),
                  (check_lora_parameters, lambda d, L, r, n: L * n * r * 2 * d))


def test_references_are_the_package_module():
    g = torch.Generator().manual_seed(3)
    x, W0, b, A, B = (torch.randn(*s, generator=g) for s in ((2, 4, 6), (5, 6), (5,), (3, 6), (5, 3)))
    assert torch.allclose(reference_forward(x, W0, b, A, B, 6.0, 3), right_forward(x, W0, b, A, B, 6.0, 3), atol=1e-6)
    assert torch.allclose(reference_merge(W0, A, B, 6.0, 3), right_merge(W0, A, B, 6.0, 3), atol=1e-6)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + x @ A.T @ B.T, "scale α/r is missing"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (r / a) * x @ A.T @ B.T, "upside down"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + a * x @ A.T @ B.T, "divide by the rank r"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + a / r ** 0.5 * x @ A.T @ B.T, "rsLoRA"),
    (lambda x, W0, b, A, B, a, r: (a / r) * x @ A.T @ B.T, "frozen part W0 x \\+ b is missing"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + (a / r) * x @ A.T @ B.T, "bias b is missing"),
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (a / r) * x @ (B @ A), "product is transposed"),  # runs if square
    (lambda x, W0, b, A, B, a, r: x @ W0.T + b + (a / r) * x @ B @ A, "product is transposed"),  # B first
    (lambda x, W0, b, A, B, a, r: x @ W0 + b + (a / r) * x @ A.T @ B.T, "W0 is transposed"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A, B, a, r).sum(-1), "returned shape"),
    (lambda x, W0, b, A, B, a, r: (a / r) * x @ A.T, "rank-r bottleneck A x: B brings it back up"),
    (lambda x, W0, b, A, B, a, r: 1.01 * right_forward(x, W0, b, A, B, a, r), "wrong output"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A, B, a, r).tolist(), "should return a tensor"),
])
def test_forward_rejects(wrong, message):
    assert_rejects(check_lora_forward, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A.detach(), B, a, r), "no gradient reaches A"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A.data, B, a, r), "no gradient reaches A"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, torch.tensor(A.tolist()), B, a, r), "no gradient reaches A"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A, B.detach(), a, r), "no gradient reaches B"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A.detach(), B.detach(), a, r), "no gradient reaches A"),
    (lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, 2 * A - A.detach(), B, a, r),  # A's value, twice its grad
     "the gradient with respect to A is wrong"),
])
def test_forward_rejects_a_graph_that_training_cannot_use(wrong, message):
    """The values are right, so only the gradients can tell (the first step from B = 0 cannot: A's gradient is 0)."""
    assert_rejects(check_lora_forward, wrong, message=message)


def test_a_detached_A_takes_the_same_first_step_from_B_zero():
    """Why the check needs B ≠ 0: from LoRA's initialisation (B = 0) the gradient of A is zero, so one step of a
    forward with A detached changes W exactly as the right one does."""
    def first_step(forward):
        torch.manual_seed(0)
        W0, b, x, target = torch.randn(8, 8), torch.zeros(8), torch.randn(16, 8), torch.randn(16, 8)
        A, B = torch.randn(4, 8, requires_grad=True), torch.zeros(8, 4, requires_grad=True)
        opt = torch.optim.Adam([A, B], lr=1e-3)
        torch.nn.functional.mse_loss(forward(x, W0, b, A, B, 8.0, 4), target).backward()
        opt.step()
        return (B @ A).detach()

    detached = lambda x, W0, b, A, B, a, r: right_forward(x, W0, b, A.detach(), B, a, r)  # noqa: E731
    assert torch.equal(first_step(right_forward), first_step(detached))
    assert_rejects(check_lora_forward, detached, message="no gradient reaches A")


def in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * (B @ A)
    return W0


@pytest.mark.parametrize("wrong, message", [
    (lambda W0, A, B, a, r: W0 + B @ A, "scale α/r is missing"),
    (lambda W0, A, B, a, r: W0 + (r / a) * (B @ A), "upside down"),
    (lambda W0, A, B, a, r: W0 + a * (B @ A), "divide by the rank r"),
    (lambda W0, A, B, a, r: (a / r) * (B @ A), "only ΔW was returned"),
    (lambda W0, A, B, a, r: W0 + 2 * (a / r) * (B @ A), "ΔW was added twice"),
    (lambda W0, A, B, a, r: W0 + (a / r) * (A.T @ B.T), "ΔW is transposed"),  # square case
    (in_place, "changed W0 in place"),
    (lambda W0, A, B, a, r: W0[:r, :r] + (a / r) * (A @ B), "that is A B \\(r, r\\); ΔW is B A"),
    (lambda W0, A, B, a, r: 1.01 * right_merge(W0, A, B, a, r), "wrong merged weight"),
])
def test_merge_rejects(wrong, message):
    assert_rejects(check_merge, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda d, L, r, n: L * n * r * d, "A or B only"),
    (lambda d, L, r, n: n * r * 2 * d, "multiply by L"),
    (lambda d, L, r, n: L * r * 2 * d, "number of targets"),
    (lambda d, L, r, n: L * n * d * d, "full d×d update ΔW = BA"),  # d_in·d_out per target, not r(d_in + d_out)
    (lambda d, L, r, n: L * n * 2 * d * d, "each target has A"),
    (lambda d, L, r, n: float(L * n * r * 2 * d), "return an integer count \\(int\\), not a float"),
])
def test_parameters_rejects(wrong, message):
    assert_rejects(check_lora_parameters, wrong, message=message)


@pytest.mark.parametrize("case", CASES)
def test_cases_tell_the_scale_mistakes_apart(case):
    """In every case the scales of the diagnosed mistakes differ (r = 2 made a double merge look like α alone)."""
    _, _, r, a, _ = case
    scales = {"right": a / r, "none": 1.0, "upside down": r / a, "α alone": a, "rsLoRA": a / r ** 0.5,
              "twice": 2 * a / r}
    values = sorted(scales.values())
    assert all(b - s > 1e-3 for s, b in zip(values, values[1:])), scales


def test_messages_name_the_mistake_without_giving_the_code():
    assert "x @ A.T @ B.T" not in assert_rejects(
        check_lora_forward, lambda x, W0, b, A, B, a, r: 1.01 * right_forward(x, W0, b, A, B, a, r))
    assert "(alpha / r) * (B @ A)" not in assert_rejects(
        check_merge, lambda W0, A, B, a, r: 1.01 * right_merge(W0, A, B, a, r))


def test_unfilled_exercise_raises_not_implemented():
    assert_unfilled_stops(check_lora_forward, check_merge, check_lora_parameters, check_rank_for_budget)


# ---- rank_for_budget -----------------------------------------------------------------------------------------

def right_rank(d, L, n, budget):
    return budget // (L * n * 2 * d)


def test_rank_for_budget_reference_is_the_largest_that_fits():
    for d, L, n, budget in RANK_CASES:
        r = reference_rank_for_budget(d, L, n, budget)
        assert lora_count(r, d, d, n_targets=n, num_layers=L) <= budget < lora_count(r + 1, d, d, n_targets=n,
                                                                                       num_layers=L)
    assert reference_rank_for_budget(384, 6, 2, 299_904) == 32  # LoRA on q, v with Houlsby m=32's count on MiniLM


def test_rank_for_budget_accepts_the_answer(capsys):
    assert "✔ rank_for_budget" in assert_passes(capsys, (check_rank_for_budget, right_rank))


@pytest.mark.parametrize("wrong, message", [
    (lambda d, L, n, B: B // (L * n * d), "two factors"),
    (lambda d, L, n, B: B // (n * 2 * d), "one layer"),
    (lambda d, L, n, B: B // (L * 2 * d), "shared by all"),
    (lambda d, L, n, B: right_rank(d, L, n, B) + 1, "round down"),
    (lambda d, L, n, B: right_rank(d, L, n, B) - 1, "still fits"),
    (lambda d, L, n, B: B / (L * n * 2 * d), "integer"),
])
def test_rank_for_budget_rejects(wrong, message):
    assert_rejects(check_rank_for_budget, wrong, message=message)
