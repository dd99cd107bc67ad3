"""Lesson 06's checks accept UniPELT's gated sum done right (the solution notebook's own code) and reject the plausible
mistakes with a message that names them; the unfilled exercise stops with NotImplementedError."""
import pytest
import torch

from minipeft.course.checks.lesson06 import check_gated_model, check_gated_sum
from checking import assert_passes, assert_rejects, assert_unfilled_stops
from helpers import notebook_functions

NAME = "06_unified_view_and_mam.ipynb"


def function_from(folder: str):
    """The ``gated_sum`` defined in a notebook of ``folder`` (solutions/ or exercises/), executed alone."""
    return notebook_functions(NAME, folder, ["gated_sum"], "import torch\nimport torch.nn.functional as F")["gated_sum"]


def make(gate="sigmoid", read="x", combine="per_part", bias="inside", keep_axis=True, detach=False):
    """A gated sum with one deliberate mistake (the defaults are the right answer)."""
    def fn(x, h, deltas, weights, biases):
        u = {"x": x, "h": h, "x+h": x + h}[read]
        logits = u @ weights.T  # (B, T, K)
        if bias == "inside":
            logits = logits + biases
        gates = {"sigmoid": torch.sigmoid, "none": lambda z: z, "tanh": torch.tanh,
                 "softmax": lambda z: torch.softmax(z, -1)}[gate](logits)
        if bias == "outside":
            gates = gates + biases
        if detach:
            gates = gates.detach()
        if combine == "summed":
            total = gates.sum(-1, keepdim=True) * sum(deltas)
            return total if keep_axis else gates.sum(-1) * sum(deltas)
        out = 0
        for k, dh in enumerate(deltas):
            g = gates[..., k:k + 1] if keep_axis else gates[..., k]
            out = out + g * dh
        return out
    return fn


def per_feature(x, h, deltas, weights, biases):
    return sum(torch.sigmoid(x * w + b) * dh for dh, w, b in zip(deltas, weights, biases))


def per_sentence(x, h, deltas, weights, biases):
    return sum(torch.sigmoid(x.mean(1, keepdim=True) @ w + b)[..., None] * dh
               for dh, w, b in zip(deltas, weights, biases))


def first_gate_only(x, h, deltas, weights, biases):
    return torch.sigmoid(x @ weights[0] + biases[0])[..., None] * sum(deltas)


def with_residual(x, h, deltas, weights, biases):
    return h + make()(x, h, deltas, weights, biases)


def stacked(x, h, deltas, weights, biases):
    return torch.stack([torch.sigmoid(x @ w + b)[..., None] * dh for dh, w, b in zip(deltas, weights, biases)])


def in_place(x, h, deltas, weights, biases):
    for dh, w, b in zip(deltas, weights, biases):
        dh *= torch.sigmoid(x @ w + b)[..., None]
    return sum(deltas)


def with_items(x, h, deltas, weights, biases):
    return sum(torch.sigmoid(x @ torch.tensor(w.tolist()) + b.item())[..., None] * dh
               for dh, w, b in zip(deltas, weights, biases))


def test_the_solution_passes(capsys):
    fn = function_from("solutions")
    out = assert_passes(capsys, (check_gated_sum, fn), (check_gated_model, fn))
    assert "✔ gated_sum:" in out and "✔ gated_sum in a model:" in out


def test_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_gated_sum, make()), (check_gated_model, make()), (
        check_gated_sum, lambda x, h, ds, w, b: sum(torch.sigmoid(x @ w[k] + b[k]).unsqueeze(-1) * ds[k]
                                                    for k in range(len(ds)))))


def test_the_unfilled_exercise_stops_with_not_implemented():
    assert_unfilled_stops(check_gated_sum, exercise=function_from("exercises"))


@pytest.mark.parametrize("wrong, message", [
    (make(gate="none"), "raw logit .* squash it with the logistic sigmoid"),
    (make(gate="tanh"), "the gate uses tanh"),
    (make(gate="softmax"), "softmax across the parts"),
    (make(read="h"), "the gate is read from h"),
    (make(read="x+h"), "read from x \\+ h"),
    (per_feature, "one value per feature: x·w_k is a dot product"),
    (per_sentence, "one number per sentence"),
    (make(keep_axis=False), "give it a trailing axis, \\(B, T, 1\\)"),
    (make(combine="summed"), "gates were added up and applied to the sum"),
    (first_gate_only, "the first part's gate"),
    (make(bias="none"), "the bias b_k is missing"),
    (make(bias="outside"), "added after the sigmoid"),
    (with_residual, "return only the gated Δh's"),
    (stacked, "one gated Δh per part: add them up"),
    (in_place, "changed its inputs in place"),
    (make(detach=True), "no gradient reaches w_k"),
    (with_items, "no gradient reaches w_k"),
    (lambda x, h, ds, w, b: 2 * make()(x, h, ds, w, b), "max error"),
])
def test_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_gated_sum, wrong, message=message)


def test_messages_are_never_a_bare_error():
    """A shape error names the gate's missing axis; nan says where it comes from."""
    message = assert_rejects(check_gated_sum, make(keep_axis=False))
    assert "RuntimeError" in message and "one number per token" in message
    assert "max error nan" not in assert_rejects(
        check_gated_sum, lambda x, h, ds, w, b: make()(x, h, ds, w, b) * float("nan"), message="nan or inf")


def test_not_a_function_and_wrong_types():
    assert_rejects(check_gated_sum, torch.zeros(2), message="expected a function")
    assert_rejects(check_gated_sum, lambda *a: 0, message="should return a tensor")
    assert_rejects(check_gated_sum, lambda x, h, ds, w, b: [torch.sigmoid(x @ w[k] + b[k])[..., None] * ds[k]
                                                            for k in range(len(ds))], message="return one tensor")


def test_model_check_rejects_a_wrong_gate():
    assert_rejects(check_gated_model, make(read="h"), message="differs from the one with minipeft's gates")
