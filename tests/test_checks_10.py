"""Lesson 10's checks (DoRA) accept the reference answers and reject plausible wrong ones, each by name."""
import pytest
import torch

from minipeft.course.checks.lesson10 import (CASES, _tensors, check_dora_weight, check_init_magnitude,
                                             reference_magnitude, reference_weight)
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def right_weight(W0, A, B, m, alpha, r):
    V = W0 + (alpha / r) * (B @ A)
    return m[:, None] * V / V.norm(dim=1, keepdim=True).detach()


def right_magnitude(W0, A, B, alpha, r):
    return (W0 + (alpha / r) * (B @ A)).norm(dim=1)


def test_references_pass(capsys):
    assert_passes(capsys, (check_dora_weight, right_weight), (check_init_magnitude, right_magnitude))


def test_references_are_the_package_module():
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        assert torch.allclose(reference_weight(**t, alpha=alpha, r=r), right_weight(**t, alpha=alpha, r=r), atol=1e-6)
        W0, A, B = t["W0"], t["A"], t["B"]
        assert torch.allclose(reference_magnitude(W0, A, B, alpha, r), right_magnitude(W0, A, B, alpha, r))


def norm_rows(V):
    return V.norm(dim=1, keepdim=True).detach()


@pytest.mark.parametrize("wrong, message", [
    (lambda W0, A, B, m, a, r: m[:, None] * (W0 + a / r * B @ A) / (W0 + a / r * B @ A).norm(dim=0, keepdim=True),
     "norm is over the wrong axis"),
    (lambda W0, A, B, m, a, r: m[:, None] * (W0 + a / r * B @ A) / (W0 + a / r * B @ A).norm(dim=0),
     "norm is over the wrong axis|wrong axis"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, a / r * B, m, a, r), "scale s = α/r is applied twice"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m, r, r), "scale s = α/r is missing"),
    (lambda W0, A, B, m, a, r: m[:, None] * (W0 + a / r * B @ A) / norm_rows(W0), "norm is of W0 alone"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, torch.ones_like(m), a, r), "magnitude m is missing"),
    (lambda W0, A, B, m, a, r: m[:, None] * (W0 + a / r * B @ A), "direction is not normalised"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m, a, r) - m[:, None] * W0 / norm_rows(W0 + a / r * B @ A),
     "only the update was returned|wrong weight"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m, a, r).T, "returned shape|transposed|wrong"),
    (lambda W0, A, B, m, a, r: 1.01 * right_weight(W0, A, B, m, a, r), "wrong weight"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m, a, r).tolist(), "should return a tensor"),
])
def test_weight_rejects(wrong, message):
    assert_rejects(check_dora_weight, wrong, message=message)


def undetached(W0, A, B, m, alpha, r):
    V = W0 + (alpha / r) * (B @ A)
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("wrong, message", [
    (undetached, "flows through the norm .*detach it"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A.detach(), B, m, a, r), "no gradient reaches A"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B.detach(), m, a, r), "no gradient reaches B"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m.detach(), a, r), "no gradient reaches m"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, m, a, r).detach(), "no gradient reaches A"),
    (lambda W0, A, B, m, a, r: right_weight(W0, A, B, 2 * m - m.detach(), a, r), "gradient with respect to m is wrong"),
])
def test_weight_rejects_a_graph_training_cannot_use(wrong, message):
    """The values are right: only the gradients tell (the undetached norm is the paper's mistake to avoid)."""
    assert_rejects(check_dora_weight, wrong, message=message)


def test_the_detach_changes_the_gradients_of_the_cases():
    """The check can name a missing detach only because it changes the gradient of B in its cases."""
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        B = t["B"].clone().requires_grad_()
        grads = [torch.autograd.grad(f(t["W0"], t["A"], B, t["m"], alpha, r).pow(2).sum(), B)[0]
                 for f in (right_weight, undetached)]
        assert not torch.allclose(*grads, atol=1e-3)


@pytest.mark.parametrize("wrong, message", [
    (lambda W0, A, B, a, r: W0.norm(dim=1), "initialised from the wrong matrix, W0 alone"),
    (lambda W0, A, B, a, r: (a / r * B @ A).norm(dim=1), "initialised from the wrong matrix, the update sBA alone"),
    (lambda W0, A, B, a, r: right_magnitude(W0, A, a / r * B, a, r), "applied twice"),
    (lambda W0, A, B, a, r: right_magnitude(W0, A, B, r, r), "scale s = α/r is missing"),
    (lambda W0, A, B, a, r: (W0 + a / r * B @ A).norm(dim=0), "wrong axis"),
    (lambda W0, A, B, a, r: (W0 + a / r * B @ A).pow(2).sum(1), "squared"),
    (lambda W0, A, B, a, r: (W0 + a / r * B @ A).norm(), "whole matrix"),
    (lambda W0, A, B, a, r: 1.01 * right_magnitude(W0, A, B, a, r), "wrong magnitude"),
    (lambda W0, A, B, a, r: right_magnitude(W0, A, B, a, r).tolist(), "should return a tensor"),
])
def test_magnitude_rejects(wrong, message):
    assert_rejects(check_init_magnitude, wrong, message=message)


def test_messages_name_the_mistake_without_giving_the_code():
    text = assert_rejects(check_dora_weight, lambda *a: 1.01 * right_weight(*a))
    assert "norm(dim=1, keepdim=True)" not in text and ".detach()" not in text


def test_unfilled_exercise_raises_not_implemented():
    assert_unfilled_stops(check_dora_weight, check_init_magnitude)
