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

from torch import nn

from ..core import AdapterConfig, adapter_modules, config_from_dict, register_method


def attach_parts(model: nn.Module, name: str, parts: dict[str, AdapterConfig]) -> None:
    """Attach each part under ``name``, in order; refuse a part that would replace an earlier part's module."""
    for part, config in parts.items():
        before = adapter_modules(model, name)
        config.attach(model, name)
        after = adapter_modules(model, name)
        replaced = [path for path, module in before.items() if after.get(path) is not module]
        if replaced:
            raise ValueError(f"part {part!r} ({config.method}) would replace part "
                             f"{before[replaced[0]].adapter_part!r}'s module at {replaced[0]}; the parts of one "
                             "adapter must sit in different places (sites, linears, prefixes)")
        for path, module in after.items():
            if path not in before:
                module.adapter_part = part


@register_method
@dataclass
class CompositeConfig(AdapterConfig):
    """``parts``: part name -> config (or, as saved, {"method": ..., "config": {...}})."""

    method = "composite"
    parts: dict = field(default_factory=dict)

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
        attach_parts(model, name, self.parts)

    def after_ejection(self) -> "CompositeConfig":
        return CompositeConfig(parts={part: c.after_ejection() for part, c in self.parts.items()})

    def to_dict(self) -> dict:
        return {"parts": {part: {"method": c.method, "config": c.to_dict()} for part, c in self.parts.items()}}
