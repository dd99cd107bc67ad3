"""Lesson 09's checks accept cached attention with a prefix done right (the solution notebook's own code, and
another right way to write it) and reject the plausible mistakes with a message that names them; the unfilled
exercise stops with NotImplementedError."""
import math

import pytest
import torch
import torch.nn.functional as F

from minipeft.course.checks.lesson09 import (MISTAKES, check_cached_attention, check_cached_decoding,
                                             check_kv_cache_numbers, check_rope, mistaken_attention)
from checking import assert_passes, assert_rejects, assert_unfilled_stops
from helpers import notebook_functions

NAME = "09_generation.ipynb"
FUNCTIONS = ("rope", "cached_attention", "kv_cache_numbers")


def functions_from(folder: str) -> dict:
    return notebook_functions(NAME, folder, FUNCTIONS)


SOLUTION = functions_from("solutions")


def test_the_solution_passes(capsys):
    assert_passes(capsys, (check_rope, SOLUTION["rope"]), (check_cached_attention, SOLUTION["cached_attention"]),
                  (check_cached_decoding, SOLUTION["cached_attention"]),
                  (check_kv_cache_numbers, SOLUTION["kv_cache_numbers"]))


def attention_with_sdpa(attn, x, cache, prefix, theta):
    """Right, written otherwise: the prefix as a (B, l, w) batch, the fused kernel with an explicit mask."""
    B, T, _ = x.shape
    split = lambda t, n: t.unflatten(-1, (n, attn.d_h)).transpose(1, 2)  # noqa: E731
    q, k, v = split(attn.q(x), attn.H), split(attn.k(x), attn.H_kv), split(attn.v(x), attn.H_kv)
    if "k" not in cache:
        l = 0 if prefix is None else prefix[0].shape[0]
        empty = k.new_zeros(B, attn.H_kv, 0, attn.d_h)
        pk, pv = (empty, empty) if prefix is None else (split(p.expand(B, -1, -1), attn.H_kv) for p in prefix)
        cache.update(k=pk, v=pv, prefix_len=l)
    start = cache["k"].shape[2] - cache["prefix_len"]
    q, k = (SOLUTION["rope"](t, torch.arange(start, start + T), theta) for t in (q, k))
    cache["k"], cache["v"] = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    K = cache["k"].shape[2]
    mask = torch.ones(T, K, dtype=torch.bool).tril(K - T)
    a = F.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=mask, enable_gqa=True)
    return attn.o(a.transpose(1, 2).flatten(2))


def test_another_right_answer_passes(capsys):
    assert_passes(capsys, (check_cached_attention, attention_with_sdpa))


def test_the_unfilled_exercise_stops_with_not_implemented():
    fns = functions_from("exercises")
    for check, f in ((check_rope, "rope"), (check_cached_attention, "cached_attention"),
                     (check_kv_cache_numbers, "kv_cache_numbers")):
        assert_unfilled_stops(check, exercise=fns[f])


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_attention_mistakes_are_named(mistake):
    message = assert_rejects(check_cached_attention,
                             lambda a, x, c, p, t: mistaken_attention(a, x, c, p, t, mistake),
                             message="✘ cached_attention")
    assert MISTAKES[mistake][:40] in message


def test_the_model_check_fails_on_a_wrong_attention():
    assert_rejects(check_cached_decoding,
                   lambda a, x, c, p, t: mistaken_attention(a, x, c, p, t, "heads shared wrongly"),
                   message="check_cached_attention finds the mistake")


def rope_adjacent(x, positions, theta):
    d_h = x.shape[-1]
    angles = positions[:, None].float() * theta ** (-torch.arange(0, d_h, 2).float() / d_h)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1).flatten(-2)


def rope_backwards(x, positions, theta):
    return SOLUTION["rope"](x, -positions, theta)


def rope_exponent(x, positions, theta):
    d_h = x.shape[-1]
    angles = positions[:, None].float() * theta ** (-torch.arange(d_h // 2).float() / d_h)
    angles = torch.cat([angles, angles], -1)
    x1, x2 = x.chunk(2, -1)
    return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()


@pytest.mark.parametrize("wrong, message", [
    (rope_adjacent, "adjacent pairs"), (rope_backwards, "wrong way"), (rope_exponent, "the exponent has 2i"),
    (lambda x, p, t: x, "differs from the decoder's RoPE"),
])
def test_rope_mistakes_are_named(wrong, message):
    assert_rejects(check_rope, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (lambda L, H_kv, d_h, l, S: L * H_kv * d_h * (l + S), "the keys only"),
    (lambda L, H_kv, d_h, l, S: 2 * L * 9 * d_h * (l + S), "H = 9 query heads"),
    (lambda L, H_kv, d_h, l, S: 2 * L * H_kv * d_h * S, "prefix's l positions"),
    (lambda L, H_kv, d_h, l, S: 2.0 * L * H_kv * d_h * (l + S), "not a float"),
])
def test_count_mistakes_are_named(wrong, message):
    assert_rejects(check_kv_cache_numbers, wrong, message=message)


def test_nearest_mistake_is_far_above_the_tolerance():
    """The module docstring's claim: dividing by √d instead of √d_h moves the output by > 0.05 relative."""
    from minipeft.course.checks.lesson09 import _inputs, reference_attention
    from minipeft.backbones.decoder import LayerKV

    attn, x, prefix, theta = _inputs()
    with torch.no_grad():
        want = reference_attention(attn, x[:, :6], LayerKV(), prefix, theta)
        wrong = mistaken_attention(attn, x[:, :6], {}, prefix, theta, "scaled by sqrt(d)")
    assert (wrong - want).abs().max() > 0.05 * want.abs().max()
    assert math.isclose(attn.H * attn.d_h, 576)
