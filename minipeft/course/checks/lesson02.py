"""Lesson 02 checks: the LoRA forward pass, merging, and the parameter count.

    h = W0 x + b + (α/r) B A x          Hu et al. 2021, Eq. 3 (A: r×d_in, B: d_out×r)
    merge: W = W0 + (α/r) B A           Hu et al. 2021, §4.1
    count: L · |targets| · r(d_in + d_out)

References: ``minipeft.methods.lora.LoRALinear`` on an ``nn.Linear``, with the check's tensors copied in, and
``numel`` of the package's LoRA on encoders built on the meta device.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ...api import add_adapter
from ...backbones.encoder import Encoder, EncoderConfig
from ...methods.lora import LoRAConfig, LoRALinear
from . import call, fail, max_error, name_the_mistake, need_int, passed

MINILM = EncoderConfig.minilm()
BERT_BASE = EncoderConfig(name="BERT-base")
# (d_in, d_out, r, α, seed); squares included. No r = 2 or 4: there 2α/r = α and 2α/r = α/√r, and the scale
# mistakes (α, r/α, α/√r, a doubled ΔW, ...) could not be told apart.
CASES = ((6, 6, 3, 8.0, 0), (8, 5, 3, 6.0, 1), (10, 10, 5, 2.0, 2))


def _tensors(d_in: int, d_out: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    """x (B, T, d_in), W0 (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r): all non-zero."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"x": t(2, 3, d_in), "W0": t(d_out, d_in) / d_in ** 0.5, "b": t(d_out), "A": t(r, d_in) / d_in ** 0.5,
            "B": t(d_out, r) / r ** 0.5}


def _reference_module(W0, b, A, B, alpha: float, r: int) -> tuple[nn.Linear, LoRALinear]:
    linear = nn.Linear(W0.shape[1], W0.shape[0])
    lora = LoRALinear("ref", linear, LoRAConfig(r=r, alpha=alpha))
    with torch.no_grad():
        linear.weight.copy_(W0), linear.bias.copy_(b), lora.A.copy_(A), lora.B.copy_(B)
    return linear, lora


def reference_forward(x, W0, b, A, B, alpha: float, r: int) -> torch.Tensor:
    """W0 x + b + (α/r) B A x computed by the package's nn.Linear + LoRALinear."""
    linear, lora = _reference_module(W0, b, A, B, alpha, r)
    with torch.no_grad():
        return linear(x) + lora(x)


def reference_merge(W0, A, B, alpha: float, r: int) -> torch.Tensor:
    """W0 + (α/r) B A, by the package's ``LoRALinear.merge()``."""
    linear, lora = _reference_module(W0, torch.zeros(W0.shape[0]), A, B, alpha, r)
    lora.merge()
    return linear.weight.detach().clone()


def _forward_mistakes(x, W0, b, A, B, alpha, r) -> dict[str, torch.Tensor]:
    base, BA = x @ W0.T + b, B @ A  # BA: (d_out, d_in), like W0
    out = {
        "the scale α/r is missing: LoRA adds (α/r)·BAx, not BAx (the scale keeps the step size comparable "
        "across ranks, Hu et al. 2021 §4.1)": base + x @ BA.T,
        "the scale is upside down: use α/r, not r/α": base + (r / alpha) * x @ BA.T,
        "the scale is α alone: divide by the rank r (α/r)": base + alpha * x @ BA.T,
        "that is the rsLoRA scale α/√r; this exercise uses LoRA's α/r": base + alpha / r ** 0.5 * x @ BA.T,
        "the frozen part W0 x + b is missing: return the layer's whole output, W0 x + b + (α/r) B A x":
            (alpha / r) * x @ BA.T,
        "the bias b is missing (it belongs to the frozen layer: W0 x + b)": x @ W0.T + (alpha / r) * x @ BA.T,
    }
    if W0.shape[0] == W0.shape[1]:
        out["the product is transposed: ΔW = BA is (d_out, d_in) like W0, so apply it to x the way nn.Linear "
            "applies W0 (A first, then B); the transposed product only runs because this layer is square"] = (
            base + (alpha / r) * x @ BA)
        out["W0 is transposed: nn.Linear stores it as (d_out, d_in), so W0 x is x @ W0.T"] = (
            x @ W0 + b + (alpha / r) * x @ BA.T)
    return out


def check_lora_forward(fn) -> None:
    """``fn(x, W0, b, A, B, alpha, r) -> W0 x + b + (α/r) B A x``, weights stored as ``nn.Linear`` stores them:
    x (..., d_in), W0 (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r)."""
    name = "lora_forward"
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        try:
            got = fn(t["x"], t["W0"], t["b"], t["A"], t["B"], alpha, r)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
            fail(name, f"calling it with d_in={d_in}, d_out={d_out}, r={r} raised {type(e).__name__}: {e}. Shapes: "
                 "x (..., d_in), W0 (d_out, d_in), A (r, d_in), B (d_out, r), as nn.Linear stores weights: "
                 "W0 x is x @ W0.T, and A and B are applied to x the same way, A first.")
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor, got {type(got).__name__}")
        want = reference_forward(**t, alpha=alpha, r=r)
        if got.shape != want.shape:
            fail(name, f"returned shape {tuple(got.shape)} for x of shape {tuple(t['x'].shape)} and d_out={d_out}; "
                 f"expected {tuple(want.shape)}" + ("; that is the rank-r bottleneck A x: B brings it back up to "
                                                   "d_out." if got.shape[-1:] == (r,) else "."))
        if torch.allclose(got, want, atol=1e-5):
            _check_gradients(name, fn, t, alpha, r)
            continue
        name_the_mistake(name, got, _forward_mistakes(**t, alpha=alpha, r=r))
        fail(name, f"wrong output (d_in={d_in}, d_out={d_out}, r={r}, α={alpha}; {max_error(got, want)}); "
             "expected W0 x + b + (α/r) B A x: A applied to x first, then B, each as nn.Linear applies a weight.")
    passed(name, "W0 x + b + (α/r) B A x, equal to minipeft's LoRALinear (square and rectangular layers), "
           "and gradients reach A and B")


def _check_gradients(name: str, fn, t: dict, alpha: float, r: int) -> None:
    """The gradients of a random projection of ``fn``'s output with respect to A and B equal LoRALinear's.

    Right values are not enough: a forward that uses ``A.detach()`` (or ``.data``, ``.tolist()``) computes them
    too, and at LoRA's initialisation (B = 0) A's gradient is zero anyway, so the first training step cannot tell
    either. Here B ≠ 0."""
    A, B = t["A"].clone().requires_grad_(), t["B"].clone().requires_grad_()
    linear, lora = _reference_module(t["W0"], t["b"], t["A"], t["B"], alpha, r)
    want = linear(t["x"]) + lora(t["x"])
    cotangent = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    want_A, want_B = torch.autograd.grad(want, [lora.A, lora.B], cotangent)
    got = fn(t["x"], t["W0"], t["b"], A, B, alpha, r)
    if got.requires_grad:
        got_A, got_B = torch.autograd.grad(got, [A, B], cotangent, allow_unused=True)
    else:
        got_A = got_B = None
    for what, g, w in (("A", got_A, want_A), ("B", got_B, want_B)):
        if g is None or not g.abs().any():
            fail(name, f"the output is right but no gradient reaches {what}: it was cut from the graph (detach(), "
                 ".data, .item() or .tolist(), or a new tensor built from its values), so training would never "
                 f"update {what}. Use the tensor {what} itself in the computation.")
        if not torch.allclose(g, w, atol=1e-5):
            fail(name, f"the output is right but the gradient with respect to {what} is wrong "
                 f"({max_error(g, w)}): compute the output from A and B themselves, with no in-place changes.")


def check_merge(fn) -> None:
    """``fn(W0, A, B, alpha, r) -> W0 + (α/r) B A``, a new (d_out, d_in) tensor; W0 itself left unchanged."""
    name = "merge"
    for d_in, d_out, r, alpha, seed in CASES:
        t = _tensors(d_in, d_out, r, seed)
        W0, A, B = t["W0"], t["A"], t["B"]
        W0_before = W0.clone()
        try:
            got = fn(W0, A, B, alpha, r)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
            fail(name, f"calling it with d_in={d_in}, d_out={d_out}, r={r} raised {type(e).__name__}: {e}. "
                 "B is (d_out, r) and A is (r, d_in), so B @ A is (d_out, d_in), the shape of W0.")
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor, got {type(got).__name__}")
        want = reference_merge(W0_before, A, B, alpha, r)
        if not torch.equal(W0, W0_before):
            fail(name, "it changed W0 in place: return W0 + ΔW as a new tensor (the check, like unmerge, "
                 "needs the original W0).")
        if got.shape != want.shape:
            fail(name, f"returned shape {tuple(got.shape)}; the merged weight has W0's shape {tuple(want.shape)} "
                 "(d_out, d_in)" + (": B @ A, not A.T @ B.T." if got.shape == want.shape[::-1] else
                                    ": that is A B (r, r); ΔW is B A." if got.shape == (r, r) else "."))
        if torch.allclose(got, want, atol=1e-6):
            continue
        BA = B @ A
        mistakes = {"the scale α/r is missing: W = W0 + (α/r) B A": W0 + BA,
                    "the scale is upside down: use α/r, not r/α": W0 + (r / alpha) * BA,
                    "the scale is α alone: divide by the rank r": W0 + alpha * BA,
                    "only ΔW was returned: add it to W0": (alpha / r) * BA,
                    "ΔW was added twice (W0 + 2·(α/r) B A), as if the weight were merged twice: add it once":
                        W0 + 2 * (alpha / r) * BA,
                    "ΔW is transposed: it is B @ A (d_out, d_in), like W0, not (B @ A).T = A.T @ B.T":
                        W0 + (alpha / r) * BA.T}
        name_the_mistake(name, got, mistakes, atol=1e-6)
        fail(name, f"wrong merged weight ({max_error(got, want)}); expected W0 + (α/r) B A, of W0's shape "
             "(d_out, d_in).")
    passed(name, "W0 + (α/r) B A, equal to minipeft's LoRALinear.merge()")


@lru_cache(maxsize=None)
def _numel(backbone: str, r: int, targets: tuple) -> int:
    with torch.device("meta"):
        encoder = Encoder({c.name: c for c in (MINILM, BERT_BASE)}[backbone])
        add_adapter(encoder, LoRAConfig(r=r, targets=list(targets)), "a")
    return sum(p.numel() for n, p in encoder.named_parameters() if ".output_deltas.a." in n)


def check_lora_parameters(fn) -> None:
    """``fn(d, L, r, n_targets) -> int``: LoRA on ``n_targets`` square d×d projections in each of L layers."""
    name = "lora_parameters"
    for cfg, r, targets in ((BERT_BASE, 4, ("q", "k", "v", "o")), (MINILM, 8, ("q", "v")), (BERT_BASE, 8, ("q", "v"))):
        d, L, n = cfg.hidden_size, cfg.num_layers, len(targets)
        want, got = _numel(cfg.name, r, targets), call(name, fn, d, L, r, n)
        need_int(name, got, f"for d={d}, L={L}, r={r}, {n} targets")
        if got == want:
            continue
        hints = {L * n * r * d: "that counts A or B only: each target has both, r·d_in + d_out·r = r(d_in + d_out).",
                 n * r * 2 * d: f"that is one layer: multiply by L={L}.", L * r * 2 * d: "multiply by the number of "
                 "targets per layer.", L * n * d * d: "that counts the full d×d update ΔW = BA of each target; LoRA "
                 "stores only its two thin factors A and B."}
        fail(name, f"gave {got!r} for d={d}, L={L}, r={r}, {n} targets {targets}; numel says {want:,}: "
             + hints.get(got, "each target has A (r×d) and B (d×r)."))
    passed(name, "L · |targets| · r(d_in + d_out) matches numel (BERT-base, r=8 on q, v: 294,912)")


# ---- a derivation: the rank at which LoRA spends a given budget -----------------------------------------------

RANK_CASES = ((384, 6, 4, 299_904), (384, 6, 2, 299_904), (768, 12, 2, 2_379_264), (768, 12, 2, 294_912),
              (64, 2, 2, 100))


def reference_rank_for_budget(d: int, L: int, n_targets: int, budget: int) -> int:
    """The largest r >= 0 with L · n_targets · r(d + d) <= budget (square d×d targets)."""
    return budget // (L * n_targets * 2 * d)


def check_rank_for_budget(fn) -> None:
    """``fn(d, L, n_targets, budget) -> int``: the largest rank r whose LoRA on ``n_targets`` square d×d
    projections in each of L layers has at most ``budget`` parameters (0 if not even r = 1 fits)."""
    name = "rank_for_budget"
    for d, L, n, budget in RANK_CASES:
        got = call(name, fn, d, L, n, budget)
        need_int(name, got, f"for d={d}, L={L}, {n} targets, budget={budget:,}")
        want = reference_rank_for_budget(d, L, n, budget)
        if got == want:
            continue
        where = f"for d={d}, L={L}, {n} targets, budget={budget:,}: gave r={got}, expected {want}."
        cost = lambda r: L * n * r * 2 * d  # noqa: E731
        if got == budget // (L * n * d):
            hint = " Each target has two factors, A (r×d) and B (d×r): a rank costs 2d per target, not d."
        elif got == budget // (n * 2 * d):
            hint = f" That spends the budget on one layer: every one of the L={L} layers gets its own A and B."
        elif got == budget // (L * 2 * d):
            hint = f" That is for one target per layer: the budget is shared by all {n} targets."
        elif got > want and cost(got) > budget:
            hint = f" r={got} costs {cost(got):,} parameters, over the budget: round down, not to the nearest."
        elif got < want:
            hint = f" r={got + 1} still fits ({cost(got + 1):,} parameters): find the largest."
        else:
            hint = " Write LoRA's count as a function of r, solve count(r) <= budget, round down."
        fail(name, where + hint)
    passed(name, "the largest rank within the budget (MiniLM, BERT-base; 2 and 4 targets)")
