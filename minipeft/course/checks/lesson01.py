"""Lesson 01 checks: the bottleneck adapter's forward pass and its parameter counts.

    A(h) = h + W_up f(W_down h + b_down) + b_up          Houlsby et al. 2019, §2.1
    one adapter: 2md + d + m;  Houlsby (2 per layer): 2L(2md + d + m);  Pfeiffer (1 per layer): L(2md + d + m)

References: ``minipeft.methods.bottleneck.Bottleneck`` (its weights set to the check's tensors) and ``numel``
of the package's adapters on encoders built on the meta device.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ...api import add_adapter
from ...backbones.encoder import Encoder, EncoderConfig
from ...methods.bottleneck import Bottleneck, BottleneckConfig
from . import call, explain, fail, max_error, name_the_mistake, need_int, passed

MINILM = EncoderConfig.minilm()
BERT_BASE = EncoderConfig(name="BERT-base")
ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def _tensors(d: int = 12, m: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed inputs: h (B, T, d), W_down (m, d), b_down (m,), W_up (d, m), b_up (d,); non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"h": r(2, 3, d), "W_down": r(m, d) / d ** 0.5, "b_down": r(m), "W_up": r(d, m) / m ** 0.5, "b_up": r(d)}


def reference_forward(h, W_down, b_down, W_up, b_up, act: str = "relu") -> torch.Tensor:
    """h + the package's Bottleneck (which returns Δh; the site adds h) with these weights."""
    d, m = h.shape[-1], W_down.shape[0]
    module = Bottleneck("ref", d, m, BottleneckConfig(bottleneck=m, activation=act))
    with torch.no_grad():
        module.down.weight.copy_(W_down), module.down.bias.copy_(b_down)
        module.up.weight.copy_(W_up), module.up.bias.copy_(b_up)
        return h + module(None, h, None)


def _wrong_answers(t: dict, f) -> dict[str, torch.Tensor]:
    """Plausible mistakes and what to say about each."""
    h, Wd, bd, Wu, bu = t["h"], t["W_down"], t["b_down"], t["W_up"], t["b_up"]
    inner = h @ Wd.T + bd  # (B, T, m)
    return {
        "the residual h is missing: the adapter returns h + W_up f(...) + b_up, so that with W_up ≈ 0 it starts "
        "as the identity (the pretrained network unchanged)": f(inner) @ Wu.T + bu,
        "the up-projection's bias b_up is missing (it is added after W_up)": h + f(inner) @ Wu.T,
        "the down-projection's bias b_down is missing (it is added before the nonlinearity f)":
            h + f(h @ Wd.T) @ Wu.T + bu,
        "both biases b_down and b_up are missing": h + f(h @ Wd.T) @ Wu.T,
        "the nonlinearity f is missing: apply act to W_down h + b_down": h + inner @ Wu.T + bu,
        "f is applied after the up-projection; it belongs inside, on W_down h + b_down": h + f(inner @ Wu.T + bu),
        "the residual is added twice (h + h + ...): the site adds the adapter's output once": 2 * h + f(inner) @ Wu.T + bu,
    }


def check_adapter_forward(fn) -> None:
    """``fn(h, W_down, b_down, W_up, b_up, act) -> h + W_up act(W_down h + b_down) + b_up``.

    Shapes as ``nn.Linear`` stores them: h (..., d), W_down (m, d), b_down (m,), W_up (d, m), b_up (d,)."""
    name = "adapter_forward"
    for act in ("relu", "gelu", "tanh"):
        for d, m, seed in ((12, 5, 0), (8, 3, 1)):
            t = _tensors(d, m, seed)
            try:
                got = fn(t["h"], t["W_down"], t["b_down"], t["W_up"], t["b_up"], ACTS[act])
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
                fail(name, f"calling it raised {type(e).__name__}: {e}. W_down has shape (m, d) = {tuple(t['W_down'].shape)} "
                     "and W_up (d, m), as nn.Linear stores weights: W_down h is h @ W_down.T.")
            if not isinstance(got, torch.Tensor):
                fail(name, f"should return a tensor, got {type(got).__name__}")
            want = reference_forward(**t, act=act)
            if got.shape != want.shape:
                fail(name, f"returned shape {tuple(got.shape)} for h of shape {tuple(t['h'].shape)}; the adapter "
                     f"maps (..., d) to (..., d): expected {tuple(want.shape)}"
                     + ("; that is the m-wide bottleneck: W_up brings it back to d." if got.shape[-1:] == (m,) else ""))
            if torch.allclose(got, want, atol=1e-5):
                continue
            name_the_mistake(name, got, _wrong_answers(t, ACTS[act]))
            if act != "relu" and torch.allclose(got, reference_forward(**t, act="relu"), atol=1e-5):
                fail(name, f"with act={act} you still computed ReLU: call the act argument, do not hard-code f.")
            fail(name, f"wrong output (act={act}, {max_error(got, want)}); "
                 "expected h + W_up f(W_down h + b_down) + b_up with h @ W_down.T for W_down h.")
    passed(name, "h + W_up f(W_down h + b_down) + b_up, equal to minipeft's Bottleneck for relu, gelu and tanh")


def _adapter_terms(d: int, m: int) -> dict[str, int]:
    return {"the two biases (d + m)": d + m, "the up-projection's bias b_up (d)": d,
            "the down-projection's bias b_down (m)": m, "one of the two weight matrices (m·d)": m * d}


def check_adapter_parameters(fn) -> None:
    """``fn(d, m) -> int``: parameters of one adapter, W_down, b_down, W_up, b_up: 2md + d + m."""
    name = "adapter_parameters"
    for d, m in ((12, 5), (384, 64), (768, 48)):
        want = sum(p.numel() for p in Bottleneck("ref", d, m, BottleneckConfig(bottleneck=m)).parameters())
        got = call(name, fn, d, m)
        need_int(name, got, f"for d={d}, m={m}")
        if got != want:
            fail(name, f"gave {got:,} for d={d}, m={m}; numel of the package's adapter says {want:,}."
                 + explain(got, want, _adapter_terms(d, m)))
    passed(name, "2md + d + m matches numel for (d, m) = (12, 5), (384, 64), (768, 48)")


@lru_cache(maxsize=None)
def _placement_numel(backbone: str, placement: str, m: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        encoder = Encoder({c.name: c for c in (MINILM, BERT_BASE)}[backbone])
        add_adapter(encoder, BottleneckConfig(placement=placement, bottleneck=m), "a")
    return sum(p.numel() for n, p in encoder.named_parameters() if ".deltas.a." in n)


def check_placement_parameters(houlsby_fn, pfeiffer_fn) -> None:
    """``houlsby_fn(d, L, m)``: two adapters per layer; ``pfeiffer_fn(d, L, m)``: one per layer (FFN only)."""
    name = "placement_parameters"
    cases = [(MINILM, 32), (MINILM, 64), (BERT_BASE, 64), (BERT_BASE, 48)]
    for label, fn, placement, per_layer in (("houlsby", houlsby_fn, "houlsby", 2), ("pfeiffer", pfeiffer_fn, "pfeiffer", 1)):
        for cfg, m in cases:
            d, L = cfg.hidden_size, cfg.num_layers
            want = _placement_numel(cfg.name, placement, m)
            got = call(name, fn, d, L, m)
            need_int(name, got, f"for {label} on {cfg.name} (d={d}, L={L}, m={m})")
            if got == want:
                continue
            one = 2 * m * d + d + m
            hints = {L * one: "that is one adapter per layer (Pfeiffer's placement); Houlsby puts two per layer, "
                              "after the attention and after the FFN.",
                     2 * L * one: "that is two adapters per layer (Houlsby's placement); Pfeiffer puts one per layer, "
                                  "at the FFN only.",
                     per_layer * one: f"that is one layer's worth: multiply by the number of layers L={L}.",
                     per_layer * L * 2 * m * d: "the biases (d + m per adapter) are missing."}
            fail(name, f"{label} gave {got!r} for {cfg.name} (d={d}, L={L}, m={m}); numel says {want:,}. "
                 + hints.get(got, f"one adapter has 2md + d + m parameters and {label} puts {per_layer} per layer."))
    passed(name, "Houlsby 2L(2md + d + m) and Pfeiffer L(2md + d + m) match numel on MiniLM and BERT-base "
           "(m=64 → 2,379,264 and m=48 → 894,528)")


# ---- a derivation: the widest bottleneck a parameter budget allows -------------------------------------------

BUDGET_CASES = ((384, 6, 451_307, "houlsby"), (384, 6, 451_307, "pfeiffer"), (768, 12, 1_094_822, "houlsby"),
                (768, 12, 1_094_822, "pfeiffer"), (16, 2, 100, "houlsby"))


def _count(d: int, L: int, m: int, placement: str) -> int:
    per_adapter = 2 * m * d + d + m
    return (2 if placement == "houlsby" else 1) * L * per_adapter


def reference_largest_bottleneck(d: int, L: int, budget: int, placement: str) -> int:
    """The largest m >= 0 whose adapters (2md + d + m each; 2 per layer for Houlsby, 1 for Pfeiffer) fit."""
    m = 0
    while _count(d, L, m + 1, placement) <= budget:
        m += 1
    return m


def check_largest_bottleneck(fn) -> None:
    """``fn(d, L, budget, placement) -> int``: the largest bottleneck m whose Houlsby (two per layer) or Pfeiffer
    (one per layer) adapters, biases included, have at most ``budget`` parameters (0 if not even m = 1 fits)."""
    name = "largest_bottleneck"
    for d, L, budget, placement in BUDGET_CASES:
        got = call(name, fn, d, L, budget, placement, hint="placement is the string 'houlsby' or 'pfeiffer'.")
        need_int(name, got, f"for d={d}, L={L}, budget={budget:,}, {placement}")
        want = reference_largest_bottleneck(d, L, budget, placement)
        if got == want:
            continue
        where = f"for d={d}, L={L}, budget={budget:,}, {placement}: gave m={got}, expected {want}."
        other = "pfeiffer" if placement == "houlsby" else "houlsby"
        no_bias = 0
        while (2 if placement == "houlsby" else 1) * L * 2 * (no_bias + 1) * d <= budget:
            no_bias += 1
        if got == reference_largest_bottleneck(d, L, budget, other):
            hint = (" That is the answer for the other placement: Houlsby has two adapters per layer, Pfeiffer "
                    "one.")
        elif got == no_bias and got != want:
            hint = " The biases (d + m per adapter) count too: with them, that bottleneck no longer fits."
        elif got > want and _count(d, L, got, placement) > budget:
            hint = (f" m={got} costs {_count(d, L, got, placement):,} parameters, over the budget: round down, "
                    "not to the nearest.")
        elif got < want:
            hint = f" m={got + 1} still fits ({_count(d, L, got + 1, placement):,} parameters): find the largest."
        else:
            hint = (" Write the placement's count as a function of m, solve count(m) <= budget for m, and round "
                    "down to a whole number.")
        fail(name, where + hint)
    passed(name, "the largest m within the budget for both placements (MiniLM and BERT-base at 2% and 1%)")
