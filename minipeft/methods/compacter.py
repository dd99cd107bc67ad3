"""PHM-Adapter, Compacter and Compacter++ (Karimi Mahabadi et al. 2021): bottleneck adapters whose two
projections are PHM layers (``minipeft.methods.phm``).

    A(h) = h + U(f(D(u)))          U, D: y = x W + b with W = Σ_i A_i ⊗ B_i        §2.3 Eq. 3-4, §3
    PHM-Adapter   B_i full, each PHM layer its own A_i
    Compacter     B_i = s_i t_iᵀ (rank 1, "LPHM", §3.2), one set of A_i shared by every layer and both
                  projections of the adapter (§3.1); Houlsby placement (attention and FFN sites)
    Compacter++   the same, one adapter per layer at the FFN site, reading u = LN(x + h) with the same
                  pretrained LN (Pfeiffer's placement, as the paper's Compacter++ and AdapterHub's
                  ``compacter++``); ``placement="ffn"`` instead reads u = h
The module returns Δh = U(f(D(u))); the site adds it (see ``bottleneck.py``; the placements, activations
and the forward are the bottleneck adapter's, imported from there).

Parameters (d hidden, k bottleneck, L layers, n Kronecker products), the paper's §3.3, without biases:
    PHM-Adapter   4L(kd/n + n³)            Compacter   4L(k + d) + n³
minipeft counts exactly what it trains: biases too (k + d per adapter), so with s adapters per layer
(2 Houlsby, 1 Compacter++):
    PHM-Adapter   sL(2kd/n + 2n³ + k + d)  Compacter   sL(2r(k + d) + k + d) + n³
The shared A (n³) is one tensor referenced by every PHM layer; the core API counts and saves it once (it
appears under the first module, ``layers.0...down.A``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones.contract import ACTIVATIONS
from ..core import (AdapterModule, Example, Knob, Recipe, add_output_delta, find_backbone, match_modules,
                    register_example, register_method, register_recipe)
from .bottleneck import Bottleneck, BottleneckConfig
from .phm import PHMLinear, new_phm_rule, phm_layer_count


@register_method
@dataclass
class PHMAdapterConfig(BottleneckConfig):
    """A bottleneck adapter with PHM projections (k = 24 unless ``bottleneck`` or ``reduction_factor`` is given).
    Fields of ``BottleneckConfig`` plus ``n`` (Kronecker
    products; divides d and k), ``rank`` (None: full B_i; r: B_i = s_i t_iᵀ) and ``shared_A`` (one A for the
    whole adapter). ``init_std`` is the std of A's normal init (B, s, t: Glorot uniform, biases 0);
    ``init="identity"`` also zeroes the up projection's B (or t), so the model starts exactly as the base."""

    method = "phm_adapter"
    bottleneck: int | None = None  # neither bottleneck nor reduction_factor given: k = 24
    activation: str = "gelu"
    n: int = 4
    rank: int | None = None
    shared_A: bool = False

    def __post_init__(self):
        if self.bottleneck is None and self.reduction_factor is None:
            self.bottleneck = 24
        super().__post_init__()
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ValueError(f"n (the number of Kronecker products) must be a positive integer, got {self.n!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise ValueError(f"rank must be None (full B_i, PHM) or a positive integer (LPHM), got {self.rank!r}")
        if not isinstance(self.shared_A, bool):
            raise ValueError(f"shared_A must be True or False, got {self.shared_A!r}")
        if self.bottleneck is not None and self.bottleneck % self.n:
            raise ValueError(f"n={self.n} must divide the bottleneck {self.bottleneck}; allowed n: "
                             f"{[i for i in range(1, self.bottleneck + 1) if self.bottleneck % i == 0]}")

    def attach(self, model: nn.Module, name: str) -> None:
        A = new_phm_rule(self.n, self.init_std) if self.shared_A else None  # (n, n, n), one per adapter
        if self.placement == "modules":
            for module in match_modules(model, self.targets).values():
                d = self.hidden_size or getattr(module, "out_features", None)
                if d is None:
                    raise ValueError(f"cannot infer the output width of {type(module).__name__}; pass hidden_size")
                add_output_delta(module, name, PHMAdapter(name, d, self.size(d), self, "h", A))
            return
        backbone = find_backbone(model)
        d = backbone.hidden_size
        for layer in backbone.layers:
            for site in ([layer.attn, layer.ffn] if self.placement == "houlsby" else [layer.ffn]):
                reads = "output" if self.placement == "pfeiffer" else "h"
                site.deltas[name] = PHMAdapter(name, d, self.size(d), self, reads, A)

    def parameter_count(self, d: int, L: int) -> int:
        """What ``attach`` creates on an encoder with hidden size d and L layers (biases and A included)."""
        if self.placement == "modules":
            raise ValueError("parameter_count needs a site placement (houlsby, pfeiffer, ffn), not 'modules'")
        sites = 2 if self.placement == "houlsby" else 1
        return phm_adapter_count(d, L, self.size(d), self.n, self.rank, self.shared_A, sites)


@register_method
@dataclass
class CompacterConfig(PHMAdapterConfig):
    """Compacter: LPHM rank 1, A shared by all layers and both projections, Houlsby placement (§3)."""

    method = "compacter"
    rank: int | None = 1
    shared_A: bool = True


@register_method
@dataclass
class CompacterPPConfig(CompacterConfig):
    """Compacter++: Compacter at the FFN site only, reading LN(x + h) (Pfeiffer's placement, §3/§4)."""

    method = "compacter_pp"
    placement: str = "pfeiffer"


class PHMAdapter(Bottleneck):
    """Δh = U f(D u) with D: d -> k and U: k -> d PHM layers (u = h or the site's closed output; forward from Bottleneck).
    ``A``: the adapter's shared (n, n, n) slow weights, or None for a PHM-Adapter (each layer owns its A)."""

    def __init__(self, adapter_name: str, d: int, m: int, config: PHMAdapterConfig, reads: str = "h",
                 A: nn.Parameter | None = None):
        AdapterModule.__init__(self, adapter_name)  # not Bottleneck.__init__: it would build dense layers
        self.reads, self.act = reads, ACTIVATIONS[config.activation]
        self.down = PHMLinear(d, m, config.n, config.rank, A, init_std=config.init_std)  # (B, T, d) -> (B, T, k)
        self.up = PHMLinear(m, d, config.n, config.rank, A, init_std=config.init_std)  # (B, T, k) -> (B, T, d)
        if config.init == "identity":  # U's W = Σ A_i ⊗ 0 = 0, so Δh = b_up = 0
            nn.init.zeros_(self.up.B if config.rank is None else self.up.t)


# ---- counts ---------------------------------------------------------------------------------------------------

def phm_adapter_count(d: int, L: int, k: int, n: int, rank: int | None = None, shared_A: bool = False,
                      sites: int = 2, bias: bool = True) -> int:
    """Exact: sites·L adapters, each a d->k and a k->d PHM layer (+ biases), + n³ once if A is shared."""
    per_adapter = sum(phm_layer_count(i, o, n, rank, with_A=not shared_A, bias=bias) for i, o in ((d, k), (k, d)))
    return sites * L * per_adapter + (n ** 3 if shared_A else 0)


def compacter_count(d: int, L: int, k: int, n: int = 4, rank: int = 1, sites: int = 2) -> int:
    """Compacter exactly as minipeft builds it: sL(2r(k + d) + k + d) + n³ (sites s = 2; Compacter++ s = 1)."""
    return phm_adapter_count(d, L, k, n, rank, shared_A=True, sites=sites)


def paper_phm_adapter_count(d: int, L: int, k: int, n: int) -> int:
    """The paper's §3.3 count (no biases): 4L(kd/n + n³)."""
    return 4 * L * (k * d // n + n ** 3)


def paper_compacter_count(d: int, L: int, k: int, n: int) -> int:
    """The paper's §3.3 count (no biases): 4L(k + d) + n³."""
    return 4 * L * (k + d) + n ** 3


# lr 3e-3 as in the paper (and in results/ and lesson 03's full run); a short probe (640 examples, 1 epoch) gave
# validation 0.620 / 0.678 / 0.750 at 1e-3 / 3e-3 / 1e-2, so 1e-2 is worth a try on the full budget.
register_recipe(Recipe.adapter(
    "compacter", lesson="03", lr=3e-3, make=lambda k: CompacterConfig(bottleneck=k, n=4),
    knob=Knob("bottleneck k", (8, 16, 24, 32, 48, 64, 96), 24),
    description="Compacter k=24, n=4 (0.065% of MiniLM; Karimi Mahabadi et al. 2021): 4L(k + d) + n³ + biases"))
register_recipe(Recipe.adapter(
    "compacter_pp", lesson="03", lr=3e-3, make=lambda k: CompacterPPConfig(bottleneck=k, n=4),
    knob=Knob("bottleneck k", (8, 16, 24, 32, 48, 64, 96), 24),
    description="Compacter++ k=24, n=4, FFN only (0.033% of MiniLM; Karimi Mahabadi et al. 2021)"))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("phm_adapter", "phm", Example(lambda: PHMAdapterConfig(bottleneck=8, n=4),
                                               lambda d, L, w: phm_adapter_count(d, L, 8, 4)))
register_example("compacter", "compacter", Example(lambda: CompacterConfig(bottleneck=8, n=4),
                                                   lambda d, L, w: compacter_count(d, L, 8, 4)))
register_example("compacter_pp", "compacter_pp", Example(lambda: CompacterPPConfig(bottleneck=8, n=4),
                                                         lambda d, L, w: compacter_count(d, L, 8, 4, sites=1)))
