"""Several configs under one adapter name: one adapter made of parts (He et al. 2022's MAM adapter is prefix
tuning + a scaled parallel adapter; the design document's "adapter + LoRA"; Mao et al. 2022's UniPELT).

    CompositeConfig(parts={"prefix": PrefixConfig(...), "ffn": ScaledParallelAdapterConfig(...)})

Each part attaches its own modules under the one name, so the adapter activates, trains, counts, saves, loads,
ejects and deletes as one; its output is exactly the composition of its parts (each part adds its Δh at its
own place, He et al. 2022, §3, Eq. 9-10). Every module records its part (``module.adapter_part``) so counts
can be split per part. Two parts may not put modules in the same place (two sequential adapters on one site would
need an order): that is an error, and the model is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, adapter_modules, config_from_dict, register_example,
                    register_method)
from .bottleneck import BottleneckConfig, pfeiffer_count
from .lora import LoRAConfig, lora_qv_count
from .prefix import PrefixConfig


class Gate(AdapterModule):
    """UniPELT's gate on one part (Mao et al. 2022, §3, Eq. 2-4): Δh ← σ(x w + b) · Δh, one learned scalar per
    token computed from the site's input x, so the model learns per input how much of each part to use.
    w = 0, b = 0 at the start: every gate opens halfway (σ(0) = 1/2). Parameters: d + 1 per gated module."""

    def __init__(self, inner: AdapterModule, d: int):
        super().__init__(inner.adapter_name)
        self.inner = inner
        self.weight, self.bias = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(()))

    def forward(self, x, h, close):
        dh = self.inner(x, h, close)
        if dh is None:
            return None
        return torch.sigmoid(x @ self.weight + self.bias).unsqueeze(-1) * dh  # (B, T, 1) · (B, T, d_out)

    def on_delete(self) -> None:
        self.inner.on_delete()


def input_width(module: nn.Module) -> int:
    """Width of the x a Δh module reads: its base layer's (LoRA) or its first projection's input."""
    base = module.__dict__.get("base_layer")
    if base is not None:
        return base.in_features
    return next(m.in_features for m in module.modules() if hasattr(m, "in_features"))


def gate_modules(model: nn.Module, modules: dict[str, AdapterModule]) -> None:
    """Wrap each of ``modules`` (path -> module, a part's Δh modules) in a ``Gate``, in its container."""
    for path, module in modules.items():
        parent, _, key = path.rpartition(".")
        container = model.get_submodule(parent)
        gated = Gate(module, input_width(module)).to(next(module.parameters()).device)
        gated.adapter_part = module.adapter_part
        container[key] = gated


def attach_parts(model: nn.Module, name: str, parts: dict[str, AdapterConfig], gated: bool = False) -> None:
    """Attach each part under ``name``, in order; refuse a part that would replace an earlier part's module.
    ``gated``: wrap every Δh module in a ``Gate`` (UniPELT); a prefix has no Δh module and stays ungated."""
    for part, config in parts.items():
        before = adapter_modules(model, name)
        config.attach(model, name)
        after = adapter_modules(model, name)
        replaced = [path for path, module in before.items() if after.get(path) is not module]
        if replaced:
            raise ValueError(f"part {part!r} ({config.method}) would replace part "
                             f"{before[replaced[0]].adapter_part!r}'s module at {replaced[0]}; the parts of one "
                             "adapter must sit in different places (sites, linears, prefixes)")
        new = {path: module for path, module in after.items() if path not in before}
        for module in new.values():
            module.adapter_part = part
        if gated:
            gate_modules(model, {p: m for p, m in new.items() if not p.startswith("prefixes.")
                                 and ".prefixes." not in p})


@register_method
@dataclass
class CompositeConfig(AdapterConfig):
    """``parts``: part name -> config (or, as saved, {"method": ..., "config": {...}}); ``gated``: UniPELT's
    learned gate on each part's Δh (Mao et al. 2022)."""

    method = "composite"
    parts: dict = field(default_factory=dict)
    gated: bool = False

    def __post_init__(self):
        if not isinstance(self.parts, dict) or len(self.parts) < 2:
            raise ValueError(f"a composite adapter needs at least two parts (name -> config), got {self.parts!r}")
        for part, config in list(self.parts.items()):
            if isinstance(config, dict) and {"method", "config"} <= set(config):
                config = self.parts[part] = config_from_dict(config["method"], config["config"])
            if not isinstance(config, AdapterConfig) or isinstance(config, CompositeConfig):
                raise ValueError(f"part {part!r} must be a method config (e.g. PrefixConfig), got "
                                 f"{type(config).__name__}")

    def attach(self, model: nn.Module, name: str) -> None:
        attach_parts(model, name, self.parts, self.gated)

    def after_ejection(self) -> "CompositeConfig":
        return CompositeConfig({part: c.after_ejection() for part, c in self.parts.items()}, self.gated)

    def deploy(self, model: nn.Module, name: str) -> None:
        for config in self.parts.values():  # each part's own step, on the modules of the one name
            config.deploy(model, name)

    def to_dict(self) -> dict:
        return {"parts": {part: {"method": c.method, "config": c.to_dict()} for part, c in self.parts.items()},
                "gated": self.gated}


# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("composite", "adapter_lora", Example(
    lambda: CompositeConfig({"adapter": BottleneckConfig(placement="pfeiffer", bottleneck=8), "lora": LoRAConfig(r=2)}),
    lambda d, L, w: pfeiffer_count(d, L, 8) + lora_qv_count(d, L, w, 2)))
register_example("composite", "gated", Example(
    lambda: CompositeConfig({"lora": LoRAConfig(r=2), "prefix": PrefixConfig(length=3, hidden=8)}, gated=True)))
