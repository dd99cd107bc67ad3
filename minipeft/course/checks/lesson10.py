"""Lesson 10 checks (exercise 10, DoRA): the decomposed weight and its gradient, and the magnitude's initialisation.

    W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_c,   s = α/r,   the norm a constant in the backward    Liu et al. 2024, Eq. 5, §4.3
    m at the start = ‖W0 + sBA‖_c   (= ‖W0‖_c when B = 0: W' = W0 + sBA, the layer as it was)

‖·‖_c is the norm of each output unit's weights: a row of ``nn.Linear``'s (d_out, d_in) weight, one per output.

References: ``minipeft.methods.dora.DoRALinear`` on an ``nn.Linear`` with the check's tensors copied in: W' read off
its forward on the identity (bias 0), so its gradients are the package's; the magnitude is its ``weight_norm()``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...methods.dora import DoRAConfig, DoRALinear
from . import fail, max_error, name_the_mistake, passed

# (d_in, d_out, r, α, seed): a square layer (where a norm over the wrong axis still runs) and two rectangular ones;
# s = α/r is never 1, so a missing or doubled scale is told apart from the right one
CASES = ((6, 6, 3, 8.0, 0), (8, 5, 3, 6.0, 1), (10, 4, 5, 2.0, 2))


def _tensors(d_in: int, d_out: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    """W0 (d_out, d_in), A (r, d_in), B (d_out, r) ≠ 0 (as if trained), m (d_out,) > 0 away from ‖W0 + sBA‖_c."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"W0": t(d_out, d_in) / d_in ** 0.5, "A": t(r, d_in) / d_in ** 0.5, "B": t(d_out, r) / r ** 0.5,
            "m": 0.5 + torch.rand(d_out, generator=g)}


def _reference_layer(W0, A, B, m, alpha: float, r: int) -> DoRALinear:
    linear = nn.Linear(W0.shape[1], W0.shape[0])
    dora = DoRALinear("ref", linear, DoRAConfig(r=r, alpha=alpha))
    with torch.no_grad():
        linear.weight.copy_(W0), linear.bias.zero_(), dora.A.copy_(A), dora.B.copy_(B), dora.m.copy_(m)
    return dora


def _package_weight(dora: DoRALinear) -> torch.Tensor:
    """W' as the package computes it, with its autograd graph: its forward on the identity, transposed."""
    eye = torch.eye(dora.base_layer.in_features)
    return (dora.base_layer(eye) + dora(eye)).T  # (d_out, d_in)


def reference_weight(W0, A, B, m, alpha: float, r: int) -> torch.Tensor:
    """m ⊙ (W0 + sBA) / ‖W0 + sBA‖_c by the package's ``DoRALinear``."""
    with torch.no_grad():
        return _package_weight(_reference_layer(W0, A, B, m, alpha, r))


def reference_magnitude(W0, A, B, alpha: float, r: int) -> torch.Tensor:
    """‖W0 + sBA‖_c by the package's ``DoRALinear.weight_norm()``."""
    return _reference_layer(W0, A, B, torch.ones(W0.shape[0]), alpha, r).weight_norm()


def _weight_mistakes(W0, A, B, m, alpha, r) -> dict[str, torch.Tensor]:
    s, BA = alpha / r, B @ A
    V = W0 + s * BA
    rows = lambda V: V.norm(dim=1, keepdim=True)  # noqa: E731  (d_out, 1)
    out = {
        "the norm is over the wrong axis: ‖·‖_c is one norm per output unit, over the input axis (a row of "
        "nn.Linear's (d_out, d_in) weight: dim=1), not one per input column (dim=0)": m[:, None] * V / V.norm(
            dim=0, keepdim=True),
        "the scale s = α/r is applied twice (s²BA): the update is W0 + s·BA, scaled once": m[:, None] * (
            W0 + s * s * BA) / rows(W0 + s * s * BA),
        "the scale s = α/r is missing: the update is W0 + (α/r)·BA, as LoRA's": m[:, None] * (W0 + BA) / rows(W0 + BA),
        "the norm is of W0 alone: divide by the norm of the adapted weight W0 + sBA": m[:, None] * V / rows(W0),
        "the magnitude m is missing: each row of the direction has norm 1, then m scales it": V / rows(V),
        "the direction is not normalised: divide W0 + sBA by its norm ‖W0 + sBA‖_c before m scales it":
            m[:, None] * V,
        "m scales the columns: it holds one magnitude per output unit, a row of the (d_out, d_in) weight":
            V / rows(V) * m[None, :] if m.shape[0] == V.shape[1] else None,
        "only the update was returned: W' is the whole weight m ⊙ (W0 + sBA)/‖W0 + sBA‖_c": m[:, None] * s * BA / rows(
            s * BA),
    }
    if BA.shape[0] == BA.shape[1]:
        out["BA is transposed: ΔW = B @ A is (d_out, d_in), like W0"] = m[:, None] * (W0 + s * BA.T) / rows(
            W0 + s * BA.T)
    return {k: v for k, v in out.items() if v is not None}


def _call(name: str, fn, args: tuple, shapes: str):
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
        fail(name, f"calling it raised {type(e).__name__}: {e}. Shapes: {shapes}")


SHAPES = ("W0 (d_out, d_in), A (r, d_in), B (d_out, r), m (d_out,): ΔW = B @ A has W0's shape, and ‖·‖_c gives one "
          "norm per output unit (d_out,).")


def check_dora_weight(fn) -> None:
    """``fn(W0, A, B, m, alpha, r) -> W'``: m ⊙ (W0 + sBA)/‖W0 + sBA‖_c, (d_out, d_in), the norm detached."""
    name = "dora_weight"
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        got = _call(name, fn, (t["W0"], t["A"], t["B"], t["m"], alpha, r), SHAPES)
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor, got {type(got).__name__}")
        want = reference_weight(**t, alpha=alpha, r=r)
        if got.shape != want.shape:
            fail(name, f"returned shape {tuple(got.shape)} for d_out={d_out}, d_in={d_in}; W' has W0's shape "
                 f"{tuple(want.shape)}" + ("; a norm over the wrong axis gives one per input (d_in,): ‖·‖_c is one "
                                           "per output unit, over dim=1." if d_in in got.shape[-1:] else "."))
        if torch.allclose(got, want, atol=1e-5):
            _check_gradients(name, fn, t, alpha, r)
            continue
        name_the_mistake(name, got, _weight_mistakes(**t, alpha=alpha, r=r))
        fail(name, f"wrong weight (d_in={d_in}, d_out={d_out}, r={r}, α={alpha}; {max_error(got, want)}); expected "
             "m ⊙ (W0 + (α/r) B A) / ‖W0 + (α/r) B A‖_c, the norm taken over each row.")
    passed(name, "m ⊙ (W0 + sBA)/‖W0 + sBA‖_c, equal to minipeft's DoRALinear (square and rectangular layers), and "
           "its gradients, with the norm a constant (Liu et al. 2024, §4.3)")


def _check_gradients(name: str, fn, t: dict, alpha: float, r: int) -> None:
    """The gradients of a random projection of W' with respect to A, B and m equal the package's, where the norm is
    detached; the gradients of the same W' with the norm *not* detached are named (the values cannot tell)."""
    A, B, m = (t[k].clone().requires_grad_() for k in ("A", "B", "m"))
    dora = _reference_layer(t["W0"], t["A"], t["B"], t["m"], alpha, r)
    want_W = _package_weight(dora)
    cotangent = torch.randn(want_W.shape, generator=torch.Generator().manual_seed(7))
    want = torch.autograd.grad(want_W, [dora.A, dora.B, dora.m], cotangent)
    got_W = fn(t["W0"], A, B, m, alpha, r)
    got = torch.autograd.grad(got_W, [A, B, m], cotangent, allow_unused=True) if got_W.requires_grad else (None,) * 3
    V = t["W0"] + (alpha / r) * B @ A  # the same W' with the norm in the graph
    undetached = torch.autograd.grad(m[:, None] * V / V.norm(dim=1, keepdim=True), [A, B], cotangent)
    for what, g, w, u in zip(("A", "B", "m"), got, want, (*undetached, None)):
        if g is None or not g.abs().any():
            fail(name, f"the weight is right but no gradient reaches {what}: it was cut from the graph (detach(), "
                 f".data, .item() or .tolist(), or a new tensor from its values), so training would never update "
                 f"{what}. Detach the norm only.")
        if torch.allclose(g, w, atol=1e-5):
            continue
        if u is not None and torch.allclose(g, u, atol=1e-5):
            fail(name, f"the weight is right but the gradient of {what} flows through the norm ‖W0 + sBA‖_c: §4.3 "
                 "treats the norm as a constant (detach it), which saves the memory of its backward.")
        fail(name, f"the weight is right but the gradient with respect to {what} is wrong ({max_error(g, w)}): "
             "compute W' from A, B and m themselves, the norm (only) detached, with no in-place changes.")


def check_init_magnitude(fn) -> None:
    """``fn(W0, A, B, alpha, r) -> m``: ‖W0 + sBA‖_c (d_out,), so that the DoRA layer starts as the layer it is
    made from (here a trained LoRA, B ≠ 0: W' = W0 + sBA)."""
    name = "init_magnitude"
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        W0, A, B, s = t["W0"], t["A"], t["B"], alpha / r
        got = _call(name, fn, (W0, A, B, alpha, r), SHAPES)
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor, got {type(got).__name__}")
        want = reference_magnitude(W0, A, B, alpha, r)
        got = got.detach()
        if got.shape != want.shape:
            fail(name, f"returned shape {tuple(got.shape)}; m holds one magnitude per output unit, ({d_out},)" + (
                ": that norm is over the wrong axis (one per input); ‖·‖_c is over dim=1." if got.shape == (d_in,)
                else ": that is the norm of the whole matrix; take one per row." if got.numel() == 1 else "."))
        if torch.allclose(got, want, atol=1e-6):
            continue
        BA = B @ A
        mistakes = {
            "the magnitude is initialised from the wrong matrix, W0 alone: this layer already holds a LoRA (B ≠ 0), and DoRA must "
            "start as the weight it computes with, W0 + sBA (the two are equal only when B = 0)": W0.norm(dim=1),
            "the magnitude is initialised from the wrong matrix, the update sBA alone: take the norm of the whole weight W0 + sBA":
                (s * BA).norm(dim=1),
            "the scale s = α/r is applied twice (s²BA): the layer's weight is W0 + s·BA": (W0 + s * s * BA).norm(dim=1),
            "the scale s = α/r is missing: the layer's weight is W0 + (α/r)·BA": (W0 + BA).norm(dim=1),
            "the magnitude is squared: ‖·‖ is the square root of the sum of squares": (W0 + s * BA).pow(2).sum(1)}
        if d_in == d_out:
            mistakes["the norm is over the wrong axis: one per output unit, over the input axis (dim=1), not one per "
                     "input column"] = (W0 + s * BA).norm(dim=0)
        name_the_mistake(name, got, mistakes, atol=1e-6)
        fail(name, f"wrong magnitude ({max_error(got, want)}); expected ‖W0 + (α/r) B A‖_c, one norm per row.")
    passed(name, "m = ‖W0 + sBA‖_c, equal to minipeft's DoRALinear.weight_norm(): the DoRA layer starts as the "
           "layer it is made from")
