"""The MAM adapter ("Mix-And-Match", He et al. 2022, §4.4): prefix tuning on the attention and a scaled parallel
adapter on the FFN, one adapter under one name (``composite.CompositeConfig``).

    attention   head = (1 − λ(x)) Attn(x) + λ(x) softmax(q P_kᵀ) P_v      prefix, l = 30          (Eq. 7)
    FFN         h ← h + s · W_up ReLU(W_down x + b_down) + s · b_up         scaled PA, s = 4          (Table 1)

He et al.'s headline MAM (BART-large, d = 1024): l = 30, r = 512 = d/2, s = 4 (6.7% of the parameters); the
reference library's MAM (AdapterHub ``mam``) is the same rule on any width: prefix MLP k = 800, r = d/2 ("reduction
factor 2"), s = 4: 22,493,984 trained parameters on BERT-base, 7,644,672 stored after ejecting the prefix MLP.

It is **not** "adapter + LoRA" (the design document says so; the paper does not): the gated mix of a sequential
adapter, prefix and LoRA is UniPELT (Mao et al. 2022). ``adapter_lora`` below builds the design document's
combination as a composite, so the two can be measured side by side.

The budget knob: ``reduction_factor`` (r = d / factor) sets the FFN part, ``length`` the prefix; ``budget`` (a
fraction of the backbone, e.g. 0.005) instead picks the largest r whose stored MAM (ejected prefix 2·l·w·L + the
parallel adapter L(2rd + r + d)) fits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..core import (AdapterConfig, Example, Knob, Recipe, find_backbone, register_example, register_method,
                    register_recipe)
from .bottleneck import BottleneckConfig
from .composite import CompositeConfig, attach_parts
from .lora import LoRAConfig
from .parallel import ScaledParallelAdapterConfig, parallel_count, rank_for_budget
from .prefix import PrefixConfig, eject_prefix, prefix_stored_count, prefix_training_count


@register_method
@dataclass
class MAMConfig(AdapterConfig):
    """Prefix (``length`` l, reparameterised through an MLP of width ``hidden``) + scaled parallel adapter on the
    FFN (r = d / ``reduction_factor``, or chosen by ``budget``; scale s). ``ejected`` is set by ``eject_prefix``."""

    method = "mam"
    length: int = 30
    hidden: int = 800
    reduction_factor: int | None = 2
    budget: float | None = None
    scale: float = 4.0
    ejected: bool = False

    def __post_init__(self):
        if (self.reduction_factor is None) == (self.budget is None):
            raise ValueError("give one of reduction_factor (r = d / factor) or budget (a fraction of the backbone, "
                             f"e.g. 0.005), not both or neither; got {self.reduction_factor!r} and {self.budget!r}")
        if self.reduction_factor is not None and (not isinstance(self.reduction_factor, int) or
                                                  self.reduction_factor < 1):
            raise ValueError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise ValueError(f"budget must be a fraction of the backbone in (0, 1), got {self.budget!r}")
        self.prefix_config()  # validates length, hidden, ejected
        ScaledParallelAdapterConfig(scale=self.scale)  # validates the scale

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(length=self.length, hidden=self.hidden, reparameterize=True, ejected=self.ejected)

    def rank(self, backbone) -> int:
        d, L = backbone.hidden_size, backbone.num_layers
        if self.budget is None:
            if d % self.reduction_factor:
                raise ValueError(f"reduction_factor {self.reduction_factor} does not divide hidden size {d}")
            return d // self.reduction_factor
        allowed = self.budget * backbone.bare_parameter_count()
        prefix = prefix_stored_count(backbone.attention.kv_width, L, self.length)
        if allowed - prefix < parallel_count(d, L, 1):
            raise ValueError(f"a budget of {self.budget:g} ({int(allowed):,} parameters) leaves no room for the FFN "
                             f"part: the prefix alone (length {self.length}) stores {prefix:,}; lower the length "
                             "or raise the budget")
        return rank_for_budget(d, L, int(allowed - prefix))

    def parts(self, backbone) -> dict[str, AdapterConfig]:
        return {"prefix": self.prefix_config(),
                "ffn": ScaledParallelAdapterConfig(r=self.rank(backbone), placement="ffn", scale=self.scale)}

    def attach(self, model: nn.Module, name: str) -> None:
        attach_parts(model, name, self.parts(find_backbone(model)))

    def after_ejection(self) -> "MAMConfig":
        return dataclasses.replace(self, ejected=True)

    def deploy(self, model: nn.Module, name: str) -> None:
        eject_prefix(model, name)  # the prefix part keeps only P; the parallel adapter stays


def mam_stored_count(d: int, L: int, l: int, r: int, kv_width: int | None = None) -> int:
    """What inference needs: the ejected prefix 2·l·w·L + the parallel adapter L(2rd + r + d)."""
    return prefix_stored_count(kv_width or d, L, l) + parallel_count(d, L, r)


def adapter_lora(m: int = 16, r: int = 8, gated: bool = False) -> CompositeConfig:
    """The design document's "MAM" (adapter + LoRA): a Pfeiffer adapter (bottleneck m) at the FFN and LoRA
    (rank r) on W_q, W_v, under one name; ``gated``: each behind UniPELT's learned gate (Mao et al. 2022)."""
    return CompositeConfig(parts={"adapter": BottleneckConfig(placement="pfeiffer", bottleneck=m),
                                  "lora": LoRAConfig(r=r, alpha=2 * r, targets=["q", "v"])}, gated=gated)


# The design space in miniature (lesson 06), every point at ≈ 2% of MiniLM stored, like the single methods' recipes;
# besides MAM, the points are ablations (compare runs them when named: --methods adapter_lora ...), each registered
# with the method it varies: adapter_lora (MAM's composition) here, sequential_ffn in bottleneck.py, parallel_attn
# in parallel.py; ``order`` keeps lesson 06's order (mam, adapter_lora, sequential_ffn, parallel_attn).
register_recipe(Recipe.adapter(
    "mam", lesson="06", lr=1e-3, make=lambda budget: MAMConfig(reduction_factor=None, budget=budget),
    knob=Knob("stored budget (fraction of the backbone)", (0.01, 0.02, 0.05, 0.1), 0.02),
    description="MAM adapter (He et al. 2022, §4.4): prefix l=30 (k=800) + scaled parallel adapter s=4 on the "
                "FFN, r chosen to store 2% of the backbone"))
register_recipe(Recipe.adapter(
    "adapter_lora", lesson="06", lr=2e-3, make=lambda m: adapter_lora(m=m, r=8),
    knob=Knob("bottleneck m (+ LoRA r=8)", (8, 16, 32, 64, 80, 128), 80),
    description="the design document's 'MAM': Pfeiffer adapter m=80 + LoRA r=8 on W_q, W_v (≈2%, matched to mam)",
    ablation=True, order=1))

# the conformance suite's example (tests/test_conformance.py: every method on every backbone)
register_example("mam", "mam", Example(
    lambda: MAMConfig(length=3, hidden=16, reduction_factor=8),
    lambda d, L, w: (prefix_training_count(d, L, 3, 16, kv_width=w) + parallel_count(d, L, d // 8),
                     mam_stored_count(d, L, 3, d // 8, kv_width=w))))
