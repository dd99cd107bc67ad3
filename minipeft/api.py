"""The PEFT core API, shared by every method: attach named adapters, freeze, (de)activate, count, save, load.

Conventions every method follows:
- A method is a config dataclass (subclass of ``AdapterConfig``, validated in ``__post_init__``, registered
  with ``@register_method``) whose ``attach(model, name)`` creates ``AdapterModule``s inside the model.
- Every ``AdapterModule`` sits in an ``nn.ModuleDict`` under its adapter's name (a site's ``deltas``, the
  encoder's ``prefixes``, a wrapped layer's slots), so one model holds several named adapters and removing
  one is deleting those keys.
- An inactive module contributes nothing: a model with every adapter inactive is exactly the base model.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .backbones.encoder import Encoder

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


class AdapterModule(nn.Module):
    """Base of every module a method adds. ``adapter_name`` ties it to its adapter; ``active`` switches it."""

    def __init__(self, adapter_name: str):
        super().__init__()
        self.adapter_name, self.active = adapter_name, True

    def on_delete(self) -> None:
        """Called by ``delete_adapter`` just before removal: undo what the module changed outside itself
        (a merged LoRA takes its ΔW back out of the base weight). Default: nothing."""

    def stored_parameter_count(self) -> int:
        """Parameters that must be saved for inference (methods with a training-only part override it)."""
        return sum(p.numel() for p in self.parameters())


@dataclass
class AdapterConfig:
    """Base of method configs. Subclasses set ``method`` and implement ``attach``."""

    method: ClassVar[str] = ""

    def attach(self, model: nn.Module, name: str) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return asdict(self)


METHODS: dict[str, type[AdapterConfig]] = {}


def register_method(config_class: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make a config loadable by its ``method`` name."""
    METHODS[config_class.method] = config_class
    return config_class


def config_from_dict(method: str, values: dict) -> AdapterConfig:
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; registered methods: {sorted(METHODS)}")
    known = {f.name for f in fields(METHODS[method])}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{method} config has unknown fields {unknown}; allowed: {sorted(known)}")
    return METHODS[method](**values)


# ---- finding things -----------------------------------------------------------------------------------------

def find_encoder(model: nn.Module) -> Encoder:
    """Our encoder: the model itself, or its ``.encoder`` (e.g. a SequenceClassifier)."""
    for candidate in (model, getattr(model, "encoder", None)):
        if isinstance(candidate, Encoder):
            return candidate
    raise TypeError(f"this method attaches to minipeft's Encoder (or a model whose .encoder is one), "
                    f"got {type(model).__name__}; use its generic targets=... form for other modules")


def adapter_modules(model: nn.Module, name: str | None = None) -> dict[str, AdapterModule]:
    """Path -> module for every adapter module (of adapter ``name``, or all), outermost only."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule) and (name is None or module.adapter_name == name):
            if not any(path.startswith(p + ".") for p in found):
                found[path] = module
    return found


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({m.adapter_name for m in adapter_modules(model).values()})


def match_modules(model: nn.Module, targets, kind=nn.Module) -> dict[str, nn.Module]:
    """Modules of type ``kind`` whose name equals a target, ends with ``.target``, or fully matches it as a regex."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    hits = {n: m for n, m in model.named_modules() if isinstance(m, kind) and not isinstance(m, AdapterModule)
            and any(n == t or n.endswith("." + t) or re.fullmatch(t, n) for t in targets)}
    if not hits:
        names = [n for n, m in model.named_modules() if isinstance(m, kind) and n]
        raise ValueError(f"no {kind.__name__} in the model matches targets {targets}; "
                         f"available names include {names[:8]}")
    return hits


# ---- attach / remove / activate / freeze --------------------------------------------------------------------

def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Attach ``config``'s method under ``name`` (active). On any error the model is left as it was."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig (e.g. BottleneckConfig), got {type(config).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier (letters, digits, _), got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model; existing: {adapter_names(model)}")
    try:
        config.attach(model, name)
        if not adapter_modules(model, name):
            raise RuntimeError(f"{config.method}.attach created no AdapterModule")
    except Exception:
        delete_adapter(model, name, missing_ok=True)
        raise
    for module in adapter_modules(model, name).values():
        module.config = config  # so save_adapter knows the hyperparameters
    return model


def delete_adapter(model: nn.Module, name: str, missing_ok: bool = False) -> None:
    """Remove every module of adapter ``name`` (the ModuleDict entries that hold them)."""
    removed = False
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleDict) and isinstance(module._modules.get(name), AdapterModule):
            module[name].on_delete()
            del module[name]
            removed = True
    if not removed and not missing_ok:
        raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")


def set_active(model: nn.Module, *names: str) -> None:
    """Activate exactly the adapters ``names`` (none: the base model)."""
    unknown = sorted(set(names) - set(adapter_names(model)))
    if unknown:
        raise KeyError(f"no adapter named {unknown}; existing: {adapter_names(model)}")
    for module in adapter_modules(model).values():
        module.active = module.adapter_name in names


def activate(model: nn.Module, name: str) -> None:
    set_active(model, *({m.adapter_name for m in adapter_modules(model).values() if m.active} | {name}))


def deactivate(model: nn.Module, name: str) -> None:
    set_active(model, *({m.adapter_name for m in adapter_modules(model).values() if m.active} - {name}))


def train_adapter(model: nn.Module, name: str, train_norms: bool = False, train_head: bool = True) -> None:
    """Freeze everything except adapter ``name`` (optionally also all LayerNorms, as Houlsby et al. 2019 §2.1
    do, and the task head ``model.head``), and make it the only active adapter."""
    set_active(model, name)
    model.requires_grad_(False)
    for module in adapter_modules(model, name).values():
        module.requires_grad_(True)
    if train_norms:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
    head = getattr(model, "head", None)
    if train_head and isinstance(head, nn.Module):
        head.requires_grad_(True)


# ---- counting -----------------------------------------------------------------------------------------------

@dataclass
class ParameterSummary:
    """Counts for one adapter. ``backbone`` (the denominator of every percent) is the frozen encoder's
    parameters: the model's parameters outside every adapter module and outside the task head."""

    name: str
    backbone: int
    adapter: int
    stored: int
    trainable: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100 * self.adapter / self.backbone

    @property
    def stored_percent(self) -> float:
        return 100 * self.stored / self.backbone

    def __str__(self) -> str:
        rows = [f"adapter {self.name!r}: {self.adapter:,} parameters = {self.percent:.3f}% of the frozen "
                f"backbone ({self.backbone:,}); stored {self.stored:,} ({self.stored_percent:.3f}%); "
                f"trainable now (incl. head/norms if trained) {self.trainable:,}",
                f"{'where':>10} {'parameters':>12}"]
        rows += [f"{where:>10} {count:>12,}" for where, count in self.per_layer.items()]
        return "\n".join(rows)


def parameter_summary(model: nn.Module, name: str) -> ParameterSummary:
    modules = adapter_modules(model, name)
    if not modules:
        raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")
    in_adapters = {id(p) for m in adapter_modules(model).values() for p in m.parameters()}
    head = getattr(model, "head", None)
    in_head = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    backbone = sum(p.numel() for p in model.parameters() if id(p) not in in_adapters | in_head)
    per_layer: dict[str, int] = {}
    seen: set[int] = set()  # a parameter shared by several modules (Compacter's A_i) counts once, where first met
    for path, module in modules.items():
        layer = re.search(r"layers\.(\d+)\.", path)
        key = f"layer {layer.group(1)}" if layer else path.rsplit(".", 1)[0] or path
        fresh = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        per_layer[key] = per_layer.get(key, 0) + sum(p.numel() for p in fresh)
    return ParameterSummary(
        name=name, backbone=backbone, adapter=sum(per_layer.values()),
        stored=sum(m.stored_parameter_count() for m in modules.values()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), per_layer=per_layer)


# ---- saving and loading -------------------------------------------------------------------------------------

def _root(model: nn.Module) -> nn.Module:
    """Paths are saved relative to the encoder when there is one, so classifier and bare encoder agree."""
    try:
        return find_encoder(model)
    except TypeError:
        return model


def _backbone_identity(model: nn.Module) -> dict:
    root = _root(model)
    if isinstance(root, Encoder):
        c = root.cfg
        return {"name": c.name, "model_type": c.model_type, "hidden_size": c.hidden_size, "num_layers": c.num_layers}
    return {"name": type(root).__name__, "hidden_size": None, "num_layers": None}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Path -> tensor of adapter ``name``; a tensor shared by several modules is kept once (first path)."""
    state, seen = {}, set()
    for path, module in adapter_modules(_root(model), name).items():
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                state[f"{path}.{key}"] = tensor.detach()
    return state


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    modules = adapter_modules(model, name)
    if not modules:
        raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")
    return next(iter(modules.values())).config


def save_adapter(model: nn.Module, name: str, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` (this adapter's tensors) and ``adapter_config.json`` (method,
    hyperparameters, backbone identity and hidden size). Never pickle."""
    from safetensors.torch import save_file

    config, state = adapter_config(model, name), adapter_state_dict(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    meta = {"method": config.method, "name": name, "config": config.to_dict(), "backbone": _backbone_identity(model)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> AdapterConfig:
    """Attach a saved adapter (under its saved name unless ``name`` is given) and load its tensors.

    Fails with a clear error, leaving the model untouched, when the backbone's hidden size or depth differs,
    the method is unknown, or the tensors do not fit."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{directory} is not a saved adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    saved, here = meta["backbone"], _backbone_identity(model)
    for key in ("hidden_size", "num_layers"):
        if saved.get(key) is not None and saved[key] != here[key]:
            raise ValueError(f"adapter in {directory} was trained on a backbone with {key}={saved[key]} "
                             f"({saved['name']}); this model has {key}={here[key]} ({here['name']})")
    config = config_from_dict(meta["method"], meta["config"])
    name = name or meta["name"]
    state = load_file(str(directory / WEIGHTS_FILE))
    add_adapter(model, config, name)
    try:
        expected = adapter_state_dict(model, name)
        if set(expected) != set(state) or any(expected[k].shape != state[k].shape for k in state):
            raise ValueError(f"tensors in {directory} do not fit a {meta['method']} adapter on this model "
                             f"(expected {len(expected)} tensors, file has {len(state)}, or shapes differ)")
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor)
    except Exception:
        delete_adapter(model, name)
        raise
    return config


# ---- a site on any module's output (for models minipeft did not write) --------------------------------------

def _output_delta_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """h = module(x); h ← h + Δh for each active attached module (same protocol as a site, no LayerNorm).
    A module may return None: nothing to add (a merged LoRA, whose ΔW is already in the weight)."""
    for delta in module.output_deltas.values():
        if delta.active:
            dh = delta(inputs[0], output, None)
            if dh is not None:
                output = output + dh
    return output


def add_output_delta(target: nn.Module, name: str, delta: AdapterModule) -> None:
    """Make ``target``'s output a site: its output h becomes h + delta(x, h, None), x its first input."""
    if isinstance(target, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"cannot make a {type(target).__name__}'s output a site (a child module would become one "
                        "of its layers); target its last layer instead")
    if not hasattr(target, "output_deltas"):
        target.output_deltas = nn.ModuleDict()
        target.register_forward_hook(_output_delta_hook)
    target.output_deltas[name] = delta


def remove_output_delta(target: nn.Module, name: str) -> None:
    """Detach ``name`` from ``target``'s output site; the last one out removes the site (container and hook)."""
    del target.output_deltas[name]
    if not len(target.output_deltas):
        del target.output_deltas
        for key, hook in list(target._forward_hooks.items()):
            if hook is _output_delta_hook:
                del target._forward_hooks[key]
