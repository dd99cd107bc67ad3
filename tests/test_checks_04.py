"""Lesson 04's checks accept the reference answers and reject plausible wrong ones with a useful message."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minipeft.course.checks.lesson04 import (_residual_cases, check_affine_residual, check_parallel_delta,
                                             check_parallel_module, reference_affine_residual)
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def reference_delta(x, h, down, up, s):
    return s * up(F.relu(down(x)))


def make_module(read_h=False, scale_in_forward=True, zero_up=True, kaiming=True, learned_param=True,
                fixed_param=False, hard_coded=False, detached=False):
    class Mine(nn.Module):  # an AdapterModule in the notebook; the check needs only nn.Module
        def __init__(self, adapter_name, d, r, scale):
            super().__init__()
            self.adapter_name = adapter_name
            self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
            with torch.no_grad():
                if kaiming:
                    nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(self.down.weight, std=0.02)
                nn.init.zeros_(self.down.bias)
                if zero_up:
                    nn.init.zeros_(self.up.weight)
                    nn.init.zeros_(self.up.bias)
            if scale == "learned":
                self.scale = nn.Parameter(torch.ones(())) if learned_param else 1.0
            else:
                self.scale = nn.Parameter(torch.tensor(float(scale))) if fixed_param else float(scale)

        def forward(self, x, h, norm):
            u = h if read_h else x
            a = self.up(F.relu(self.down(u)))
            s = 4.0 if hard_coded else self.scale.item() if detached and torch.is_tensor(self.scale) else self.scale
            return s * a if scale_in_forward else a

    return Mine


def test_references_pass(capsys):
    assert_passes(capsys, (check_parallel_delta, reference_delta), (check_parallel_module, make_module()))


@pytest.mark.parametrize("wrong, message", [
    (lambda x, h, down, up, s: s * up(F.relu(down(h))), "depends on h, the sublayer's \\*output\\*"),
    (lambda x, h, down, up, s: up(F.relu(down(x))), "the scale s is missing"),
    (lambda x, h, down, up, s: s * up(down(x)), "the nonlinearity is missing"),
    (lambda x, h, down, up, s: h + s * up(F.relu(down(x))), "return only Δh"),
    (lambda x, h, down, up, s: x + s * up(F.relu(down(x))), "the residual x is added by the site"),
    (lambda x, h, down, up, s: s * F.linear(F.relu(down(x)), up.weight) + up.bias, "b_up included"),
    (lambda x, h, down, up, s: s * up(F.relu(down(x)))[..., :3], "returned shape"),
    (lambda x, h, down, up, s: s * F.relu(down(x)), "r-wide bottleneck: up brings it back"),
    (lambda x, h, down, up, s: 4.0 * up(F.relu(down(x))), "Δh is 4·A\\(x\\) but s = 1: the scale is hard-coded"),
    (lambda x, h, down, up, s: s * up(F.gelu(down(x))), "f is ReLU here"),
    (lambda x, h, down, up, s: s * up(F.relu(down(x))) + 0.1, "compare with s"),
    (lambda x, h, down, up, s: s * up(F.relu(down(x))) / (x - x), "nan or inf"),
    (lambda x, h, down, up, s: s * up(x), "raised RuntimeError.*call them on a tensor"),
])
def test_parallel_delta_rejects(wrong, message):
    assert_rejects(check_parallel_delta, wrong, message=message)


@pytest.mark.parametrize("kwargs, message", [
    (dict(read_h=True), "sublayer's \\*output\\*"),
    (dict(scale_in_forward=False), "the scale s is missing"),
    (dict(zero_up=False), "must start at zero"),
    (dict(kaiming=False), "Kaiming-uniform"),
    (dict(learned_param=False), "must be one nn.Parameter"),
    (dict(fixed_param=True), "must not be a trainable"),
    (dict(hard_coded=True), "scale=2.5: Δh is 4·A\\(x\\) but s = 2.5: the scale is hard-coded"),
    (dict(detached=True), "the scale is detached: no gradient reaches s"),
])
def test_parallel_module_rejects(kwargs, message):
    assert_rejects(check_parallel_module, make_module(**kwargs), message=message)


def test_parallel_module_learned_scale_is_used_in_the_forward():
    class FixedOnly(make_module()):  # the learned s is a Parameter but the forward uses s = 1 regardless
        def forward(self, x, h, norm):
            return self.up(F.relu(self.down(x))) * (1.0 if isinstance(self.scale, nn.Parameter) else self.scale)

    assert_rejects(check_parallel_module, FixedOnly, message="scale='learned' \\(s = 1.7\\)")


def test_unfilled_exercise_raises_not_implemented_and_crashes_are_explained():
    assert_unfilled_stops(check_parallel_delta, check_parallel_module, check_affine_residual)
    assert_rejects(check_parallel_delta, lambda *a: 1 / 0, message="raised ZeroDivisionError")
    class FloatScale(make_module()):  # float("learned") raises
        def __init__(self, adapter_name, d, r, scale):
            super().__init__(adapter_name, d, r, float(scale))

    assert_rejects(check_parallel_module, FloatScale,
                   message='raised ValueError.*scale="learned" is not a number')
    assert_rejects(check_parallel_module, lambda *a: nn.Identity(), message="needs self.down")


# ---- affine_residual -----------------------------------------------------------------------------------------

def right_residual(X, Y):
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    fit = X1 @ torch.linalg.lstsq(X1, Y).solution
    return ((Y - fit).norm() / Y.norm()).item()


def test_affine_residual_reference():
    cases = list(_residual_cases().values())
    assert reference_affine_residual(*cases[0]) < 1e-10
    assert reference_affine_residual(*cases[1]) > 0.1
    assert abs(reference_affine_residual(*cases[1]) - reference_affine_residual(*cases[2])) < 1e-9


def test_affine_residual_accepts_the_answer(capsys):
    assert "✔ affine_residual" in assert_passes(capsys, (check_affine_residual, right_residual))


def no_bias(X, Y):
    return ((Y - X @ torch.linalg.lstsq(X, Y).solution).norm() / Y.norm()).item()


@pytest.mark.parametrize("wrong, message", [
    (no_bias, "linear\\* fit"),
    (lambda X, Y: right_residual(X, Y) * Y.norm().item(), "absolute residual"),
    (lambda X, Y: right_residual(X, Y) ** 2, "squared"),
    (lambda X, Y: 0.5, "least squares"),
    (lambda X, Y: "small", "a number"),
])
def test_affine_residual_rejects(wrong, message):
    assert_rejects(check_affine_residual, wrong, message=message)
