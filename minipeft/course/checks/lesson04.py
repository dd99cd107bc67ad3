"""Lesson 04 checks: the parallel adapter's forward, Δh = s · A(x), and a module that plugs into a site.

Reference: ``minipeft.methods.parallel.ParallelAdapter`` (He et al. 2022, Table 1 / §4.1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...methods.parallel import ParallelAdapter, ParallelAdapterConfig
from . import call, fail, passed

D, R = 12, 4


def _layers(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    down, up = nn.Linear(D, R), nn.Linear(R, D)
    with torch.no_grad():
        for p in (*down.parameters(), *up.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return down, up


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)  # x (B, T, d), h (B, T, d)


def _diagnose(got, x, h, down, up, s) -> str:
    """Name the plausible mistake that gives ``got``."""
    a = lambda u: up(F.relu(down(u)))  # noqa: E731
    wrong = [(s * a(h), "it depends on h, the sublayer's *output*: a parallel adapter reads the sublayer's "
                        "*input* x (h ← h + s·A(x)); reading h is the sequential adapter"),
             (s * a(x + h), "it reads x + h: a parallel adapter reads only the sublayer's input x"),
             (a(x), "the scale s is missing: return s · W_up f(W_down x + b_down) + ..."),
             (a(x) * s ** 2, "s is applied twice"),
             (s * up(down(x)), "the nonlinearity is missing: f = ReLU between W_down and W_up"),
             (s * F.relu(up(down(x))), "ReLU belongs after W_down (the bottleneck), not after W_up"),
             (s * F.linear(F.relu(down(x)), up.weight) + up.bias,
              "s should scale the whole A(x), b_up included (as He et al.'s code does: up_proj(...) * scale)"),
             (h + s * a(x), "return only Δh: the site adds it to h (and the residual x) itself"),
             (x + s * a(x), "return only Δh: the residual x is added by the site, not by the adapter"),
             (s * up(F.gelu(down(x))), "f is ReLU here, not GELU")]
    for candidate, message in wrong:
        if got.shape == candidate.shape and torch.allclose(got, candidate, atol=1e-5):
            return message
    if not torch.isfinite(got).all():
        return "Δh contains nan or inf"
    base = a(x)
    c = float((got * base).sum() / (base * base).sum())  # got = c · A(x)?
    if abs(c - s) > 1e-4 and torch.allclose(got, c * base, atol=1e-5):
        return f"Δh is {c:.4g}·A(x) but s = {s:g}: the scale is hard-coded; use the scale you are given"
    return "compare with s · (W_up relu(W_down x + b_down) + b_up), x the sublayer input"


def check_parallel_delta(fn) -> None:
    """``fn(x, h, down, up, s) -> Δh``: s · (W_up relu(W_down x + b_down) + b_up), computed from x only."""
    name = "parallel_delta"
    for s in (4.0, 1.0, 2.5):
        down, up = _layers()
        x, h = _inputs()
        with torch.no_grad():
            got = call(name, fn, x, h, down, up, s, hint="x and h are (B, T, d); down = nn.Linear(d, r) and "
                       "up = nn.Linear(r, d) are layers: call them on a tensor.")
            want = s * up(F.relu(down(x)))
            if not isinstance(got, torch.Tensor):
                fail(name, f"should return a tensor, got {type(got).__name__}")
            if got.shape != want.shape:
                fail(name, f"returned shape {tuple(got.shape)}, expected {tuple(want.shape)} (the shape of h)"
                     + ("; that is the r-wide bottleneck: up brings it back to d." if got.shape[-1:] == (R,) else ""))
            if not torch.allclose(got, want, atol=1e-5):
                fail(name, f"wrong Δh with s={s}: " + _diagnose(got, x, h, down, up, s) + ".")
    passed(name, "Δh = s·A(x) for s = 4, 1, 2.5; it reads the sublayer input x and ignores h")


def check_parallel_module(cls) -> None:
    """``cls(adapter_name, d, r, scale)``: an AdapterModule with ``down``/``up`` Linears initialised as in He et
    al. (Kaiming-uniform down, zero up and biases), ``scale`` a fixed number or, for "learned", an
    ``nn.Parameter`` starting at 1, and ``forward(x, h, norm) -> Δh``."""
    name = "ParallelAdapter module"
    d, r = 48, 8
    torch.manual_seed(0)
    module = call(name, cls, "mine", d, r, 4.0)
    for attr, shape in (("down", (r, d)), ("up", (d, r))):
        layer = getattr(module, attr, None)
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape or layer.bias is None:
            fail(name, f"needs self.{attr} = nn.Linear with bias and weight shape {shape}")
    if torch.count_nonzero(module.up.weight) or torch.count_nonzero(module.up.bias):
        fail(name, "W_up and b_up must start at zero, so that Δh = 0 and the model starts as the base model")
    bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=√5): U(-1/√d, 1/√d)
    w = module.down.weight.detach()
    if not torch.count_nonzero(w) or w.abs().max() > bound + 1e-6 or w.abs().max() < 0.8 * bound:
        fail(name, f"W_down should be Kaiming-uniform, nn.init.kaiming_uniform_(w, a=math.sqrt(5)): values in "
                   f"±1/√d = ±{bound:.3f}; got max |w| = {float(w.abs().max()):.3f}")
    if torch.count_nonzero(module.down.bias):
        fail(name, "b_down starts at zero in He et al.'s initialisation")
    learned = call(name, cls, "mine", d, r, "learned", hint='scale="learned" is not a number: it asks for a trainable '
                   "scale, one nn.Parameter starting at 1.")
    s = getattr(learned, "scale", None)
    if not isinstance(s, nn.Parameter) or s.numel() != 1 or float(s.detach()) != 1.0:
        fail(name, 'with scale="learned", self.scale must be one nn.Parameter (numel 1) starting at 1.0')
    if isinstance(getattr(module, "scale", None), nn.Parameter):
        fail(name, "a fixed scale (4.0) must not be a trainable nn.Parameter")
    # same weights as the reference -> same Δh, from x alone: a fixed s of 4, a fixed s ≠ 4, a learned s (set to 1.7)
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(2, 3, 2, d, generator=g).unbind(0)
    for scale, s in ((4.0, 4.0), (2.5, 2.5), ("learned", 1.7)):
        mine = module if scale == 4.0 else learned if scale == "learned" else call(name, cls, "mine", d, r, scale)
        ref = ParallelAdapter("ref", d, r, ParallelAdapterConfig(r=r, scale=s))
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            mine.down.load_state_dict(ref.down.state_dict())
            mine.up.load_state_dict(ref.up.state_dict())
            if scale == "learned":
                mine.scale.fill_(s)  # as if trained
            want = ref(x, h, None)
        got = call(name, mine, x, h, nn.LayerNorm(d), hint="forward(x, h, norm) gets x and h of shape (B, T, d).")
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            fail(name, f"forward(x, h, norm) should return Δh of shape {tuple(x.shape)}")
        if not torch.allclose(got, want, atol=1e-5):
            what = f"scale={scale!r}" + (f" (s = {s})" if scale == "learned" else "")
            with torch.no_grad():
                fail(name, f"forward gives the wrong Δh with {what}: {_diagnose(got, x, h, mine.down, mine.up, s)}.")
        if scale == "learned":
            grad = torch.autograd.grad(got.sum(), mine.scale, allow_unused=True)[0] if got.requires_grad else None
            if grad is None or not torch.allclose(grad, (want / s).sum(), rtol=1e-4, atol=1e-4):
                fail(name, "the scale is detached: no gradient reaches s, so a learned s never trains. Keep s a "
                     "tensor in the graph all the way to Δh (float(...) or .item() turn it into a constant, in "
                     "forward or in parallel_delta).")
    passed(name, "He et al.'s init (W_down Kaiming-uniform, W_up = 0), fixed or learned s, Δh = s·A(x)")


# ---- an experiment: can Δh be merged into the frozen weights? -------------------------------------------------

def reference_affine_residual(X: torch.Tensor, Y: torch.Tensor) -> float:
    """‖Y − (X W + b)‖_F / ‖Y‖_F for the least-squares W, b: how far Y is from any affine function of X."""
    X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], dim=1).double()  # (N, d + 1)
    sol = torch.linalg.lstsq(X1, Y.double(), driver="gelsd").solution  # (d + 1, out)
    return ((Y.double() - X1 @ sol).norm() / Y.double().norm()).item()


def _residual_cases():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    W, b = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    affine = X @ W + 3.0 * b  # exactly affine, with a large offset: a fit without b cannot reach it
    nonlinear = torch.relu(X @ W) + 0.5 * b
    return {"an exactly affine Y = XW + b": (X, affine), "Y = relu(XW) + b/2": (X, nonlinear),
            "the same Y times 100": (X, 100.0 * nonlinear)}


def check_affine_residual(fn) -> None:
    """``fn(X, Y) -> float``: the relative residual ‖Y − (XW + b)‖_F / ‖Y‖_F of the best (least-squares) affine
    fit of Y (N, out) from X (N, d). 0 means Y = XW + b exactly: such a Δh could be folded into a linear layer."""
    name = "affine_residual"
    for what, (X, Y) in _residual_cases().items():
        got = call(name, fn, X.clone(), Y.clone(), hint="X is (N, d) and Y is (N, out); solve for W (d, out) and b.")
        try:
            got = float(got)
        except (TypeError, ValueError):
            fail(name, f"should return a number (a float), got {type(got).__name__}")
        want = reference_affine_residual(X, Y)
        if abs(got - want) <= 1e-4 + 1e-3 * want:
            continue
        Xd, Yd = X.double(), Y.double()
        no_bias = ((Yd - Xd @ torch.linalg.lstsq(Xd, Yd).solution).norm() / Yd.norm()).item()
        absolute = want * Yd.norm().item()
        if abs(got - no_bias) <= 1e-4 + 1e-3 * no_bias:
            hint = (" That is the best *linear* fit XW: an adapter's Δh has biases, so allow an offset b too "
                    "(the merged layer would keep a bias).")
        elif abs(got - absolute) <= 1e-3 * max(1.0, absolute):
            hint = " That is the absolute residual: divide by ‖Y‖ so that the answer does not depend on Y's scale."
        elif abs(got - want ** 2) <= 1e-4 + 1e-3 * want ** 2:
            hint = " That is the squared ratio: use norms, not squared norms."
        else:
            hint = (" Fit W and b by least squares on all N rows at once (e.g. with a column of ones appended to "
                    "X), then compare the fitted values with Y.")
        fail(name, f"on {what}: gave {got:.4g}, expected {want:.4g}." + hint)
    passed(name, "0 for an affine Y, the least-squares residual otherwise, independent of Y's scale")
