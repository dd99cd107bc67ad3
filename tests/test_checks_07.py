"""Lesson 07's checks accept AdapterFusion's attention done right (the solution notebook's own code, and other right
ways to write it) and reject the plausible mistakes with a message that names them; the unfilled exercise stops
with NotImplementedError."""
import math

import pytest
import torch

from minipeft.course.checks.lesson07 import (check_fuse, check_fusion_in_model, check_fusion_parameters,
                                      check_fusion_scores, check_gap_from_average, check_key_bias_shift)
from checking import assert_passes, assert_rejects, assert_unfilled_stops
from helpers import notebook_functions

NAME = "07_adapterfusion.ipynb"
FUNCTIONS = ("fusion_scores", "fuse", "fusion_delta", "key_bias_shift", "gap_from_average", "fusion_parameters")


def functions_from(folder: str) -> dict:
    return notebook_functions(NAME, folder, FUNCTIONS)


SOLUTION = functions_from("solutions")


# ---- right answers, written in other ways ------------------------------------------------------------------

def scores_einsum(u, z, Q, b_Q, K, b_K):
    return torch.einsum("btd,btnd->btn", u @ Q + b_Q, z @ K + b_K).softmax(-1)


def scores_without_b_K(u, z, Q, b_Q, K, b_K):  # the same weights: b_K shifts every score of a token alike
    return torch.einsum("btd,btnd->btn", u @ Q + b_Q, z @ K).softmax(-1)


def fuse_V_after(u, z, Q, b_Q, K, b_K, V):  # V once, after the weighted sum: the same (V is linear, no bias)
    return torch.einsum("btn,btnd->btd", scores_einsum(u, z, Q, b_Q, K, b_K), z) @ V


def fuse_loop(u, z, Q, b_Q, K, b_K, V):
    s = scores_einsum(u, z, Q, b_Q, K, b_K)
    return sum(s[..., n:n + 1] * (z[:, :, n] @ V) for n in range(z.shape[2]))


# ---- mistakes ------------------------------------------------------------------------------------------------

def scores(dim=-1, act="softmax", scale=1.0, b_Q=True, transpose="", swap=False, keys_from_u=False, detach=False):
    """fusion_scores with one deliberate mistake (the defaults are the right answer)."""
    def fn(u, z, Q, b_Q_, K, b_K):
        Qm, Km = (Q.T if "Q" in transpose else Q), (K.T if "K" in transpose else K)
        if swap:
            Qm, Km, b_Q_, b_K = Km, Qm, b_K, b_Q_
        q = u @ Qm + (b_Q_ if b_Q else 0)
        k = (u @ Km + b_K).unsqueeze(2).expand_as(z) if keys_from_u else z @ Km + b_K
        c = (q.unsqueeze(2) * k).sum(-1) * scale
        if detach:
            c = c.detach()
        return {"softmax": lambda t: torch.softmax(t, dim=dim), "none": lambda t: t, "sigmoid": torch.sigmoid,
                "log_softmax": lambda t: torch.log_softmax(t, dim=dim)}[act](c)
    return fn


def scores_softmax_over_features(u, z, Q, b_Q, K, b_K):
    q, k = u @ Q + b_Q, z @ K + b_K
    return torch.softmax(q.unsqueeze(2) * k, dim=-1).sum(-1)


def scores_per_feature(u, z, Q, b_Q, K, b_K):
    return torch.softmax((u @ Q + b_Q).unsqueeze(2) * (z @ K + b_K), dim=2)  # (B, T, N, d)


def scores_adapters_first(u, z, Q, b_Q, K, b_K):
    return scores_einsum(u, z, Q, b_Q, K, b_K).transpose(1, 2)  # (B, N, T)


def scores_no_adapter_axis(u, z, Q, b_Q, K, b_K):
    return torch.softmax(((u @ Q + b_Q) * (z @ K + b_K)).sum(-1), dim=-1)  # q (B, T, d) against (B, T, N, d)


def scores_in_place(u, z, Q, b_Q, K, b_K):
    u += b_Q  # a bias added to the input itself
    return torch.softmax(torch.einsum("btd,btnd->btn", u @ Q, z @ K + b_K), dim=-1)


def scores_with_items(u, z, Q, b_Q, K, b_K):
    return scores_einsum(u, z, torch.tensor(Q.tolist()), b_Q, torch.tensor(K.tolist()), b_K)


def scores_naive_softmax(u, z, Q, b_Q, K, b_K):
    c = torch.einsum("btd,btnd->btn", u @ Q + b_Q, z @ K + b_K) * 100
    return c.exp() / c.exp().sum(-1, keepdim=True)


def fuse_with(weights=scores_einsum, value="V", residual=False, combine="weighted"):
    """fuse with one deliberate mistake (the defaults are the right answer)."""
    def fn(u, z, Q, b_Q, K, b_K, V):
        s = weights(u, z, Q, b_Q, K, b_K)
        values = {"V": z @ V, "none": z, "V.T": z @ V.T}[value]
        if combine == "weighted":
            o = torch.einsum("btn,btnd->btd", s, values)
        elif combine == "mean":
            o = values.mean(2)
        elif combine == "no_axis":
            o = (s * values).sum(2)  # (B, T, N) against (B, T, N, d): a broadcast error
        else:  # "stacked": the weighted values, not summed
            o = s.unsqueeze(-1) * values
        return u + o if residual else o
    return fn


def delta(query="u", out="o", fuse=SOLUTION["fuse"]):
    """fusion_delta with one deliberate mistake (the defaults are the right answer)."""
    def fn(x, h, close, adapters, Q, b_Q, K, b_K, V):
        u = close(h)
        z = torch.stack([a(x, h, close) for a in adapters], dim=2)
        o = fuse({"u": u, "h": h, "x": x, "x+h": x + h}[query], z, Q, b_Q, K, b_K, V)
        return {"o": o, "h+o": h + o, "close": close(h + o), "u+o": u + o}[out]
    return fn


# ---- the tests -----------------------------------------------------------------------------------------------

def test_the_solution_passes(capsys):
    out = assert_passes(capsys, (check_fusion_scores, SOLUTION["fusion_scores"]), (check_fuse, SOLUTION["fuse"]),
                        (check_fusion_in_model, SOLUTION["fusion_delta"]),
                        (check_key_bias_shift, SOLUTION["key_bias_shift"]),
                        (check_gap_from_average, SOLUTION["gap_from_average"]),
                        (check_fusion_parameters, SOLUTION["fusion_parameters"]))
    for name in ("fusion_scores", "fuse", "fusion_delta in MiniLM", "key_bias_shift", "gap_from_average",
                 "fusion_parameters"):
        assert f"✔ {name}:" in out


def test_other_right_answers_pass(capsys):
    assert_passes(capsys, (check_fusion_scores, scores_einsum), (check_fusion_scores, scores()),
                  (check_fusion_scores, scores_without_b_K),  # right: the softmax cannot see b_K (section 3)
                  (check_fuse, fuse_V_after), (check_fuse, fuse_loop), (check_fuse, fuse_with()),
                  (check_key_bias_shift, lambda u, Q, b_Q, b_K: torch.einsum("btd,d->bt", u @ Q + b_Q, b_K)),
                  (check_gap_from_average,  # a 0-dim tensor is fine
                   lambda *a: (fuse_loop(*a) - a[1].mean(2)).abs().max()),
                  (check_fusion_parameters, lambda d, L, N: 3 * L * d * d + 2 * L * d))


def test_the_unfilled_exercise_stops_with_not_implemented():
    fns = functions_from("exercises")
    for check, f in ((check_fusion_scores, "fusion_scores"), (check_fuse, "fuse"),
                     (check_key_bias_shift, "key_bias_shift"), (check_fusion_parameters, "fusion_parameters")):
        assert_unfilled_stops(check, exercise=fns[f])


@pytest.mark.parametrize("wrong, message", [
    (scores(dim=1), "softmax runs over the tokens"),
    (scores(dim=0), "softmax runs over the batch"),
    (scores_softmax_over_features, "every weight is 1: a softmax over the d features"),
    (scores_per_feature, "one weight per feature"),
    (scores_adapters_first, "the adapters come before the tokens"),
    (scores_no_adapter_axis, "q needs an adapter axis"),
    (scores(act="none"), "raw scores"),
    (scores(act="sigmoid"), "independent sigmoids \\(UniPELT's gates"),
    (scores(act="log_softmax"), "log-weights"),
    (scores(scale=1 / math.sqrt(384)), "divided by √d"),
    (scores(b_Q=False), "b_Q is missing"),
    (scores(transpose="QK"), "Q and K are applied transposed"),
    (scores(transpose="Q"), "Q is applied transposed"),
    (scores(transpose="K"), "K is applied transposed"),
    (scores(swap=True), "Q and K are swapped"),
    (scores(keys_from_u=True), "every adapter gets the same weight 1/N"),
    (scores_in_place, "changed its inputs in place"),
    (scores(detach=True), "do not depend differentiably"),
    (scores_with_items, "no gradient reaches Q"),
    (scores_naive_softmax, "nan or inf"),
])
def test_scores_reject_plausible_mistakes(wrong, message):
    assert_rejects(check_fusion_scores, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (fuse_with(value="none"), "V is missing"),
    (fuse_with(value="V.T"), "V is applied transposed"),
    (fuse_with(residual=True), "u is added to the result"),
    (fuse_with(combine="mean"), "the weights s are not used"),
    (fuse_with(combine="no_axis"), "need a trailing axis, \\(B, T, N, 1\\)"),
    (fuse_with(combine="stacked"), "add them up over the adapters"),
    (fuse_with(weights=scores(dim=1)), "the weights s are wrong .*softmax runs over the tokens"),
    (fuse_with(weights=scores(act="sigmoid")), "the weights s are wrong .*independent sigmoids"),
    (fuse_with(weights=scores(detach=True)), "no gradient reaches Q"),
    (lambda *a: 2 * fuse_with()(*a), "max error"),
])
def test_fuse_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_fuse, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (delta(query="h"), "the query is h, the FFN's output before the residual"),
    (delta(query="x"), "the query is x, the FFN's input"),
    (delta(query="x+h"), "x \\+ h without the LayerNorm"),
    (delta(out="h+o"), "h is added to the result"),
    (delta(out="close"), "already closed"),
    (delta(out="u+o"), "u is added to the result"),
    (delta(fuse=fuse_with(value="none")), "V is missing"),
])
def test_model_check_rejects_a_wrong_site(wrong, message):
    assert_rejects(check_fusion_in_model, wrong, message=f"fusion_delta in MiniLM: wrong output \\(layer 0.*{message}")


@pytest.mark.parametrize("wrong, message", [
    (lambda u, Q, b_Q, b_K: u @ b_K, "b_K meets the query q = u Q \\+ b_Q"),
    (lambda u, Q, b_Q, b_K: (u @ Q) @ b_K, "b_Q is missing"),
    (lambda u, Q, b_Q, b_K: (u @ Q.T + b_Q) @ b_K, "Q is applied transposed"),
    (lambda u, Q, b_Q, b_K: -((u @ Q + b_Q) @ b_K), "the sign is reversed"),
    (lambda u, Q, b_Q, b_K: (b_Q @ b_K).expand(u.shape[:2]), "the shift depends on the token"),
    (lambda u, Q, b_Q, b_K: ((u @ Q + b_Q) @ b_K).unsqueeze(-1), "drop the trailing axis"),
    (lambda u, Q, b_Q, b_K: (u @ Q + b_Q) * b_K, "keep the dot product's sum"),
])
def test_key_bias_shift_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_key_bias_shift, wrong, message=message)


def _weights_gap(u, z, Q, b_Q, K, b_K, V):
    return (scores_einsum(u, z, Q, b_Q, K, b_K) - 1 / z.shape[2]).abs().max().item()


@pytest.mark.parametrize("wrong, message", [
    (_weights_gap, "the weights' distance from uniform"),
    (lambda *a: (fuse_loop(*a) - a[1].mean(2)).abs().mean().item(), "the mean \\|o − average\\|"),
    (lambda *a: (fuse_loop(*a) - a[1].sum(2)).abs().max().item(), "sum of the adapters' outputs"),
    (lambda *a: (fuse_loop(*a) - a[1].mean(2) @ a[6]).abs().max().item(), "the average passed through V"),
    (lambda *a: ((fuse_loop(*a) - a[1].mean(2)).abs().max() / a[1].mean(2).abs().max()).item(),
     "relative to the average's size"),
    (lambda *a: (fuse_loop(*a) - a[1].mean(2)).abs(), "return one number"),
])
def test_gap_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_gap_from_average, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda d, L, N: N * L * (3 * d * d + 2 * d), "does not depend on N"),
    (lambda d, L, N: L * (3 * d * d + 2 * d) + N * d, "does not depend on N"),
    (lambda d, L, N: L * (3 * d * d + 3 * d), "V has no bias"),
    (lambda d, L, N: L * 3 * d * d, "the biases b_Q and b_K are missing"),
    (lambda d, L, N: L * (3 * d * d + d), "one of the biases b_Q, b_K is missing"),
    (lambda d, L, N: L * (2 * d * d + 2 * d), "V is missing"),
    (lambda d, L, N: 3 * d * d + 2 * d, "that is one layer"),
    (lambda d, L, N: L * (3 * d ** 2 + 2 * d) / 1, "return an integer count"),
    (lambda d, L, N: L * (3 * d * d + 2 * d) + 1, "Per layer: Q and K"),
])
def test_count_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_fusion_parameters, wrong, message=message)


def test_not_a_function_and_wrong_types():
    for check in (check_fusion_scores, check_fuse, check_fusion_in_model, check_key_bias_shift,
                  check_gap_from_average):
        assert_rejects(check, torch.zeros(2), message="expected a function")
    assert_rejects(check_fusion_scores, lambda *a: 0, message="should return a tensor")
    assert_rejects(check_fuse, lambda u, z, *a: [u, u], message="return one tensor")
    assert_rejects(check_gap_from_average, lambda *a: "small", message="should return a number")
