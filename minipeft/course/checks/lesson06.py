"""Lesson 06 checks: UniPELT's gated composition of several parts (Mao et al. 2022), against minipeft's ``Gate``.

The learner writes ``gated_sum(x, h, deltas, weights, biases) -> (B, T, d)``:

    x, h       (B, T, d)   the site's input and its sublayer's output (before residual + LayerNorm)
    deltas     K tensors (B, T, d): Δh_k, what each part adds at this site
    weights    (K, d): w_k, one gate vector per part;   biases (K,): b_k
    returns    Σ_k σ(x·w_k + b_k) · Δh_k        one gate per part and per token, read from x, broadcast over d

Reference: Σ_k ``minipeft.methods.composite.Gate`` (around a module that returns Δh_k), which computes
σ(x w + b).unsqueeze(-1) · Δh. ``check_gated_sum`` compares on random inputs (values and gradients) and names
the usual mistakes; ``check_gated_model`` puts the function inside every gate of a small encoder.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...api import add_adapter
from ...backbones.encoder import Encoder, EncoderConfig
from ...core import AdapterModule, adapter_modules
from ...methods.composite import Gate
from ...methods.mam import adapter_lora
from . import fail, max_error, passed

TINY = EncoderConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                     max_position=24, type_vocab_size=1, attention_dropout=0.0, dropout=0.0, name="tiny")
SHAPES = ((2, 5, 8, 3), (3, 4, 6, 2), (1, 7, 8, 1))  # (B, T, d, K); T ≠ d, so a missing trailing axis raises


class _Part(AdapterModule):
    """A part whose Δh is given (what a bottleneck, LoRA or parallel adapter would return at this site)."""

    def __init__(self, dh: torch.Tensor):
        super().__init__("part")
        self.dh = dh

    def forward(self, x, h, close):
        return self.dh


def reference(x, h, deltas, weights, biases) -> tuple[torch.Tensor, list[Gate]]:
    """Σ_k Gate_k(x, h): minipeft's gates with w_k, b_k copied in; returns the sum and the gates (for grads)."""
    gates, out = [], torch.zeros_like(h)
    for dh, w, b in zip(deltas, weights, biases):
        gate = Gate(_Part(dh), x.shape[-1])
        with torch.no_grad():
            gate.weight.copy_(w)
            gate.bias.copy_(b)
        gates.append(gate)
        out = out + gate(x, h, None)
    return out, gates


def wrong_answers(x, h, deltas, weights, biases) -> dict[str, torch.Tensor]:
    """Outputs of plausible mistakes, to name the one a learner made."""
    D = torch.stack(deltas)  # (K, B, T, d)
    z = torch.einsum("btd,kd->kbt", x, weights) + biases[:, None, None]  # (K, B, T): x·w_k + b_k
    zh = torch.einsum("btd,kd->kbt", h, weights) + biases[:, None, None]
    g = lambda t: t[..., None]  # noqa: E731  (K, B, T) -> (K, B, T, 1)
    per_feature = torch.sigmoid(x[None] * weights[:, None, None, :] + biases[:, None, None, None])  # (K, B, T, d)
    seq = torch.einsum("bd,kd->kb", x.mean(1), weights) + biases[:, None]  # (K, B): one gate per sentence
    s = torch.sigmoid(z)
    return {
        "no_sigmoid": (g(z) * D).sum(0), "tanh": (g(torch.tanh(z)) * D).sum(0),
        "relu": (g(torch.relu(z)) * D).sum(0), "softmax_parts": (g(torch.softmax(z, 0)) * D).sum(0),
        "complement": (g(1 - s) * D).sum(0), "no_bias": (g(torch.sigmoid(z - biases[:, None, None])) * D).sum(0),
        "bias_outside": (g(torch.sigmoid(z - biases[:, None, None]) + biases[:, None, None]) * D).sum(0),
        "from_h": (g(torch.sigmoid(zh)) * D).sum(0), "from_x_plus_h": (g(torch.sigmoid(
            torch.einsum("btd,kd->kbt", x + h, weights) + biases[:, None, None])) * D).sum(0),
        "per_feature": (per_feature * D).sum(0),
        "per_sequence": (torch.sigmoid(seq)[..., None, None] * D).sum(0),
        "mean_over_tokens": (s.mean(-1, keepdim=True)[..., None] * D).sum(0),
        "summed_gates": g(s.sum(0)) * D.sum(0), "one_gate": g(torch.sigmoid(z.sum(0))) * D.sum(0),
        "first_gate": g(s[0]) * D.sum(0), "mean_parts": (g(s) * D).mean(0),
        "with_residual": h + (g(s) * D).sum(0), "gates_h": (g(s) * (h + D)).sum(0),
        "gates_h_only": (g(s) * h).sum(0),
    }


HINTS = {
    "no_sigmoid": "the gate is the raw logit x·w_k + b_k: squash it with the logistic sigmoid σ, so each gate lies "
                  "in (0, 1) and opens or closes its part.",
    "tanh": "the gate uses tanh: UniPELT's gate is the logistic sigmoid σ(z) = 1 / (1 + e^(−z)), in (0, 1), "
            "never negative.",
    "relu": "the gate uses ReLU: UniPELT's gate is the logistic sigmoid σ, a number in (0, 1).",
    "softmax_parts": "the gates are a softmax across the parts, so they compete and sum to 1 (that is "
                     "AdapterFusion's attention, lesson 07). UniPELT's gates are independent sigmoids: every part "
                     "may be fully on, or all off.",
    "complement": "the gate is 1 − σ(x·w_k + b_k), i.e. σ of minus the logit: check the sign inside the sigmoid.",
    "no_bias": "the bias b_k is missing: the gate is σ(x·w_k + b_k).",
    "bias_outside": "b_k is added after the sigmoid: it belongs inside, σ(x·w_k + b_k).",
    "from_h": "the gate is read from h, the sublayer's output. In minipeft's Gate every gate reads the site's "
              "input x, the same x the sublayer (and a parallel part) reads.",
    "from_x_plus_h": "the gate is read from x + h: it reads only the site's input x.",
    "per_feature": "the gate has one value per feature: x·w_k is a dot product (sum over the d features), giving "
                   "one number per token, not an elementwise product.",
    "per_sequence": "the gate is one number per sentence (x averaged over tokens first): UniPELT gates each token "
                    "separately, σ(x_t·w_k + b_k) for every position t.",
    "mean_over_tokens": "the gates were averaged over the tokens: keep one gate per token, shape (B, T, 1).",
    "summed_gates": "the gates were added up and applied to the sum of the Δh's: (Σ_k σ_k)·(Σ_k Δh_k) mixes "
                    "every gate into every part. Apply each gate to its own part, then add the products.",
    "one_gate": "one sigmoid of the summed logits gates all parts together: each part has its own gate, "
                "σ(x·w_k + b_k), applied to its own Δh_k.",
    "first_gate": "every part is scaled by the first part's gate: part k uses w_k and b_k.",
    "mean_parts": "the gated parts are averaged (divided by K): they are summed.",
    "with_residual": "h is added to the result: return only the gated Δh's; the site adds them to h itself.",
    "gates_h": "the gates scale h + Δh_k: they scale only Δh_k, the part's change (h is the frozen model's "
               "output and stays as it is).",
    "gates_h_only": "the gates scale h instead of the parts' Δh_k.",
}


def _cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for B, T, d, K in SHAPES:
        x, h = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
        deltas = [torch.randn(B, T, d, generator=g) for _ in range(K)]
        weights, biases = torch.randn(K, d, generator=g), torch.randn(K, generator=g)  # gates far from ½
        cases.append((x, h, deltas, weights, biases))
    return cases


def _call(name, fn, x, h, deltas, weights, biases, where):
    try:
        return fn(x, h, deltas, weights, biases)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
        B, T, d = x.shape
        text = str(e)
        if "must match the size" in text or "broadcast" in text or "shape" in text:
            hint = (f"A shape mismatch: the gate σ(x·w_k + b_k) is one number per token, shape (B, T) = {(B, T)}; "
                    f"give it a trailing axis, (B, T, 1), so that it scales all d = {d} features of that token's "
                    f"Δh_k, shape (B, T, d). (weights is (K, d) = {tuple(weights.shape)}: w_k is its row k.)")
        else:
            hint = ("deltas is a list of K tensors (B, T, d), weights a (K, d) tensor whose row k is w_k, biases "
                    "a (K,) tensor.")
        fail(name, f"calling it ({where}) raised {type(e).__name__}: {text}. {hint}")


def _check_shape(name, got, x, K, where):
    B, T, d = x.shape
    if isinstance(got, (list, tuple)):
        fail(name, f"returned a {type(got).__name__} ({where}): return one tensor (B, T, d), the sum over the "
                   "parts of the gated Δh_k.")
    if not isinstance(got, torch.Tensor):
        fail(name, f"should return a tensor (B, T, d), got {type(got).__name__}")
    shape = tuple(got.shape)
    if shape == (B, T, d):
        return
    hint = {(K, B, T, d): "that is one gated Δh per part: add them up over the parts.",
            (B, T, K): "that looks like the gates themselves: multiply each by its part's Δh_k and sum.",
            (K, B, T): "that looks like the gates themselves: multiply each by its part's Δh_k and sum.",
            (B, T): "that is one number per token: multiply the gates with the Δh_k (B, T, d) and sum over parts.",
            (B, T, 1): "that is one number per token: multiply the gates with the Δh_k (B, T, d) and sum over parts.",
            (B, T, d, K): "that is one gated Δh per part, parts last: add them up over the parts.",
            (B, d): "the tokens were summed or averaged away: keep one gated Δh per token."}.get(
        shape, "each gate is (B, T, 1), each Δh_k (B, T, d); their products summed over k are (B, T, d).")
    fail(name, f"returned shape {shape} ({where}), expected {(B, T, d)}: {hint}")


def check_gated_sum(fn) -> None:
    """``fn(x, h, deltas, weights, biases) -> Σ_k σ(x·w_k + b_k) · Δh_k`` (B, T, d), as minipeft's ``Gate``."""
    name = "gated_sum"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    for x, h, deltas, weights, biases in _cases():
        (B, T, d), K = x.shape, len(deltas)
        where = f"B={B}, T={T}, d={d}, K={K} parts"
        inputs = (x.clone(), h.clone(), [t.clone() for t in deltas], weights.clone(), biases.clone())
        with torch.no_grad():
            got = _call(name, fn, *inputs, where)
            want, _ = reference(x, h, deltas, weights, biases)
        _check_shape(name, got, x, K, where)
        if not all(torch.equal(a, b) for a, b in zip((x, h, *deltas, weights, biases),
                                                      (inputs[0], inputs[1], *inputs[2], inputs[3], inputs[4]))):
            fail(name, f"your function changed its inputs in place ({where}), e.g. with *= or +=: build new "
                       "tensors instead (the same Δh_k may be used elsewhere in the model).")
        if not torch.isfinite(got).all():
            fail(name, f"the output has {max_error(got, want)} ({where}): if you wrote the sigmoid yourself, "
                       "1 / (1 + exp(−z)) is fine, but exp(z) / (1 + exp(z)) overflows for large z; torch.sigmoid "
                       "is safe.")
        if not torch.allclose(got, want, atol=1e-5):
            for mistake, out in wrong_answers(x, h, deltas, weights, biases).items():
                if out.shape == got.shape and torch.allclose(got, out, atol=1e-5) and not torch.allclose(
                        out, want, atol=1e-5):
                    fail(name, f"wrong output ({where}): {HINTS[mistake]}")
            fail(name, f"wrong output ({where}): {max_error(got, want)}. Check, for each part k: one gate per "
                       "token, σ(x·w_k + b_k), read from x, shaped (B, T, 1); multiplied with its own Δh_k; the K "
                       "products summed.")
    _check_gradients(name, fn)
    passed(name, "equals minipeft's Gate summed over the parts (1, 2 and 3 parts; values and gradients)")


def _check_gradients(name, fn) -> None:
    """The gate must stay differentiable in w_k and b_k (and in Δh_k): no .detach(), .item() or new tensors."""
    x, h, deltas, weights, biases = _cases()[0]
    deltas = [t.clone().requires_grad_(True) for t in deltas]
    w, b = weights.clone().requires_grad_(True), biases.clone().requires_grad_(True)
    probe = torch.randn(h.shape, generator=torch.Generator().manual_seed(9))
    got = _call(name, fn, x, h, deltas, w, b, "with gradients")
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        fail(name, "the output does not depend differentiably on the gates: no gradient would reach w_k and b_k, so "
                   "the gates could never learn. Avoid .detach(), .item(), .tolist() or torch.tensor(...) on them.")
    (got * probe).sum().backward()
    ref_deltas = [t.detach().clone().requires_grad_(True) for t in deltas]
    want, gates = reference(x, h, ref_deltas, weights, biases)
    (want * probe).sum().backward()
    for what, mine, theirs in (("w_k (weights)", w.grad, torch.stack([g.weight.grad for g in gates])),
                               ("b_k (biases)", b.grad, torch.stack([g.bias.grad for g in gates])),
                               ("Δh_k (deltas)", deltas[0].grad, ref_deltas[0].grad)):
        if mine is None:
            fail(name, f"no gradient reaches {what}: the gates must be computed from the tensors you are given, "
                       "without .detach(), .item() or torch.tensor(...), so that training can move them.")
        if not torch.allclose(mine, theirs, atol=1e-5):
            fail(name, f"the gradient with respect to {what} is wrong ({max_error(mine, theirs)}), although the "
                       "values match: is part of the computation done on detached copies?")


def check_gated_model(fn) -> None:
    """``fn`` inside every gate of a small encoder with UniPELT-style gated parts (a Pfeiffer adapter at each FFN,
    LoRA on W_q, W_v): the model's output must equal the one with minipeft's own gates."""
    name = "gated_sum in a model"
    torch.manual_seed(0)
    model = add_adapter(Encoder(TINY).eval(), adapter_lora(m=4, r=2, gated=True), "uni")
    with torch.no_grad():
        for p in model.parameters():  # gates and parts away from their initialisation
            p.add_(0.3 * torch.randn_like(p))
    ids = torch.randint(1, TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        want = model(ids, mask)
    mine = copy.deepcopy(model)
    gates = [m for m in adapter_modules(mine, "uni").values() if isinstance(m, Gate)]
    if not gates:
        raise RuntimeError("no Gate in the gated composite: the check itself is broken")

    def gated_forward(gate):
        def forward(x, h, close):
            dh = gate.inner(x, h, close)
            return _call(name, fn, x, h, [dh], gate.weight[None], gate.bias[None], "inside the encoder")
        return forward

    for gate in gates:
        gate.forward = gated_forward(gate)
    with torch.no_grad():
        got = mine(ids, mask)
    real = mask.bool()
    if not torch.allclose(got[real], want[real], atol=1e-5):
        fail(name, f"the encoder's output differs from the one with minipeft's gates "
                   f"({max_error(got[real], want[real])} at real tokens) although check_gated_sum passed: with "
                   "one part (K = 1), does your function still return (B, T, d)?")
    passed(name, f"{len(gates)} gates of a 2-layer encoder (Pfeiffer adapter + LoRA on W_q, W_v): same output as "
                 "minipeft's Gate")
