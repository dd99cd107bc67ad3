"""The bottleneck adapter (Houlsby et al. 2019) and its one-per-layer variant (Pfeiffer et al. 2021).

    A(h) = h + W_up f(W_down h + b_down) + b_up          Houlsby et al. 2019, §2.1, Fig. 2

The site adds the residual: the module returns Δh = W_up f(W_down u + b_down) + b_up, where u is
    houlsby   u = h at both sites (attention and FFN):            out = LN(x + A(h))
    ffn       u = h at the FFN site only (one Houlsby adapter)
    pfeiffer  u = close(h), the FFN site's output under the block's closing rule, at the FFN site only:
              post-LN  out = LN(x + h + A'(LN(x + h)))            Pfeiffer et al. 2021, §3 (AdapterHub seq_bn)
              pre-norm out = r + h + A'(r + h)                    (no LayerNorm follows the residual there)
    modules   u = the output of each module matching ``targets``, on any nn.Module (generic)
Parameters per adapter: W_down m·d + b_down m + W_up d·m + b_up d = 2md + d + m.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones.contract import ACTIVATIONS
from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, add_output_delta, find_backbone,
                    match_modules, module_widths, register_example, register_method, register_recipe)

PLACEMENTS = ("houlsby", "pfeiffer", "ffn", "modules")
INITS = ("near_identity", "identity")


@register_method
@dataclass
class BottleneckConfig(AdapterConfig):
    """``bottleneck`` m, or ``reduction_factor`` (m = d / factor); neither: m = 64. ``init``: near_identity draws W_down, W_up
    from a normal with std ``init_std`` truncated at 2σ (Houlsby §3.6), biases 0; identity also zeroes W_up."""

    method = "bottleneck"
    placement: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: int | None = None
    activation: str = "relu"
    init: str = "near_identity"
    init_std: float = 1e-2
    targets: list[str] | None = None  # placement="modules" only: module names/regexes on any nn.Module
    hidden_size: int | None = None  # placement="modules" only: width of the targets' output

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}; allowed: {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; allowed: {INITS}")
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give one of bottleneck (m) or reduction_factor (m = d / factor), not both")
        if self.bottleneck is None and self.reduction_factor is None:
            self.bottleneck = 64
        for key in ("bottleneck", "reduction_factor"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if (self.placement == "modules") != (self.targets is not None):
            raise ValueError("targets=[...] is required with placement='modules' and only allowed there")

    def size(self, d: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        if d % self.reduction_factor:
            raise ValueError(f"reduction_factor {self.reduction_factor} does not divide hidden size {d}")
        return d // self.reduction_factor

    def attach(self, model: nn.Module, name: str) -> None:
        if self.placement == "modules":
            for module in match_modules(model, self.targets).values():
                try:  # a Linear's out_features, a block's (Llama's mlp) last Linear's
                    d = module_widths(module, self.hidden_size)[1]
                except ValueError:
                    raise ValueError(f"cannot infer the output width of {type(module).__name__}; pass hidden_size") \
                        from None
                add_output_delta(module, name, Bottleneck(name, d, self.size(d), self, reads="h"))
            return
        backbone = find_backbone(model)
        d = backbone.hidden_size
        for layer in backbone.layers:
            sites = [layer.attn, layer.ffn] if self.placement == "houlsby" else [layer.ffn]
            for site in sites:
                reads = "output" if self.placement == "pfeiffer" else "h"
                site.deltas[name] = Bottleneck(name, d, self.size(d), self, reads)


class Bottleneck(AdapterModule):
    """Δh = W_up f(W_down u + b_down) + b_up, u = h or the site's closed output (see the module docstring)."""

    def __init__(self, adapter_name: str, d: int, m: int, config: BottleneckConfig, reads: str = "h"):
        super().__init__(adapter_name)
        self.reads, self.act = reads, ACTIVATIONS[config.activation]
        self.down, self.up = nn.Linear(d, m), nn.Linear(m, d)
        for linear in (self.down, self.up):
            nn.init.trunc_normal_(linear.weight, std=config.init_std, a=-2 * config.init_std, b=2 * config.init_std)
            nn.init.zeros_(linear.bias)
        if config.init == "identity":
            nn.init.zeros_(self.up.weight)

    def forward(self, x, h, close):
        u = close(h) if self.reads == "output" else h  # (B, T, d)
        return self.up(self.act(self.down(u)))  # (B, T, d)


def houlsby_count(d: int, L: int, m: int) -> int:
    """Two adapters per layer, each 2md + d + m: 2L(2md + d + m) (Houlsby et al. 2019, §3.1)."""
    return 2 * L * (2 * m * d + d + m)


def pfeiffer_count(d: int, L: int, m: int) -> int:
    """One adapter per layer: L(2md + d + m) (Pfeiffer et al. 2021)."""
    return L * (2 * m * d + d + m)


register_recipe(Recipe.adapter(
    "houlsby", lesson="01", lr=3e-3, make=lambda m: BottleneckConfig(placement="houlsby", bottleneck=m),
    knob=Knob("bottleneck m", (2, 8, 16, 32, 64, 128, 256), 32),
    description="Houlsby adapters m=32, two per layer (1.33% of MiniLM; Houlsby et al. 2019): 2L(2md + d + m)"))
register_recipe(Recipe.adapter(
    "pfeiffer", lesson="01", lr=3e-3, make=lambda m: BottleneckConfig(placement="pfeiffer", bottleneck=m),
    knob=Knob("bottleneck m", (2, 8, 16, 32, 48, 64, 128, 256), 64),
    description="Pfeiffer adapter m=64, one per layer at the FFN (1.32% of MiniLM; Pfeiffer et al. 2021): "
                "L(2md + d + m)"))
# lesson 06's insertion-form ablation of MAM's FFN part (sequential instead of parallel, same count as parallel r=96)
register_recipe(Recipe.adapter(
    "sequential_ffn", lesson="06", lr=2e-3, make=lambda m: BottleneckConfig(placement="ffn", bottleneck=m),
    knob=Knob("bottleneck m", (8, 16, 32, 64, 96, 128, 256), 96),
    description="sequential adapter m=96 on the FFN output h (Houlsby's FFN adapter; same count as parallel r=96)",
    ablation=True, order=2))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("bottleneck", "houlsby", Example(lambda: BottleneckConfig(bottleneck=8),
                                                  lambda d, L, w: houlsby_count(d, L, 8)))
register_example("bottleneck", "pfeiffer", Example(lambda: BottleneckConfig(placement="pfeiffer", bottleneck=8),
                                                   lambda d, L, w: pfeiffer_count(d, L, 8)))
