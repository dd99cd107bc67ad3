"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked
Language-models"): train the bias terms only, every other weight frozen.

    h = W x + (b + Δb)   for every Linear;    LN(x) = γ ⊙ x̂ + (β + Δβ)   for every LayerNorm        §2

As an adapter: Δb is an ``AdapterModule`` on the biased module's output (``core.add_output_delta``), h ← h + Δb,
so the pretrained b stays as it was (inactive = the base model exactly; delete leaves nothing) and several BitFit
adapters can share one model. ``deploy`` (``api.for_inference``) folds it in, b ← b + Δb: the adapted model is
then the pretrained architecture with other biases, at no extra cost.

In the unified view (He et al. 2022, §3) Δh = Δb is a constant shift of a sublayer's output, the same for every
token: the one method whose Δh does not depend on x.

Parameters: one per output of every biased module. On BERT and GPT-2 (q k v o, the FFN's two linears, two
LayerNorms per layer, one more LayerNorm: the embeddings' on BERT, the final one on GPT-2):
L·(7d + f) + d (BERT-base: 102,144, 0.09% of 110M; MiniLM, L=6, d=384, f=1536: 25,728). A model without biases (Llama,
SmolLM2: bias-free linears and RMSNorms) has nothing to train: BitFit is refused there with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, adapter_modules, add_output_delta,
                    find_backbone, match_modules, register_example, register_method, register_recipe,
                    remove_output_delta)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


@register_method
@dataclass
class BitFitConfig(AdapterConfig):
    """``targets``: None = every biased module of the backbone (the paper's BitFit); else roles (``ROLES``: "q",
    "ffn_in", ...) or module names/suffixes/regexes whose biases train (the paper's §4 subset: ["q", "ffn_in"])."""

    method = "bitfit"
    targets: list[str] | None = None

    def __post_init__(self):
        if self.targets is not None:
            self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be None (every bias) or a non-empty list of roles / module names, "
                                 f"e.g. ['q', 'ffn_in']; got {self.targets!r}")

    def attach(self, model: nn.Module, name: str) -> None:
        for module in biased_modules(model, self.targets).values():
            add_output_delta(module, name, BiasDelta(name, module))

    def deploy(self, model: nn.Module, name: str) -> None:
        fold_biases(model, name)


def biased_modules(model: nn.Module, targets: list[str] | None) -> dict[str, nn.Module]:
    """Path -> module whose bias BitFit trains; a ValueError (before any change) when there is none."""
    if targets is None:
        try:
            home = find_backbone(model)
        except TypeError:  # any other nn.Module: all of it
            home = model
        inside = tuple(p + "." for p in adapter_modules(home))
        found = {n: m for n, m in home.named_modules() if has_bias(m) and not isinstance(m, AdapterModule)
                 and not n.startswith(inside)}
        if not found:
            what = getattr(home, "description", type(home).__name__)
            raise ValueError(f"BitFit trains bias terms only (Ben Zaken et al. 2022), and this {what} has no bias: "
                             "its linear layers and norms are bias-free (Llama and SmolLM2 use bias=False and RMSNorm), "
                             "so there is nothing to train; use LoRA or IA³ on it instead")
        return found
    hits = match_modules(model, targets)
    found = {n: m for n, m in hits.items() if has_bias(m)}
    if not found:
        raise ValueError(f"BitFit targets {targets} match only modules with no bias ({list(hits)[:4]}): nothing "
                         "to train; target biased Linears or LayerNorms")
    return found


class BiasDelta(AdapterModule):
    """Δb of one biased module: returns Δb (broadcast over tokens); ``merge`` folds it into the module's bias."""

    def __init__(self, adapter_name: str, module: nn.Module):
        super().__init__(adapter_name)
        self.__dict__["base_layer"] = module  # not a submodule: its bias stays the backbone's
        self.delta = nn.Parameter(torch.zeros_like(module.bias, requires_grad=True))  # Δb starts at 0

    def forward(self, x, h=None, close=None):
        return self.delta.expand_as(h)  # h + Δb, the same Δb at every token

    def extra_repr(self) -> str:
        return f"{self.delta.numel()}"


@torch.no_grad()
def fold_biases(model: nn.Module, name: str) -> None:
    """BitFit's deployment step: b ← b + Δb in every module of adapter ``name`` (if active), its modules removed;
    an inactive adapter stays as it is (it adds nothing and can still be activated)."""
    for m in adapter_modules(model, name).values():
        if isinstance(m, BiasDelta) and m.active:
            m.base_layer.bias += m.delta
            remove_output_delta(m.base_layer, name)


def bitfit_count(d: int, L: int, f: int) -> int:
    """L·(4d + f + d + 2d) + d: per layer the biases of q, k, v, o (4d), the FFN's two linears (f + d) and two
    LayerNorms' β (2d), plus one LayerNorm outside the layers (BERT's embeddings', GPT-2's final) (Ben Zaken et al.
    2022, §2; BERT-base: 102,144)."""
    return L * (7 * d + f) + d


def bitfit_attention_count(d: int, L: int, w: int) -> int:
    """BitFit on the attention's biases only (q, k, v, o): L·(d + w + w + d), w the key/value width."""
    return L * 2 * (d + w)


# lr: chosen on question's validation split among 1e-3, 3e-3, 1e-2 (bench/classification_lr_probe.py,
# results/lesson10/lr_probe.txt)
register_recipe(Recipe.adapter(
    "bitfit", lesson="10", lr=1e-2, make=lambda targets: BitFitConfig(targets=None if targets == "all" else
                                                                      list(targets.split("+"))),
    knob=Knob("biases", ("q+ffn_in", "all"), "all"), order=2,
    description="BitFit (Ben Zaken et al. 2022): every bias term of the encoder, L·(7d + f) + d; merges"))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone); a backbone without
# biases refuses it, and the suite checks that it does so, with this reason, changing nothing
NO_BIASES = {"llama": "no bias"}
register_example("bitfit", "attention", Example(lambda: BitFitConfig(targets=["q", "k", "v", "o"]),
                                                 bitfit_attention_count, refuses=NO_BIASES))
register_example("bitfit", "every bias", Example(lambda: BitFitConfig(), refuses=NO_BIASES))
