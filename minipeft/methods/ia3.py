"""IA³, "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", §3.3): three learned vectors per
block rescale the keys, the values and the FFN's inner activation, element by element,

    softmax(Q (l_k ⊙ K)ᵀ / √d_k) (l_v ⊙ V)        and        (l_ff ⊙ γ(W₁ x)) W₂          (Liu et al. 2022, §3.3)

l_k, l_v ∈ R^{d_k}, l_ff ∈ R^{d_ff}, all initialised to ones, so the model starts exactly as the pretrained one.

Placement, as peft's ``IA3Config``: ``targets`` are the Linears whose *output* is rescaled (keys, values:
h ← l ⊙ h, roles "k", "v"), except those also in ``feedforward``, whose *input* is rescaled (x ← l ⊙ x: the input of
the FFN's output linear, role "ffn_out", is γ(W₁x), BERT's ``output.dense``, Llama's ``down``). Each vector is
written as a Δ on a site, so it can be switched off, deleted or routed per example like every other method:

    output:  l ⊙ h = h + (l − 1) ⊙ h      (``core.add_output_delta``)
    input:   l ⊙ x = x + (l − 1) ⊙ x      (``core.add_input_delta``)

Both fold into the weights (deployment, ``fold_and_unload``): W (l ⊙ x) = (W diag(l)) x scales W's columns;
l ⊙ (W x + b) = (diag(l) W) x + l ⊙ b scales W's rows and the bias (as peft's ``IA3Layer.merge``).

Parameters: one per rescaled feature, L (w_k + w_v + d_ff) with the defaults (w the key/value width):
BERT-base L = 12, 768 + 768 + 3072 → 55,296 (the adapters library's IA³ on BERT-base has the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, adapter_modules, add_input_delta,
                    add_output_delta, match_modules, register_example, register_method, register_recipe,
                    remove_input_delta, remove_output_delta)

SIDES = ("output", "input")


def _names(value, field_name: str, allow_empty: bool) -> list[str]:
    names = [value] if isinstance(value, str) else list(value or [])
    if (not names and not allow_empty) or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{field_name} must be a {'' if allow_empty else 'non-empty '}list of roles or module "
                         f"names, e.g. ['k', 'v', 'ffn_out'] on a minipeft backbone or ['key', 'value', "
                         f"'output.dense'] on a transformers BertModel; got {value!r}")
    return names


@register_method
@dataclass
class IA3Config(AdapterConfig):
    """targets: the Linears that get a vector (roles ``ROLES`` or names/suffixes/regexes, as LoRA's); feedforward:
    those of them whose input is rescaled (peft's ``feedforward_modules``), the rest have their output rescaled.
    Defaults: l_k, l_v on the key and value projections' outputs, l_ff on the FFN output linear's input (§3.3)."""

    method = "ia3"
    targets: list[str] = field(default_factory=lambda: ["k", "v", "ffn_out"])
    feedforward: list[str] = field(default_factory=lambda: ["ffn_out"])

    def __post_init__(self):
        self.targets = _names(self.targets, "targets", allow_empty=False)
        self.feedforward = _names(self.feedforward, "feedforward", allow_empty=True)

    def placements(self, model: nn.Module) -> dict[str, tuple[nn.Linear, str]]:
        """Path -> (Linear, "output" or "input"); an error, before any change, if a feedforward module is not a
        target (peft's rule: feedforward_modules ⊆ target_modules)."""
        linears = match_modules(model, self.targets, nn.Linear)
        inputs = match_modules(model, self.feedforward, nn.Linear) if self.feedforward else {}
        stray = sorted(set(inputs) - set(linears))
        if stray:
            raise ValueError(f"feedforward modules must also be targets (their input is rescaled instead of their "
                             f"output); {stray[:3]} are matched by feedforward={self.feedforward} but not by "
                             f"targets={self.targets}")
        return {p: (m, "input" if p in inputs else "output") for p, m in linears.items()}

    def attach(self, model: nn.Module, name: str) -> None:
        for linear, side in self.placements(model).values():
            vector = IA3Vector(name, linear, side)
            (add_input_delta if side == "input" else add_output_delta)(linear, name, vector)

    def deploy(self, model: nn.Module, name: str) -> None:
        fold_and_unload(model, name)


class IA3Vector(AdapterModule):
    """One learned vector l of IA³ on one ``nn.Linear`` (Liu et al. 2022, §3.3): on its output (``side="output"``,
    l ∈ R^{d_out}, Δh = (l − 1) ⊙ h) or on its input (``side="input"``, l ∈ R^{d_in}, Δx = (l − 1) ⊙ x).
    Keeps a plain (unregistered) reference to its Linear, ``base_layer``, to fold l into its weight."""

    def __init__(self, adapter_name: str, base_layer: nn.Linear, side: str):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        super().__init__(adapter_name)
        self.__dict__["base_layer"] = base_layer  # not a submodule: its weights stay the backbone's
        self.side = side
        width = base_layer.out_features if side == "output" else base_layer.in_features
        w = base_layer.weight
        self.l = nn.Parameter(torch.ones(width, device=w.device, dtype=w.dtype))  # ones: the model starts unchanged

    def forward(self, x, h=None, close=None):
        # output: Δh = (l − 1) ⊙ h, so h + Δh = l ⊙ h; input: Δx = (l − 1) ⊙ x   (Liu et al. 2022, §3.3)
        return (self.l - 1) * (h if self.side == "output" else x)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold l into the Linear: output, W ← diag(l) W and b ← l ⊙ b; input, W ← W diag(l)."""
        layer = self.base_layer
        if self.side == "output":
            layer.weight.mul_(self.l[:, None])
            if layer.bias is not None:
                layer.bias.mul_(self.l)
        else:
            layer.weight.mul_(self.l[None, :])

    def extra_repr(self) -> str:
        b = self.base_layer
        return f"{self.side}, {b.in_features}->{b.out_features}, l: {self.l.numel()}"


def _alone(vector: IA3Vector) -> bool:
    """No other adapter on its Linear (folding one of several would change the order they apply in)."""
    layer = vector.base_layer
    others = [*getattr(layer, "output_deltas", {}).values(), *getattr(layer, "input_deltas", {}).values()]
    return all(m is vector for m in others)


def fold_and_unload(model: nn.Module, name: str) -> None:
    """IA³'s deployment step (``api.for_inference``): each active vector of adapter ``name`` folds into its Linear's
    weight (and bias) and goes, leaving plain Linears; a vector sharing its Linear with another adapter stays as it
    is (folding it would reorder the two), and an inactive adapter is left as it is (it can still be activated)."""
    for vector in adapter_modules(model, name).values():
        if isinstance(vector, IA3Vector) and vector.active and _alone(vector):
            vector.fold()
            remove = remove_output_delta if vector.side == "output" else remove_input_delta
            remove(vector.base_layer, name)


# ---- counting --------------------------------------------------------------------------------------------------

def ia3_count(d_k: int, d_v: int, d_ff: int, num_layers: int) -> int:
    """L (d_k + d_v + d_ff): one entry of l_k, l_v, l_ff per rescaled feature (Liu et al. 2022, §3.3)."""
    return num_layers * (d_k + d_v + d_ff)


def ia3_attention_count(d: int, L: int, w: int) -> int:
    """l_k, l_v on the key and value outputs (w wide) and a vector on the attention output's input (d wide, as
    peft's BERT default "output.dense" also matches): L (2w + d)."""
    return L * (2 * w + d)


SIZES = {"k, v": (["k", "v"], []), "k, v, ffn": (["k", "v", "ffn_out"], ["ffn_out"])}

# learning rate: chosen on question's validation split among 3e-3 (Liu et al. 2022's), 1e-2, 3e-2
# (bench/classification_lr_probe.py, results/lesson10/lr_probe.txt); 1e-1, past the grid's edge, is lower (0.900
# against 0.910: results/lesson10/lr_probe_edges.txt)
register_recipe(Recipe.adapter(
    "ia3", lesson="10", lr=3e-2, make=lambda size: IA3Config(*SIZES[size]),
    knob=Knob("rescaled", tuple(SIZES), "k, v, ffn"), order=1,
    description="IA³ (Liu et al. 2022): vectors l_k, l_v, l_ff rescaling keys, values and the FFN's inner "
                "activation; L(w_k + w_v + d_ff), mergeable"))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone). The default's count
# needs the FFN width d_ff, which the suite's closed forms do not receive: tests/test_ia3.py checks it per backbone.
register_example("ia3", "ia3", Example(IA3Config))
register_example("ia3", "attention", Example(lambda: IA3Config(targets=["k", "v", "o"], feedforward=["o"]),
                                             ia3_attention_count))
