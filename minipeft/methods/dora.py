"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):
a pretrained weight is a magnitude times a direction, W = m · V/‖V‖_c (Eq. 2); DoRA trains the magnitude m
directly and the direction through LoRA,

    W' = m · (W0 + ΔW) / ‖W0 + ΔW‖_c,     ΔW = s · B A  (LoRA's, s = α/r)         Liu et al. 2024, Eq. 5

m ∈ R^{d_out} starts at ‖W0‖_c and B = 0, so W' = W0 at the start. ‖·‖_c is the norm of each output unit's
weight vector: the paper writes W ∈ R^{d×k} acting as xW, where a column is one output unit; for PyTorch's
``nn.Linear`` (W (d_out, d_in), y = W x) that is the norm of each *row*, over the input axis, one per output
feature, as peft's ``DoraLinearLayer.get_weight_norm`` (``torch.linalg.norm(W + s·BA, dim=1)``).

§4.3: the norm ‖W0 + ΔW‖_c is treated as a constant in the backward pass ("detaching it from the gradient graph"),
so A, B get gradients only through the direction's numerator and m through its factor; this saves the memory of
the norm's backward (and is what peft does). With g = m / ‖W0 + sBA‖_c (detached), the layer's output is

    h' = g ⊙ (W0 + sBA) x + b = h + (g − 1) ⊙ W0 x + g ⊙ s B A x      (the bias is not rescaled, as in peft)

which minipeft adds as a Δh on the Linear's output (``core.add_output_delta``), like LoRA; W0 x is recomputed from
the weight (dropout, if any, on x first, as peft in training), not read from h, which may hold other adapters'
Δh on the same Linear. It merges: W ← g (W0 + sBA), the bias unchanged.

Parameters per target: LoRA's r(d_in + d_out) plus d_out for m.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core import (Example, Knob, Recipe, add_output_delta, match_modules, register_example, register_method,
                    register_recipe)
from .lora import LoRAConfig, LoRALinear, lora_qv_count


@register_method
@dataclass
class DoRAConfig(LoRAConfig):
    """LoRA's fields (r, alpha, dropout, targets, rslora, init) for the direction's update; m, one magnitude per
    output feature of each target, is added (Liu et al. 2024, Eq. 5). peft: ``LoraConfig(use_dora=True)``."""

    method = "dora"

    def attach(self, model: nn.Module, name: str) -> None:
        for linear in match_modules(model, self.targets, nn.Linear).values():
            add_output_delta(linear, name, DoRALinear(name, linear, self))


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖_c of a (d_out, d_in) weight: the norm of each output unit's weights (each row), shape (d_out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRALinear(LoRALinear):
    """DoRA on one ``nn.Linear``: LoRA's A, B plus the magnitude m (d_out,); returns
    Δh = (g − 1) ⊙ W0 x + g ⊙ s B A x with g = m / ‖W0 + sBA‖_c, the norm detached (Liu et al. 2024, Eq. 5, §4.3)."""

    def __init__(self, adapter_name: str, base_layer: nn.Linear, config: DoRAConfig):
        super().__init__(adapter_name, base_layer, config)
        with torch.no_grad():  # m = ‖W0 + sBA‖_c at the start (B = 0: ‖W0‖_c), so W' = W0
            self.m = nn.Parameter(self.weight_norm())
        self.merged_norm = None  # the norm a merge divided by (unmerge needs the same one)

    def weight_norm(self) -> torch.Tensor:
        """‖W0 + sBA‖_c, (d_out,), detached: a constant for the backward pass (§4.3)."""
        return column_norm(self.base_layer.weight + self.delta_weight()).detach()

    def forward(self, x, h=None, norm=None):
        if self.merged:  # W' is already the Linear's weight: LoRA's rule (None, or an error if asked to train)
            return super().forward(x, h, norm)
        g = self.m / self.weight_norm()  # (d_out,): magnitude over the detached norm
        x = self.dropout(x)
        base = F.linear(x, self.base_layer.weight)  # W0 x, no bias: (..., d_out)
        update = F.linear(F.linear(x, self.A) * self.scale, self.B)  # s B A x: (..., d_out)
        return (g - 1) * base + g * update  # h' − h = g ⊙ (W0 + sBA) x − W0 x   (Eq. 5)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← m/‖W0 + sBA‖_c ⊙ (W0 + sBA), row by row (Eq. 5); then Δh is skipped."""
        if self.merged:
            raise RuntimeError(f"DoRA {self.adapter_name!r} is already merged into this layer; merging again "
                               "would apply it twice. Weights left unchanged.")
        weight = self.base_layer.weight
        self.merged_norm = self.weight_norm()
        weight.copy_((self.m / self.merged_norm)[:, None] * (weight + self.delta_weight()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W / g − sBA with the g of the merge: back to W0 (up to fp32 rounding)."""
        if not self.merged:
            raise RuntimeError(f"DoRA {self.adapter_name!r} is not merged into this layer, so there is nothing "
                               "to unmerge. Weights left unchanged.")
        weight = self.base_layer.weight
        weight.copy_(weight / (self.m / self.merged_norm)[:, None] - self.delta_weight())
        self.merged, self.merged_norm = False, None


# ---- counting --------------------------------------------------------------------------------------------------

def dora_count(r: int, d_in: int, d_out: int, n_targets: int = 1, num_layers: int = 1) -> int:
    """L · |targets| · (r(d_in + d_out) + d_out): LoRA's A, B and the magnitude m (Liu et al. 2024, Eq. 5)."""
    return num_layers * n_targets * (r * (d_in + d_out) + d_out)


def dora_qv_count(d: int, L: int, w: int, r: int) -> int:
    """DoRA on the query and value roles of any backbone: LoRA's L·r(d + d) + L·r(d + w), plus L(d + w) for m."""
    return lora_qv_count(d, L, w, r) + L * (d + w)


# learning rate: chosen on question's validation split among 2e-3 (LoRA's recipe's) and 5e-3
# (bench/classification_lr_probe.py, results/lesson10/lr_probe.txt); 1e-2, past the grid's edge, is lower (0.912
# against 0.914: results/lesson10/lr_probe_edges.txt)
register_recipe(Recipe.adapter(
    "dora", lesson="10", lr=5e-3, make=lambda r: DoRAConfig(r=r, alpha=2 * r, targets=["q", "v"]),
    knob=Knob("rank r", (1, 2, 4, 8, 16, 32, 64), 8), order=2,
    description="DoRA r=8, alpha=16 on W_q, W_v (Liu et al. 2024): LoRA on the direction, a learned magnitude; "
                "L·2·(r(d + d) + d), mergeable"))

# the conformance suite's example (tests/test_conformance.py: every method on every backbone)
register_example("dora", "dora", Example(lambda: DoRAConfig(r=4), lambda d, L, w: dora_qv_count(d, L, w, 4)))
