"""Lesson 00's checks accept the reference answers and reject plausible wrong ones with a useful message."""
import math

import pytest
from torch import nn

from minipeft.course.checks.lesson00 import (MAX_TRAINABLE_CASES, _fits, check_count_parameters, check_encoder_formula,
                                             check_max_trainable, check_training_memory, encoder_terms,
                                             reference_max_trainable)
from minipeft.lab.train import count_parameters, training_state_bytes
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def formula(cfg, drop=None, extra=0):
    terms = {k: v for k, v in encoder_terms(cfg).items() if v > 0}
    return sum(v for k, v in terms.items() if drop is None or not k.startswith(drop)) + extra


def test_references_pass(capsys):
    assert_passes(capsys, (check_count_parameters, count_parameters), (check_encoder_formula, formula),
                  (check_training_memory, training_state_bytes))


@pytest.mark.parametrize("wrong, message", [
    (lambda m, trainable_only=False: len(list(m.parameters())), "number of parameter \\*tensors\\*"),
    (lambda m, trainable_only=False: count_parameters(m), "counts frozen parameters too"),
    (lambda m, trainable_only=False: sum(t.numel() for t in m.state_dict().values()), "includes buffers"),
    (lambda m, trainable_only=False: float(count_parameters(m, trainable_only)), "return an integer count"),
])
def test_count_parameters_rejects(wrong, message):
    assert_rejects(check_count_parameters, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda cfg: formula(cfg, drop="the biases"), "exactly the biases of the linear layers.*leave it out"),
    (lambda cfg: formula(cfg, drop="the LayerNorms"), "exactly the LayerNorms"),
    (lambda cfg: formula(cfg, drop="the position"), "exactly the position embeddings"),
    (lambda cfg: formula(cfg, drop="the LayerNorms", extra=2 * cfg.hidden_size * 2 * cfg.num_layers),
     "exactly the embeddings' LayerNorm"),
    (lambda cfg: 12 * cfg.num_layers * cfg.hidden_size ** 2, "numel says"),  # the rule of thumb 12·L·d²
])
def test_encoder_formula_rejects(wrong, message):
    assert_rejects(check_encoder_formula, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda n, t, bytes_per_value=4: bytes_per_value * (n + 2 * t), "3 extra values, you have 2"),
    (lambda n, t, bytes_per_value=4: bytes_per_value * 4 * n, "frozen parameters have no gradient"),
    (lambda n, t, bytes_per_value=4: 4 * (n + 3 * t), "use bytes_per_value"),
    (lambda n, t, bytes_per_value=4: n + 3 * t, "multiply by bytes_per_value"),
])
def test_training_memory_rejects(wrong, message):
    assert_rejects(check_training_memory, wrong, message=message)


def test_encoder_formula_pooler_hint_says_it_does_not_belong():
    message = assert_rejects(check_encoder_formula,
                             lambda cfg: formula(cfg, extra=cfg.hidden_size ** 2 + cfg.hidden_size))
    assert "exactly a pooler" in message and "has no pooler" in message
    assert "leave it out?" not in message  # the old hint asked whether it was left out


@pytest.mark.parametrize("check, wrong", [
    (check_encoder_formula, lambda cfg: float(formula(cfg))),  # e.g. 22713216.0: right value or not, a float
    (check_encoder_formula, lambda cfg: float(formula(cfg, extra=cfg.hidden_size ** 2 + cfg.hidden_size))),
    (check_training_memory, lambda n, t, bytes_per_value=4: float(training_state_bytes(n, t, bytes_per_value))),
    (check_training_memory, lambda n, t, bytes_per_value=4: bytes_per_value * (n + 3 * t) / 1),
])
def test_counts_must_be_ints_not_floats(check, wrong):
    assert_rejects(check, wrong, message="return an integer count \\(int\\), not a float; use // not /")


def test_fallback_hints_do_not_give_the_answer():
    message = assert_rejects(check_training_memory,
                             lambda n, t, bytes_per_value=4: bytes_per_value * (n + 3 * t) + 1)
    assert "3·N_trainable" not in message and "AdamW's m and v" in message
    message = assert_rejects(check_count_parameters,
                             lambda m, trainable_only=False: count_parameters(m, trainable_only) + 1)
    assert "sum(p.numel()" not in message


def test_unfilled_exercise_raises_not_implemented_and_crashes_are_explained():
    assert_unfilled_stops(check_count_parameters, check_encoder_formula, check_training_memory, check_max_trainable)
    assert_rejects(check_training_memory, lambda n, t, bytes_per_value=4: 1 / 0, message="raised ZeroDivisionError")
    assert_rejects(check_count_parameters, nn.Linear(2, 2).weight, message="expected a function")


# ---- max_trainable ----------------------------------------------------------------------------------------

def right_max_trainable(total, ratio):
    return int((ratio - 1) * total // 3)


def test_max_trainable_reference_is_the_largest_that_fits():
    for total, ratio in MAX_TRAINABLE_CASES:
        n = reference_max_trainable(total, ratio)
        assert _fits(total, n, ratio) and not _fits(total, n + 1, ratio)
    assert reference_max_trainable(22_565_376, 1.1) == 752_179


def test_max_trainable_accepts_the_answer(capsys):
    assert "✔ max_trainable" in assert_passes(capsys, (check_max_trainable, right_max_trainable))


@pytest.mark.parametrize("wrong, message", [
    (lambda N, q: int((q - 1) * N // 4), "adds three values"),
    (lambda N, q: int((q - 1) * N // 2), "three extra values, not two"),
    (lambda N, q: int(q * N // 3), "already includes the frozen and trainable weights"),
    (lambda N, q: math.ceil((q - 1) * N / 3 + 0.5), "Round down"),
    (lambda N, q: max(0, int((q - 1) * N // 3) - 1), "still fit"),
    (lambda N, q: (q - 1) * N / 3, "integer"),
])
def test_max_trainable_rejects(wrong, message):
    assert_rejects(check_max_trainable, wrong, message=message)

