"""Lesson 01's checks accept the reference answers and reject plausible wrong ones with a useful message."""
import pytest
import torch
import torch.nn.functional as F

from minipeft.course.checks.lesson01 import (BUDGET_CASES, _count, check_adapter_forward, check_adapter_parameters,
                                             check_largest_bottleneck, check_placement_parameters, reference_forward,
                                             reference_largest_bottleneck)
from minipeft.methods.bottleneck import houlsby_count, pfeiffer_count
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def right(h, Wd, bd, Wu, bu, act):
    return h + act(h @ Wd.T + bd) @ Wu.T + bu


def test_references_pass(capsys):
    assert_passes(capsys, (check_adapter_forward, right), (check_adapter_parameters, lambda d, m: 2 * m * d + d + m),
                  (check_placement_parameters, houlsby_count, pfeiffer_count))


def test_reference_is_the_package_module():
    g = torch.Generator().manual_seed(3)
    h, Wd, bd, Wu, bu = (torch.randn(*s, generator=g) for s in ((2, 4, 6), (3, 6), (3,), (6, 3), (6,)))
    assert torch.allclose(reference_forward(h, Wd, bd, Wu, bu, "gelu"), right(h, Wd, bd, Wu, bu, F.gelu), atol=1e-6)


@pytest.mark.parametrize("wrong, message", [
    (lambda h, Wd, bd, Wu, bu, act: act(h @ Wd.T + bd) @ Wu.T + bu, "residual h is missing"),
    (lambda h, Wd, bd, Wu, bu, act: h + act(h @ Wd.T + bd) @ Wu.T, "bias b_up is missing"),
    (lambda h, Wd, bd, Wu, bu, act: h + act(h @ Wd.T) @ Wu.T + bu, "bias b_down is missing"),
    (lambda h, Wd, bd, Wu, bu, act: h + act(h @ Wd.T) @ Wu.T, "both biases"),
    (lambda h, Wd, bd, Wu, bu, act: h + (h @ Wd.T + bd) @ Wu.T + bu, "nonlinearity f is missing"),
    (lambda h, Wd, bd, Wu, bu, act: h + act((h @ Wd.T + bd) @ Wu.T + bu), "after the up-projection"),
    (lambda h, Wd, bd, Wu, bu, act: h + F.relu(h @ Wd.T + bd) @ Wu.T + bu, "call the act argument"),
    (lambda h, Wd, bd, Wu, bu, act: h + act(h @ Wd + bd) @ Wu + bu, "h @ W_down.T"),  # weights not transposed
    (lambda h, Wd, bd, Wu, bu, act: (h + act(h @ Wd.T + bd) @ Wu.T + bu).mean(-1), "maps \\(..., d\\)"),
    (lambda h, Wd, bd, Wu, bu, act: act(h @ Wd.T + bd), "m-wide bottleneck: W_up brings it back"),
    (lambda h, Wd, bd, Wu, bu, act: 1.01 * right(h, Wd, bd, Wu, bu, act), "wrong output"),
    (lambda h, Wd, bd, Wu, bu, act: right(h, Wd, bd, Wu, bu, act).tolist(), "should return a tensor"),
])
def test_forward_rejects(wrong, message):
    assert_rejects(check_adapter_forward, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda d, m: 2 * m * d, "exactly the two biases .* leave it out"),
    (lambda d, m: 2 * m * d + m, "exactly the up-projection's bias"),
    (lambda d, m: 2 * m * d + d, "exactly the down-projection's bias"),
    (lambda d, m: m * d + d + m, "one of the two weight matrices"),
    (lambda d, m: float(2 * m * d + d + m), "return an integer count \\(int\\), not a float"),
])
def test_adapter_parameters_rejects(wrong, message):
    assert_rejects(check_adapter_parameters, wrong, message=message)


@pytest.mark.parametrize("houlsby, pfeiffer, message", [
    (pfeiffer_count, pfeiffer_count, "Houlsby puts two per layer"),
    (houlsby_count, houlsby_count, "Pfeiffer puts one per layer"),
    (lambda d, L, m: 2 * (2 * m * d + d + m), pfeiffer_count, "multiply by the number of layers"),
    (lambda d, L, m: 2 * L * 2 * m * d, pfeiffer_count, "biases .* are missing"),
])
def test_placement_parameters_rejects(houlsby, pfeiffer, message):
    assert_rejects(check_placement_parameters, houlsby, pfeiffer, message=message)


def test_placement_float_says_use_floor_division():
    assert_rejects(check_placement_parameters, houlsby_count, lambda d, L, m: houlsby_count(d, L, m) / 2,
                   message="pfeiffer .*use // not /")


def test_nan_output_is_named_not_shown_as_max_error_nan():
    message = assert_rejects(check_adapter_forward,
                             lambda h, Wd, bd, Wu, bu, act: right(h, Wd, bd, Wu, bu, act) / (h - h))
    assert "nan or inf" in message and "max error nan" not in message


def test_unfilled_exercise_raises_not_implemented():
    assert_unfilled_stops(check_adapter_forward, check_adapter_parameters, check_largest_bottleneck,
                          lambda houlsby: check_placement_parameters(houlsby, pfeiffer_count))


# ---- largest_bottleneck --------------------------------------------------------------------------------------

def right_largest(d, L, budget, placement):
    adapters = L * (2 if placement == "houlsby" else 1)
    return max(0, (budget // adapters - d) // (2 * d + 1))


def test_largest_bottleneck_reference_agrees_with_the_package_counts():
    assert reference_largest_bottleneck(384, 6, 451_307, "pfeiffer") == 97
    for d, L, budget, placement in BUDGET_CASES:
        m = reference_largest_bottleneck(d, L, budget, placement)
        count = houlsby_count if placement == "houlsby" else pfeiffer_count
        assert _count(d, L, m, placement) == count(d, L, m) <= budget < count(d, L, m + 1)
        assert right_largest(d, L, budget, placement) == m


def test_largest_bottleneck_accepts_the_answer(capsys):
    assert "✔ largest_bottleneck" in assert_passes(capsys, (check_largest_bottleneck, right_largest))


@pytest.mark.parametrize("wrong, message", [
    (lambda d, L, B, p: right_largest(d, L, B, "pfeiffer" if p == "houlsby" else "houlsby"), "other placement"),
    (lambda d, L, B, p: B // (L * (2 if p == "houlsby" else 1) * 2 * d), "biases"),
    (lambda d, L, B, p: right_largest(d, L, B, p) + 1, "round down"),
    (lambda d, L, B, p: right_largest(d, L, B, p) - 1, "still fits"),
    (lambda d, L, B, p: float(right_largest(d, L, B, p)), "integer"),
])
def test_largest_bottleneck_rejects(wrong, message):
    assert_rejects(check_largest_bottleneck, wrong, message=message)
