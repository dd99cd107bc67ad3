"""Lesson 07 checks: AdapterFusion's attention over adapters (Pfeiffer et al. 2021, §3, Fig. 2), against minipeft's
``FusionLayer``.

Per token, with N adapters at a layer's FFN site (row vectors, as in the paper: ``u @ Q``):

    u      (B, T, d)      the query: the FFN block's closed output before any adapter, close(h) = LN(x + h) on BERT
    z      (B, T, N, d)   z_n = A_n(u), what adapter n adds (its up-projection's output)
    Q, K, V (d, d), b_Q, b_K (d,)
    fusion_scores -> s = softmax_n( (u Q + b_Q) · (z_n K + b_K) )            (B, T, N)
    fuse          -> o = Σ_n s_n z_n V                                        (B, T, d): the site adds o to h
    fusion_delta(x, h, close, adapters, Q, b_Q, K, b_K, V) -> o, the site's Δh, computing u and the z_n itself
    key_bias_shift(u, Q, b_Q, b_K) -> (B, T): what b_K adds to every adapter's score of a token
    gap_from_average(u, z, ...) -> max |o − (1/N) Σ_n z_n|
    fusion_parameters(d, L, N) -> L(3d² + 2d)

References: a ``FusionLayer`` with the check's Q, K, V copied in (nn.Linear stores the transpose: weight = Q.T),
whose sources return the given z_n; its pre-softmax scores are read where it applies score dropout. Counts: numel
of a ``FusionConfig`` attached to the pretrained MiniLM and to a BERT-base-sized encoder on the meta device.

Tolerance: fp32 (unit roundoff u = 2⁻²⁴ ≈ 6e-8). The package computes the scores as (q W_Kᵀ)·z_n + q·b_K and
V Σ_n s_n z_n; a learner computes (z_n K + b_K)·q and perhaps Σ_n s_n (z_n V): the same function summed in
another order, so each length-d (d = 384) dot product may differ by ≈ √d·u·Σ|terms|: about 1e-6 relative
(measured on these cases: ≤ 2e-6 for values, ≤ 4e-6 for gradients). The checks allow 1e-4 relative to the largest
reference value, while the nearest mistake named below (a missing b_Q) moves the weights by 0.2 relative
(``tests/test_checks_07.py`` runs each mistake).
"""
from __future__ import annotations

import copy
import math
import numbers
import types
from functools import lru_cache

import torch
from torch import nn

from ...api import add_adapter
from ...backbones.encoder import Encoder, EncoderConfig
from ...core import AdapterModule
from ...methods.bottleneck import BottleneckConfig
from ...methods.fusion import FusionConfig, FusionLayer, freeze_adapters, fusion_layers
from . import call, fail, max_error, need_int, passed

D = 384  # MiniLM's hidden size: the checks run at the real width
SHAPES = ((2, 5, 3), (3, 4, 2), (1, 6, 4))  # (B, T, N): B, T, N distinct in the first two, so a wrong axis shows
TOL = 1e-4  # relative to the largest reference value; see the module docstring
SENTENCES = ["A gripping, beautifully acted film.", "The plot goes nowhere and the jokes fall flat.",
             "It is a movie."]  # padded to the longest: the real-model checks see padding too
BERT_BASE = EncoderConfig(name="BERT-base")


# ---- the reference: minipeft's FusionLayer on given tensors ---------------------------------------------------

class _Given(AdapterModule):
    """A source adapter whose output z_n is given (what a trained Pfeiffer adapter would return at this site)."""

    def __init__(self, z: torch.Tensor):
        super().__init__("given")
        self.z, self.active = z, False  # a fusion's sources are inactive: the fusion calls them

    def forward(self, x, h, close):
        return self.z


class _Keep(nn.Module):
    """Put where FusionLayer applies dropout to the scores: keeps them (with their graph) and passes them on."""

    def forward(self, scores):
        self.scores = scores
        return scores


def reference_layer(z: torch.Tensor, Q, b_Q, K, b_K, V) -> FusionLayer:
    """minipeft's FusionLayer over N sources returning z[:, :, n], with Q, K, V (row convention) copied in."""
    N, d = z.shape[2], z.shape[3]
    names = [f"a{n}" for n in range(N)]
    site = types.SimpleNamespace(deltas={name: _Given(z[:, :, n]) for n, name in enumerate(names)})
    layer = FusionLayer("fusion", site, d, FusionConfig(adapters=names, dropout=0.0)).eval()
    with torch.no_grad():  # nn.Linear computes x Wᵀ + b: W = Q.T gives u Q + b_Q
        layer.query.weight.copy_(Q.T), layer.query.bias.copy_(b_Q)
        layer.key.weight.copy_(K.T), layer.key.bias.copy_(b_K)
        layer.value.weight.copy_(V.T)
    layer.dropout = _Keep()
    return layer


def reference(u, z, Q, b_Q, K, b_K, V):
    """(s, o, scores, layer): the package's weights (B, T, N), output (B, T, d), pre-softmax scores (B, T, N);
    differentiable in u, z (the layer's own Q, K, V carry the parameter gradients)."""
    layer = reference_layer(z, Q, b_Q, K, b_K, V)
    o = layer(None, None, lambda h: u)
    scores = layer.dropout.scores
    return torch.softmax(scores, dim=-1), o, scores, layer


def _row_grads(layer: FusionLayer) -> dict[str, torch.Tensor]:
    """The reference layer's parameter gradients in the row convention of the exercise (Q = weight.T)."""
    t = lambda g: None if g is None else g.T  # noqa: E731  (V has none when only the weights were used)
    return {"Q": t(layer.query.weight.grad), "b_Q": layer.query.bias.grad, "K": t(layer.key.weight.grad),
            "b_K": layer.key.bias.grad, "V": t(layer.value.weight.grad)}


def _cases():
    """u like a LayerNorm output, z like trained adapters' outputs, and Q, K, V far from their initialisation so
    that the weights are far from uniform (scores spread over a few units) and V far from I."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cases = []
    for B, T, N in SHAPES:
        u, z = r(B, T, D), 0.5 * r(B, T, N, D)
        Q, b_Q = r(D, D) / math.sqrt(D), 0.5 * r(D)
        K, b_K = 3.0 * r(D, D) / D, r(D)
        V = torch.eye(D) + r(D, D) / math.sqrt(D)
        cases.append((u, z, Q, b_Q, K, b_K, V))
    return cases


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got.double() - want.double()).abs().max() <= TOL * max(1.0, float(want.abs().max())))


def _where(u, z) -> str:
    B, T, N, d = z.shape
    return f"B={B}, T={T}, N={N} adapters, d={d}"


# ---- plausible mistakes --------------------------------------------------------------------------------------

def _scores(u, z, Q, b_Q, K, b_K, query_side=None, key_side=None):
    """(B, T, N): (u Q + b_Q)·(z_n K + b_K), or with the given query (B, T, d) / keys (B, T, N, d)."""
    q = u @ Q + b_Q if query_side is None else query_side
    k = z @ K + b_K if key_side is None else key_side
    return torch.einsum("btd,btnd->btn", q, k)


def wrong_weights(u, z, Q, b_Q, K, b_K) -> dict[str, torch.Tensor]:
    """Weights (B, T, N) of plausible mistakes, to name the one a learner made."""
    c = _scores(u, z, Q, b_Q, K, b_K)
    sm = lambda t: torch.softmax(t, dim=-1)  # noqa: E731
    return {
        "softmax_tokens": torch.softmax(c, dim=1), "softmax_batch": torch.softmax(c, dim=0),
        "no_softmax": c, "sigmoid": torch.sigmoid(c), "log_softmax": torch.log_softmax(c, dim=-1),
        "scaled": sm(c / math.sqrt(u.shape[-1])),
        "no_b_Q": sm(_scores(u, z, Q, 0 * b_Q, K, b_K)),
        "transposed": sm(_scores(u, z, Q.T, b_Q, K.T, b_K)),
        "Q_transposed": sm(_scores(u, z, Q.T, b_Q, K, b_K)),
        "K_transposed": sm(_scores(u, z, Q, b_Q, K.T, b_K)),
        "swapped": sm(_scores(u, z, Q, b_Q, K, b_K, query_side=u @ K + b_K, key_side=z @ Q + b_Q)),
        "keys_from_u": torch.full_like(c, 1.0 / z.shape[2]),
        "softmax_features": torch.ones_like(c),
    }


WEIGHT_HINTS = {
    "softmax_tokens": "the softmax runs over the tokens (axis 1 of (B, T, N)): each token's weights over its N "
                      "adapters must sum to 1, so normalise over the adapters, the last axis.",
    "softmax_batch": "the softmax runs over the batch (axis 0): normalise each token's N scores, over the "
                     "adapters, the last axis of (B, T, N).",
    "no_softmax": "these are the raw scores (u Q + b_Q)·(z_n K + b_K): turn them into weights with a softmax over "
                  "the adapters.",
    "sigmoid": "the weights are independent sigmoids (UniPELT's gates, lesson 06): AdapterFusion's adapters "
               "compete, a softmax over the N adapters, so each token's weights sum to 1.",
    "log_softmax": "these are log-weights (log_softmax): the weights are the softmax itself.",
    "scaled": "the scores are divided by √d (the Transformer's scaled dot product): AdapterFusion's scores are the "
              "plain dot products (Pfeiffer et al. 2021, §3); Q and K learn the scale.",
    "no_b_Q": "the query's bias b_Q is missing: q = u Q + b_Q.",
    "transposed": "Q and K are applied transposed (u @ Q.T: nn.Linear's convention). Here they act on the right "
                  "of row vectors, as in the paper: q = u @ Q + b_Q, k_n = z_n @ K + b_K.",
    "Q_transposed": "Q is applied transposed: q = u @ Q + b_Q (row vectors on the left, as in the paper).",
    "K_transposed": "K is applied transposed: k_n = z_n @ K + b_K (row vectors on the left, as in the paper).",
    "swapped": "Q and K are swapped: the query u goes through Q (and b_Q), each adapter's output z_n through K "
               "(and b_K).",
    "keys_from_u": "every adapter gets the same weight 1/N: the keys must come from the adapters' outputs, "
                   "k_n = z_n K + b_K, one per adapter; only the query comes from u.",
    "softmax_features": "every weight is 1: a softmax over the d features of q ⊙ k_n, summed, is always 1. The "
                        "score of adapter n is the plain dot product q·k_n (one number); the softmax then runs "
                        "over the N adapters.",
}


def wrong_outputs(u, z, Q, b_Q, K, b_K, V) -> dict[str, torch.Tensor]:
    """Outputs o (B, T, d) of plausible mistakes: in the weights, in V, in the sum, a residual."""
    s = torch.softmax(_scores(u, z, Q, b_Q, K, b_K), dim=-1)
    w = lambda weights, values: torch.einsum("btn,btnd->btd", weights, values)  # noqa: E731
    o = w(s, z @ V)
    out = {f"weights:{k}": w(v, z @ V) for k, v in wrong_weights(u, z, Q, b_Q, K, b_K).items()
           if k != "keys_from_u"}
    out.update({"no_V": w(s, z), "V_transposed": w(s, z @ V.T), "mean": z.mean(2) @ V, "sum": z.sum(2) @ V,
                "residual_u": u + o, "V_on_weights_and_u": u + w(s, z) @ V})
    return out


OUTPUT_HINTS = {
    "no_V": "V is missing: o = Σ_n s_n z_n V (V is a learned d × d matrix that starts near I, so forgetting it "
            "goes unnoticed at initialisation, but not once V has trained).",
    "V_transposed": "V is applied transposed: o = Σ_n s_n (z_n @ V) (row vectors on the left).",
    "mean": "the weights s are not used: every adapter counts 1/N. The output weights adapter n's value z_n V "
            "by its own s_n.",
    "sum": "the adapters' outputs are summed without their weights s_n.",
    "residual_u": "u is added to the result: return only the fused change o = Σ_n s_n z_n V; the site adds it to h "
                  "and closes (LN(x + h + o)) itself.",
    "V_on_weights_and_u": "u is added to the result: return only the fused change o = Σ_n s_n z_n V.",
}


# ---- calling the learner's code ------------------------------------------------------------------------------

def _tensor_result(name, got, expected_shape, where, shape_hints: dict) -> None:
    if isinstance(got, (list, tuple)):
        fail(name, f"returned a {type(got).__name__} ({where}): return one tensor of shape {expected_shape}.")
    if not isinstance(got, torch.Tensor):
        fail(name, f"should return a tensor {expected_shape}, got {type(got).__name__}")
    shape = tuple(got.shape)
    if shape != expected_shape:
        fail(name, f"returned shape {shape} ({where}), expected {expected_shape}: "
             + shape_hints.get(shape, shape_hints.get("default", "")))


def _same_inputs(name, before, after, where) -> None:
    if not all(torch.equal(a, b) for a, b in zip(before, after)):
        fail(name, f"your function changed its inputs in place ({where}), e.g. with +=, *= or an in-place "
                   "method: build new tensors instead (the adapters' outputs are used again elsewhere).")


def _name_mistake(name, got, want, candidates: dict, hints: dict, where, otherwise: str) -> None:
    if not torch.isfinite(got).all():
        fail(name, f"the output has {max_error(got, want)} ({where}): a softmax written as exp(c) / Σ exp(c) "
                   "overflows for large scores; torch.softmax subtracts the largest score first.")
    for mistake, out in candidates.items():
        if out.shape == got.shape and _close(got, out) and not _close(out, want):
            fail(name, f"wrong output ({where}): {hints[mistake]}")
    fail(name, f"wrong output ({where}): {max_error(got, want)}. {otherwise}")


def _grad_check(name, what: dict, mine: dict, theirs: dict) -> None:
    """Gradients with respect to the inputs named in ``what``. Not b_K's: the softmax cannot see b_K, so its
    gradient is 0, and both sides hold only rounding noise (≈ 1e-5 here); the values already show whether b_K
    leaks into the weights."""
    for key, label in what.items():
        g, ref = mine[key], theirs[key]
        if g is None:
            fail(name, f"no gradient reaches {label}: compute from the tensors you are given, without .detach(), "
                       ".item(), .tolist(), .numpy() or torch.tensor(...), so that training can move them.")
        if not _close(g, ref):
            fail(name, f"the gradient with respect to {label} is wrong ({max_error(g, ref)}), although the values "
                       "match: is part of the computation done on detached copies, or under torch.no_grad()?")


# ---- 1. the weights ------------------------------------------------------------------------------------------

def _weights_shape_hints(B, T, N, d) -> dict:
    return {(B, T, N, d): "one weight per feature: the score of adapter n is one number per token, the dot "
                          "product q·k_n summed over the d features (and the softmax then runs over the N adapters).",
            (B, N, T): "the adapters come before the tokens: return (B, T, N), adapters last (and normalise over "
                       "that axis).",
            (N, B, T): "the adapters come first: return (B, T, N), adapters last.",
            (B, T, d): "that looks like a fused output: return the weights s, one per adapter, (B, T, N).",
            (B, T): "one number per token: keep one weight per adapter, (B, T, N).",
            (B, T, N, 1): "drop the trailing axis of size 1: (B, T, N).",
            "default": "the scores are one dot product per token and adapter, (B, T, N): q (B, T, d) meets only "
                       "the N keys of its own token, k (B, T, N, d)."}


def check_fusion_scores(fn) -> None:
    """``fn(u, z, Q, b_Q, K, b_K) -> s`` (B, T, N): softmax over the adapters of (u Q + b_Q)·(z_n K + b_K)."""
    name = "fusion_scores"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    hint = ("A shape error? q = u Q + b_Q is (B, T, d), the keys (B, T, N, d): q needs an adapter axis, (B, T, 1, d), "
            "to meet the N keys of its own token. (u is (B, T, d), z (B, T, N, d) with z[:, :, n] adapter n's "
            "output; Q, K are (d, d), applied as u @ Q; b_Q, b_K are (d,).)")
    for u, z, Q, b_Q, K, b_K, _ in _cases():
        B, T, N, d = z.shape
        where = _where(u, z)
        inputs = [t.clone() for t in (u, z, Q, b_Q, K, b_K)]
        with torch.no_grad():
            got = call(name, fn, *inputs, hint=hint)
            want = reference(u, z, Q, b_Q, K, b_K, torch.eye(d))[0]
        _tensor_result(name, got, (B, T, N), where, _weights_shape_hints(B, T, N, d))
        _same_inputs(name, (u, z, Q, b_Q, K, b_K), inputs, where)
        if not _close(got, want):
            _name_mistake(name, got, want, wrong_weights(u, z, Q, b_Q, K, b_K), WEIGHT_HINTS, where,
                          "Check: q = u Q + b_Q (B, T, d); k_n = z_n K + b_K (B, T, N, d); one score per token and "
                          "adapter, q·k_n; softmax over the adapters.")
    # gradients (the fusion learns Q, K through these weights)
    u, z, Q, b_Q, K, b_K, _ = _cases()[0]
    mine = {k: t.clone().requires_grad_(True) for k, t in zip(("u", "z", "Q", "b_Q", "K", "b_K"),
                                                            (u, z, Q, b_Q, K, b_K))}
    probe = torch.randn(z.shape[:3], generator=torch.Generator().manual_seed(9))
    got = call(name, fn, *mine.values(), hint=hint)
    if not got.requires_grad:
        fail(name, "the weights do not depend differentiably on Q and K: no gradient could train the fusion. Avoid "
                   ".detach(), .item(), .tolist(), .numpy() or torch.tensor(...) on them.")
    (got * probe).sum().backward()
    ref_u, ref_z = u.clone().requires_grad_(True), z.clone().requires_grad_(True)
    s, _, _, layer = reference(ref_u, ref_z, Q, b_Q, K, b_K, torch.eye(D))
    (s * probe).sum().backward()
    _grad_check(name, {"Q": "Q", "b_Q": "b_Q", "K": "K", "u": "u", "z": "z"},
                {k: t.grad for k, t in mine.items()}, {**_row_grads(layer), "u": ref_u.grad, "z": ref_z.grad})
    passed(name, f"equals minipeft's FusionLayer weights at d={D} (N = 3, 2, 4 adapters; values and gradients)")


# ---- 2. the fused output -------------------------------------------------------------------------------------

def check_fuse(fn) -> None:
    """``fn(u, z, Q, b_Q, K, b_K, V) -> o`` (B, T, d): Σ_n s_n z_n V, the change the fusion adds at the site."""
    name = "fuse"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    hint = ("A shape error? The weights s (B, T, N) need a trailing axis, (B, T, N, 1), to scale each adapter's "
            "value z_n V (B, T, N, d). (u is (B, T, d), z (B, T, N, d); Q, K, V are (d, d), applied as z @ V; b_Q, "
            "b_K are (d,). Is your fusion_scores defined? Run its cell.)")
    for u, z, Q, b_Q, K, b_K, V in _cases():
        B, T, N, d = z.shape
        where = _where(u, z)
        inputs = [t.clone() for t in (u, z, Q, b_Q, K, b_K, V)]
        with torch.no_grad():
            got = call(name, fn, *inputs, hint=hint)
            want = reference(u, z, Q, b_Q, K, b_K, V)[1]
        shapes = {(B, T, N, d): "one weighted value per adapter: add them up over the adapters (axis 2).",
                  (B, T, N): "that looks like the weights s: multiply each z_n V by its weight and sum over n.",
                  (B, d): "the tokens were summed or averaged away: every token gets its own fused vector.",
                  (B, T, d, N): "one weighted value per adapter, adapters last: add them up over the adapters.",
                  "default": "the weights (B, T, N) need a trailing axis, (B, T, N, 1), to scale each adapter's "
                             "z_n V (B, T, N, d); then sum over the adapters, giving (B, T, d)."}
        _tensor_result(name, got, (B, T, d), where, shapes)
        _same_inputs(name, (u, z, Q, b_Q, K, b_K, V), inputs, where)
        if not _close(got, want):
            candidates = wrong_outputs(u, z, Q, b_Q, K, b_K, V)
            hints = {**OUTPUT_HINTS, **{f"weights:{k}": "the weights s are wrong (check_fusion_scores would say: "
                                        + v[0].lower() + v[1:] + ")" for k, v in WEIGHT_HINTS.items()}}
            _name_mistake(name, got, want, candidates, hints, where,
                          "Check: the weights s from fusion_scores (B, T, N); the values z_n V (B, T, N, d); "
                          "o = Σ_n s_n (z_n V), summed over the adapters, and nothing else added.")
    u, z, Q, b_Q, K, b_K, V = _cases()[1]
    mine = {k: t.clone().requires_grad_(True) for k, t in zip(("u", "z", "Q", "b_Q", "K", "b_K", "V"),
                                                            (u, z, Q, b_Q, K, b_K, V))}
    probe = torch.randn(u.shape, generator=torch.Generator().manual_seed(9))
    got = call(name, fn, *mine.values(), hint=hint)
    if not got.requires_grad:
        fail(name, "the output does not depend differentiably on Q, K, V: no gradient could train the fusion. "
                   "Avoid .detach(), .item(), .tolist(), .numpy() or torch.tensor(...).")
    (got * probe).sum().backward()
    ref_u, ref_z = u.clone().requires_grad_(True), z.clone().requires_grad_(True)
    _, o, _, layer = reference(ref_u, ref_z, Q, b_Q, K, b_K, V)
    (o * probe).sum().backward()
    _grad_check(name, {"V": "V", "Q": "Q", "b_Q": "b_Q", "K": "K", "u": "u", "z": "z (the adapters' outputs)"},
                {k: t.grad for k, t in mine.items()}, {**_row_grads(layer), "u": ref_u.grad, "z": ref_z.grad})
    passed(name, f"equals minipeft's FusionLayer output at d={D} (N = 3, 2, 4; values and gradients; V before or "
                 "after the weighting is the same: V is linear, without bias)")


# ---- 2b. inside the real MiniLM ------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _pretrained() -> Encoder:
    return Encoder.from_pretrained().eval()


@lru_cache(maxsize=1)
def _batch():
    from ...lab.tasks import load_tokenizer

    b = load_tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def fused_minilm(n_adapters: int = 3, adapter_std: float = 1e-2, fusion_std: float | None = None,
                 value_noise: float = 0.0, seed: int = 0) -> Encoder:
    """The pretrained MiniLM (eval) with ``n_adapters`` frozen Pfeiffer adapters (m = 64, weights of std
    ``adapter_std``: 1e-2 is a fresh adapter's) named a0, a1, ... and a fusion "fusion" over them.
    ``fusion_std``: redraw Q, K with this std (None: the package's initialisation, 0.02); ``value_noise``: add
    this much noise to V (0: V = I + 1e-6 off the diagonal)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = copy.deepcopy(_pretrained())
        names = [f"a{n}" for n in range(n_adapters)]
        for name in names:
            add_adapter(model, BottleneckConfig(placement="pfeiffer", init_std=adapter_std), name)
        freeze_adapters(model, *names)
        add_adapter(model, FusionConfig(adapters=names), "fusion")
        with torch.no_grad():
            for layer in fusion_layers(model, "fusion"):
                if fusion_std is not None:
                    for linear in (layer.query, layer.key):
                        linear.weight.normal_(0.0, fusion_std), linear.bias.normal_(0.0, fusion_std)
                layer.value.weight.add_(value_noise * torch.randn_like(layer.value.weight))
    return model.eval()


def fusion_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, name: str = "fusion") -> list[dict]:
    """Run ``model`` once; per layer, what its fusion saw and did: ``u`` (B, T, d), ``z`` (B, T, N, d), ``Q``,
    ``b_Q``, ``K``, ``b_K``, ``V`` in the row convention (u @ Q), the package's weights ``s`` (B, T, N) and its
    output ``o`` (B, T, d); also ``x``, ``h``, ``close`` and ``adapters`` (the N source modules) of the site."""
    records = []
    layers = fusion_layers(model, name)
    for layer in layers:
        def forward(x, h, close, layer=layer):
            u = close(h)
            z = torch.stack([layer.source(n)(x, h, close) for n in layer.sources], dim=2)
            o = type(layer).forward(layer, x, h, close)
            records.append({"u": u, "z": z, "Q": layer.query.weight.T, "b_Q": layer.query.bias,
                            "K": layer.key.weight.T, "b_K": layer.key.bias, "V": layer.value.weight.T,
                            "s": layer.last_attention, "o": o, "x": x, "h": h, "close": close,
                            "adapters": [layer.source(n) for n in layer.sources]})
            return o
        layer.forward = forward  # an instance attribute: the class's forward is back after the del below
    try:
        with torch.no_grad():
            model(ids, mask)
    finally:
        for layer in layers:
            del layer.forward
    tensors = ("u", "z", "Q", "b_Q", "K", "b_K", "V", "s", "o")
    return [{k: (v.detach().clone() if k in tensors else v) for k, v in r.items()} for r in records]


def _wrong_site_outputs(x, h, close, adapters, Q, b_Q, K, b_K, V) -> dict[str, torch.Tensor]:
    u = close(h)
    z = torch.stack([a(x, h, close) for a in adapters], dim=2)

    def fused(query):
        s = torch.softmax(_scores(query, z, Q, b_Q, K, b_K), dim=-1)
        return torch.einsum("btn,btnd->btd", s, z @ V)

    o = fused(u)
    no_v = torch.einsum("btn,btnd->btd", torch.softmax(_scores(u, z, Q, b_Q, K, b_K), dim=-1), z)
    return {"query_h": fused(h), "query_x": fused(x), "query_x_plus_h": fused(x + h), "residual_h": h + o,
            "residual_u": u + o, "closed": close(h + o), "closed_u": close(u + o), "no_V": no_v}


SITE_HINTS = {
    "query_h": "the query is h, the FFN's output before the residual and LayerNorm: the fusion's query is "
               "u = close(h) = LN(x + h), the block's output as the adapters read it (on BERT, h is far larger "
               "than u, so the scores change completely).",
    "query_x": "the query is x, the FFN's input: it is u = close(h), the block's closed output.",
    "query_x_plus_h": "the query is x + h without the LayerNorm: it is u = close(h) = LN(x + h).",
    "residual_h": "h is added to the result: return only the change o; the site adds it to h (and closes).",
    "residual_u": "u is added to the result: return only the change o = Σ_n s_n z_n V.",
    "closed": "the result is already closed, LN(x + h + o): return only o; the site adds it to h and applies "
              "the residual and LayerNorm once, after every module of the site.",
    "closed_u": "the result is closed again: return only o.",
    "no_V": "V is missing: o = Σ_n s_n z_n V (check_fuse on its own would say so).",
}


@lru_cache(maxsize=1)
def _model_and_output() -> tuple[Encoder, torch.Tensor]:
    """The model of ``check_fusion_in_model`` (never modified: the check changes a copy) and its output. Adapters
    with outputs of size ~1 and Q, K, V off their start: weights between ~0.06 and ~0.8, V far from I."""
    model = fused_minilm(adapter_std=0.1, fusion_std=0.02, value_noise=0.05)
    with torch.no_grad():
        return model, model(*_batch())


def check_fusion_in_model(fn) -> None:
    """``fn(x, h, close, adapters, Q, b_Q, K, b_K, V) -> o`` (B, T, d) put in place of every FusionLayer of the
    pretrained MiniLM with three frozen Pfeiffer adapters: each site's Δh and the model's output must not change."""
    name = "fusion_delta in MiniLM"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    model, want = _model_and_output()
    ids, mask = _batch()
    mine = copy.deepcopy(model)
    layers = fusion_layers(mine, "fusion")
    hint = ("adapters is a list of the N source adapters: adapters[n](x, h, close) returns z_n (B, T, d); close(h) "
            "returns u (B, T, d).")

    def site_forward(i, layer):
        def forward(x, h, close):
            adapters = [layer.source(n) for n in layer.sources]
            Q, K, V = layer.query.weight.T, layer.key.weight.T, layer.value.weight.T
            args = (x, h, close, adapters, Q, layer.query.bias, K, layer.key.bias, V)
            got = call(name, fn, *args, hint=hint)
            expected = type(layer).forward(layer, x, h, close)
            where = f"layer {i}, {len(adapters)} adapters, B={x.shape[0]}, T={x.shape[1]}, d={x.shape[2]}"
            _tensor_result(name, got, tuple(expected.shape), where, {
                "default": "return the change o (B, T, d), summed over the adapters."})
            if not _close(got, expected):
                _name_mistake(name, got, expected, _wrong_site_outputs(*args), SITE_HINTS, where,
                              "Check: u = close(h); z_n = adapters[n](x, h, close), stacked on axis 2; then "
                              "your fuse(u, z, ...). Does check_fuse pass?")
            return got
        return forward

    for i, layer in enumerate(layers):
        layer.forward = site_forward(i, layer)
    with torch.no_grad():
        got = mine(ids, mask)
    real = mask.bool()
    if not _close(got[real], want[real]):
        fail(name, f"MiniLM's output differs from the one with minipeft's fusion ({max_error(got[real], want[real])} "
                   "at real tokens) although every site matched: is something kept between calls?")
    passed(name, f"the {len(layers)} fusion layers of MiniLM (3 frozen Pfeiffer adapters): every site's Δh and the "
                 "model's output equal minipeft's fusion")


# ---- 3. the biases and the start -----------------------------------------------------------------------------

def check_key_bias_shift(fn) -> None:
    """``fn(u, Q, b_Q, b_K) -> (B, T)``: what b_K adds to the score of every adapter of a token, q·b_K."""
    name = "key_bias_shift"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    for u, z, Q, b_Q, K, b_K, V in _cases():
        B, T, N, d = z.shape
        where = _where(u, z)
        inputs = [t.clone() for t in (u, Q, b_Q, b_K)]
        with torch.no_grad():
            got = call(name, fn, *inputs, hint="u is (B, T, d), Q (d, d) applied as u @ Q, b_Q and b_K (d,).")
            with_bias = reference(u, z, Q, b_Q, K, b_K, V)[2]
            without = reference(u, z, Q, b_Q, K, torch.zeros_like(b_K), V)[2]
        shift = with_bias - without  # (B, T, N): the package's scores with b_K minus without
        if not _close(shift, shift[..., :1].expand_as(shift)):
            raise RuntimeError("b_K's shift differs between adapters: the check itself is broken")
        want = shift[..., 0]
        _tensor_result(name, got, (B, T), where, {
            (B, T, N): "one number per adapter: the shift is the same for every adapter of a token (that is the "
                       "point), so return it once per token, (B, T).",
            (B, T, 1): "drop the trailing axis: (B, T).",
            (B, T, d): "keep the dot product's sum over the d features: one number per token, (B, T).",
            (d,): "the shift depends on the token: it involves the token's query.",
            "default": "the shift is one number per token, (B, T)."})
        _same_inputs(name, (u, Q, b_Q, b_K), inputs, where)
        if not _close(got, want):
            q = u @ Q + b_Q
            candidates = {"u·b_K": (u * b_K).sum(-1), "(uQ)·b_K": ((u @ Q) * b_K).sum(-1),
                          "(uQ^T+b_Q)·b_K": ((u @ Q.T + b_Q) * b_K).sum(-1), "b_Q·b_K": (b_Q @ b_K).expand(B, T),
                          "-q·b_K": -(q * b_K).sum(-1)}
            hints = {"u·b_K": "that is u·b_K: b_K meets the query q = u Q + b_Q in the score, not u.",
                     "(uQ)·b_K": "b_Q is missing from the query: q = u Q + b_Q.",
                     "(uQ^T+b_Q)·b_K": "Q is applied transposed: q = u @ Q + b_Q.",
                     "b_Q·b_K": "the shift depends on the token: expand q·(z_n K + b_K) and keep the term without "
                                "z_n.",
                     "-q·b_K": "the sign is reversed: b_K is added to the keys, so it adds to the scores."}
            _name_mistake(name, got, want, candidates, hints, where,
                          "Expand the score q·(z_n K + b_K), q = u Q + b_Q, into a part that depends on z_n and "
                          "a part that does not.")
    passed(name, "equals the change of minipeft's scores when b_K is set (the same for every adapter of a token)")


@lru_cache(maxsize=1)
def _fresh_fusion() -> tuple[tuple[torch.Tensor, ...], ...]:
    """(u, z, Q, b_Q, K, b_K, V) of every layer of MiniLM with three fresh Pfeiffer adapters and a fresh fusion."""
    keys = ("u", "z", "Q", "b_Q", "K", "b_K", "V")
    return tuple(tuple(r[k] for k in keys) for r in fusion_inputs(fused_minilm(), *_batch()))


def check_gap_from_average(fn) -> None:
    """``fn(u, z, Q, b_Q, K, b_K, V) -> float``: max over tokens and features of |o − (1/N) Σ_n z_n|, o the
    fusion's output; on the check's cases and on every layer of MiniLM with a freshly added fusion."""
    name = "gap_from_average"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    cases = [(c, _where(c[0], c[1])) for c in _cases()]
    cases += [(r, f"MiniLM layer {i}, fresh fusion") for i, r in enumerate(_fresh_fusion())]
    for (u, z, Q, b_Q, K, b_K, V), where in cases:
        with torch.no_grad():
            got = call(name, fn, u.clone(), z.clone(), Q, b_Q, K, b_K, V, hint="use your fuse.")
            o = reference(u, z, Q, b_Q, K, b_K, V)[1]
        avg = z.mean(2)
        want = float((o - avg).abs().max())
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                fail(name, f"returned a tensor of shape {tuple(got.shape)} ({where}): return one number, the "
                           "largest |o − mean_n z_n| over every token and feature (.max(), then float(...)).")
            got = got.item()
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            fail(name, f"should return a number, got {type(got).__name__}")
        # at initialisation the gap is a difference of two nearly equal vectors (~1e-4 of size ~1e-2): the
        # rounding of o itself (≈ 1e-6 of |o|) is then a visible part of it; 1e-3 of the gap on top
        if abs(got - want) <= 1e-3 * want + 1e-6 * float(o.abs().max()):
            continue
        s = torch.softmax(_scores(u, z, Q, b_Q, K, b_K), dim=-1)
        candidates = {
            "weights": float((s - 1 / z.shape[2]).abs().max()),
            "mean": float((o - avg).abs().mean()), "signed": float((o - avg).max()),
            "sum": float((o - z.sum(2)).abs().max()), "avg_V": float((o - avg @ V).abs().max()),
            "relative": want / float(avg.abs().max()),
        }
        hints = {"weights": "that is the largest |s_n − 1/N|, the weights' distance from uniform: measure the "
                            "outputs, |o − (1/N) Σ_n z_n|.",
                 "mean": "that is the mean |o − average|: take the largest.",
                 "signed": "that is the largest signed difference: take the absolute value first.",
                 "sum": "that compares with the sum of the adapters' outputs: compare with their average "
                        "(1/N) Σ_n z_n.",
                 "avg_V": "that compares with the average passed through V: compare with the plain average "
                          "(1/N) Σ_n z_n, what you would get with no fusion parameters at all.",
                 "relative": "that is relative to the average's size: return the absolute gap (you can divide "
                             "afterwards)."}
        for mistake, value in candidates.items():
            if abs(got - value) <= 1e-3 * abs(value) and abs(value - want) > 1e-2 * want:
                fail(name, f"gave {got:.6g} ({where}), expected {want:.6g}: {hints[mistake]}")
        fail(name, f"gave {got:.6g} ({where}), expected {want:.6g}: compute o with your fuse, then the largest "
                   "|o − z.mean(axis of the adapters)| over every token and feature.")
    passed(name, "matches minipeft's fusion on the 3 cases and on the 6 layers of MiniLM with a fresh fusion")


# ---- 4. the count --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _fusion_numel(backbone: str, n_adapters: int) -> int:
    """numel of a FusionConfig over ``n_adapters`` frozen Pfeiffer adapters: on the pretrained MiniLM, or on a
    BERT-base-sized encoder built on the meta device (shapes only)."""
    names = [f"a{n}" for n in range(n_adapters)]
    if backbone == "MiniLM":
        model = copy.deepcopy(_pretrained())
    else:
        with torch.device("meta"):
            model = Encoder(BERT_BASE)
    with torch.device("meta" if backbone != "MiniLM" else "cpu"), torch.random.fork_rng():
        for name in names:
            add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=8), name)
        freeze_adapters(model, *names)
        add_adapter(model, FusionConfig(adapters=names), "fusion")
    return sum(p.numel() for n, p in model.named_parameters() if ".deltas.fusion." in n)


def check_fusion_parameters(fn) -> None:
    """``fn(d, L, N) -> int``: parameters of a fusion over N adapters in L layers of width d: L(3d² + 2d)."""
    name = "fusion_parameters"
    for backbone, d, L, ns in (("MiniLM", 384, 6, (2, 3)), ("BERT-base", 768, 12, (2, 5))):
        wants = {N: _fusion_numel(backbone, N) for N in ns}
        if len(set(wants.values())) != 1:
            raise RuntimeError("the fusion's numel depends on N: the check itself is broken")
        want = wants[ns[0]]
        gots = {}
        for N in ns:
            gots[N] = call(name, fn, d, L, N, hint="d, L, N are ints: the hidden size, the layers, the adapters.")
            need_int(name, gots[N], f"for {backbone} (d={d}, L={L}, N={N})")
        if len(set(gots.values())) > 1:
            fail(name, f"gave {gots[ns[0]]:,} for N = {ns[0]} but {gots[ns[1]]:,} for N = {ns[1]} on {backbone}; "
                       f"numel says {want:,} for both: the fusion's Q, K, V are shared by all the adapters (every "
                       "z_n goes through the same K and V), so the count does not depend on N.")
        got = gots[ns[0]]
        if got == want:
            continue
        hints = {L * (3 * d * d + 3 * d): "V has no bias: it is a d × d matrix only (o = Σ_n s_n z_n V).",
                 L * (3 * d * d + d): "one of the biases b_Q, b_K is missing: Q and K have one each (d per layer).",
                 L * 3 * d * d: "the biases b_Q and b_K are missing (d each per layer).",
                 L * (2 * d * d + 2 * d): "V is missing (d² per layer).",
                 3 * d * d + 2 * d: f"that is one layer: the fusion has its own Q, K, V in each of the L = {L} layers."}
        fail(name, f"gave {got:,} for {backbone} (d={d}, L={L}); numel says {want:,}. " + hints.get(
            got, "Per layer: Q and K (a d × d weight and a bias of d each) and V (d × d, no bias)."))
    passed(name, "L(3d² + 2d) matches numel on MiniLM (2,658,816) and BERT-base (21,252,096), for N = 2, 3, 5")
