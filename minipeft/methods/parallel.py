"""The parallel adapter and the scaled parallel adapter (He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning", Table 1 and §3-§4.1).

A sequential adapter (Houlsby, Pfeiffer) rewrites a sublayer's *output*: h ← h + A(h). The parallel adapter
computes its change from the sublayer's *input* x, side by side with the sublayer:

    h ← h + s · A(x),   A(x) = W_up f(W_down x + b_down) + b_up          He et al. 2022, §3, Table 1 ("PA")

x is the sublayer's input, h its output before residual + LayerNorm, so the site computes out = LN(x + h + s·A(x)).
s = 1 is the plain parallel adapter (PA); s = 4 the paper's scaled PA (§4.1, Table 5: s=4 > s=1); ``"learned"``
makes s one trainable scalar per adapter module, initialised to ``scale_init`` (1, as in He et al.'s code).
The scale multiplies b_up too, as in the authors' code (``up = up_proj(relu(down_proj(x))) * scale``).
Initialisation as in He et al. ("lora" init): W_down Kaiming-uniform (a=√5, nn.Linear's default), W_up = 0,
both biases 0, so the model starts as exactly the base model; no adapter LayerNorm, no adapter dropout.

Placements: ``ffn`` (default; the paper's best single placement, §4.3), ``attn``, ``both`` (sites of minipeft's
Encoder), or ``modules``: any nn.Module matching ``targets`` (generic), x = the module's first input and Δh added
to its output (e.g. a Llama ``mlp`` block, whose input and output are exactly the FFN sublayer's x and h).

Parameters per adapter: W_down r·d + b_down r + W_up d·r + b_up d (+ 1 learned s) = 2rd + r + d (+1);
on L layers at one site: L(2rd + r + d).  BERT-base, r = 512 on the FFN: 9,452,544.
A parallel adapter is nonlinear, so unlike LoRA it cannot be merged into the frozen weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.contract import ACTIVATIONS
from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, add_output_delta, find_backbone,  # noqa: F401
                    match_modules, module_widths, register_example, register_method, register_recipe)

PLACEMENTS = ("ffn", "attn", "both", "modules")


@register_method
@dataclass
class ParallelAdapterConfig(AdapterConfig):
    """``r`` bottleneck size; ``scale`` a number s > 0 or ``"learned"``; ``scale_init`` the learned s's start."""

    method = "parallel"
    r: int = 64
    placement: str = "ffn"
    scale: float | str = 1.0
    scale_init: float = 1.0  # scale="learned" only
    activation: str = "relu"
    targets: list[str] | None = None  # placement="modules" only: module names/regexes on any nn.Module
    hidden_size: int | None = None  # placement="modules" only, when the width cannot be inferred

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; allowed: {PLACEMENTS}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r (the bottleneck size) must be a positive integer, got {self.r!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if isinstance(self.scale, str):
            if self.scale != "learned":
                raise ValueError(f"scale must be a positive number or 'learned', got {self.scale!r}")
        elif isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number or 'learned', got {self.scale!r}")
        if not (isinstance(self.scale_init, (int, float)) and math.isfinite(self.scale_init) and self.scale_init > 0):
            raise ValueError(f"scale_init must be a positive number, got {self.scale_init!r}")
        if (self.placement == "modules") != (self.targets is not None):
            raise ValueError("targets=[...] is required with placement='modules' and only allowed there")

    @property
    def learned(self) -> bool:
        return self.scale == "learned"

    def attach(self, model: nn.Module, name: str) -> None:
        if self.placement == "modules":
            for module in match_modules(model, self.targets).values():
                d_in, d_out = module_widths(module, self.hidden_size)
                add_output_delta(module, name, ParallelAdapter(name, d_in, self.r, self, d_out))
            return
        backbone = find_backbone(model)
        for kind in {"ffn": ["ffn"], "attn": ["attn"], "both": ["attn", "ffn"]}[self.placement]:
            for site in backbone.sites(kind):
                site.deltas[name] = ParallelAdapter(name, backbone.hidden_size, self.r, self)


@register_method
@dataclass
class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    """The scaled parallel adapter: the same module with s = 4 by default (He et al. 2022, §4.1, Table 5)."""

    method = "scaled_parallel"
    scale: float | str = 4.0


class ParallelAdapter(AdapterModule):
    """Δh = s · (W_up f(W_down x + b_down) + b_up), read from the sublayer input x (never from h)."""

    def __init__(self, adapter_name: str, d: int, r: int, config: ParallelAdapterConfig, d_out: int | None = None):
        super().__init__(adapter_name)
        self.act = ACTIVATIONS[config.activation]
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d_out or d)
        with torch.no_grad():  # He et al.'s "lora" init: the adapter starts as Δh = 0
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for t in (self.down.bias, self.up.weight, self.up.bias):
                nn.init.zeros_(t)
        if config.learned:
            self.scale = nn.Parameter(torch.tensor(float(config.scale_init)))
        else:
            self.register_buffer("scale", torch.tensor(float(config.scale)), persistent=False)
        # a fixed s = 2^k (1, 4) scales exactly, so s·(W_up a + b_up) = W_up (s·a) + s·b_up bit for bit, outputs and
        # gradients alike: the scale is then applied to the r numbers of a rather than the d of the output
        self.scale_inside = not config.learned and math.frexp(float(config.scale))[0] == 0.5

    def forward(self, x, h, close):
        # Δh = s · A(x): x the sublayer input (B, T, d); h and close are not used (He et al. 2022, Table 1)
        a = self.act(self.down(x))  # (B, T, r)
        if self.scale_inside:
            return F.linear(a * self.scale, self.up.weight, self.up.bias * self.scale)  # (B, T, d)
        return self.scale * self.up(a)  # (B, T, d)


def parallel_count(d: int, L: int, r: int, sites: int = 1, learned: bool = False) -> int:
    """L·sites adapters of 2rd + r + d (+1 learned scale) each: L(2rd + r + d) at one site (He et al. 2022)."""
    return sites * L * (2 * r * d + r + d + int(learned))


def rank_for_budget(d: int, L: int, budget: int, sites: int = 1) -> int:
    """The largest r whose parallel adapter has at most ``budget`` parameters (for "≤ x% of the backbone")."""
    r = (budget / (sites * L) - d) // (2 * d + 1)
    if r < 1:
        raise ValueError(f"a budget of {budget:,} parameters does not fit even r=1 "
                         f"(needs {parallel_count(d, L, 1, sites):,})")
    return int(r)


# ---- inference: fold the FFN's parallel adapter into the FFN's own two matmuls ------------------------------

class FusedParallelFFN(nn.Module):
    """Inference-only FFN site with its parallel adapter folded in: because A reads x, not h, both of its
    matmuls can share the FFN's GEMMs (a sequential adapter cannot: W_down needs h first)

        z = x [W_in; W_down]ᵀ + [b_in; b_down]                     (B, T, f + r): one GEMM instead of two
        h + s·A(x) = [act(z_f), relu(z_r)] [W_out, s·W_up]ᵀ + b_out + s·b_up      (B, T, d): one GEMM

    so the adapted model is a base model whose FFN is r units wider (same FLOPs, no extra kernels)."""

    def __init__(self, ffn: nn.Module, adapter: ParallelAdapter):
        super().__init__()
        s = adapter.scale.detach()
        (ffn_in,), (ffn_out,) = ffn.role("ffn_in"), ffn.role("ffn_out")
        self.f, self.norm, self.act, self.adapter_act = ffn_in.out_features, ffn.norm, ffn.act, adapter.act
        with torch.no_grad():
            self.register_buffer("w_in", torch.cat([ffn_in.weight, adapter.down.weight]))  # (f + r, d)
            self.register_buffer("b_in", torch.cat([ffn_in.bias, adapter.down.bias]))
            self.register_buffer("w_out", torch.cat([ffn_out.weight, s * adapter.up.weight], dim=1))  # (d, f + r)
            self.register_buffer("b_out", ffn_out.bias + s * adapter.up.bias)

    def forward(self, x):
        if self.training:
            raise RuntimeError("FusedParallelFFN is for inference only (it has no dropout): call model.eval()")
        z = F.linear(x, self.w_in, self.b_in)  # (B, T, f + r)
        a = self.act(z)
        a[..., self.f:] = self.adapter_act(z[..., self.f:])  # the adapter's units use its own activation
        return self.norm(x + F.linear(a, self.w_out, self.b_out))  # (B, T, d)


def fuse_parallel_ffn(model: nn.Module, name: str) -> nn.Module:
    """Replace, in place, every FFN site holding parallel adapter ``name`` (and no other active module) by a
    ``FusedParallelFFN`` with the same output. For latency measurements and serving; not reversible."""
    fused = 0
    for layer in find_backbone(model).layers:
        adapter = layer.ffn.deltas[name] if name in layer.ffn.deltas else None
        if not isinstance(adapter, ParallelAdapter):
            continue
        if not (len(layer.ffn.role("ffn_in")) == len(layer.ffn.role("ffn_out")) == 1 and layer.ffn.post_norm):
            raise ValueError(f"cannot fuse {name!r}: fusing needs a post-LN FFN site with one input and one output "
                             f"linear (as BERT's); this one has {sorted(layer.ffn.linears())}")
        others = [k for k, m in layer.ffn.deltas.items() if k != name and m.active]
        if others:
            raise ValueError(f"cannot fuse {name!r}: the FFN site also has active modules {others}")
        layer.ffn = FusedParallelFFN(layer.ffn, adapter).train(layer.ffn.training)
        fused += 1
    if not fused:
        raise ValueError(f"no parallel adapter named {name!r} on an FFN site to fuse")
    return model


# r=96 on every FFN site: with the head 1.98% of MiniLM (within 2%)
register_recipe(Recipe.adapter(
    "parallel", lesson="04", lr=2e-3, make=lambda r: ParallelAdapterConfig(r=r, placement="ffn", scale=1.0),
    knob=Knob("bottleneck r", (8, 16, 32, 64, 96, 128, 256, 512), 96),
    description="parallel adapter r=96 on the FFN, s=1 (He et al. 2022): L(2rd + r + d)"))
register_recipe(Recipe.adapter(
    "scaled_parallel", lesson="04", lr=2e-3, make=lambda r: ScaledParallelAdapterConfig(r=r, placement="ffn"),
    knob=Knob("bottleneck r", (8, 16, 32, 64, 96, 128, 256, 512), 96),
    description="scaled parallel adapter r=96 on the FFN, s=4 (He et al. 2022, §4.1)"))
# lesson 06's position ablation (He et al. 2022, §4.3): the scaled parallel adapter at the attention site
register_recipe(Recipe.adapter(
    "parallel_attn", lesson="06", lr=2e-3, make=lambda r: ScaledParallelAdapterConfig(r=r, placement="attn"),
    knob=Knob("bottleneck r", (8, 16, 32, 64, 96, 128, 256), 96),
    description="scaled parallel adapter r=96, s=4 at the attention site (the position ablation of He et al. §4.3)",
    ablation=True, order=3))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("parallel", "ffn", Example(lambda: ParallelAdapterConfig(r=8), lambda d, L, w: parallel_count(d, L, 8)))
register_example("parallel", "both", Example(lambda: ParallelAdapterConfig(r=8, placement="both"),
                                             lambda d, L, w: parallel_count(d, L, 8, sites=2)))
register_example("scaled_parallel", "learned", Example(lambda: ScaledParallelAdapterConfig(r=8, scale="learned"),
                                                       lambda d, L, w: parallel_count(d, L, 8, learned=True)))
