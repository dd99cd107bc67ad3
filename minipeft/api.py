"""The user-facing verbs: add / delete / activate / train / count / save / load adapters by name.

They work on any model through ``minipeft.core`` (the protocol and registry) and the backbone contract; importing
this module imports every method (``minipeft.methods``), so ``load_adapter`` can rebuild any saved adapter.
Every verb that fails leaves the model exactly as it was (modules, hooks, weights, flags).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import methods  # noqa: F401  (registers every method)
from .backbones.contract import Backbone, find_backbone
from .core import (METHODS, AdapterConfig, AdapterModule, Recipe, adapter_configs, adapter_modules,  # noqa: F401
                   adapter_names, add_input_delta, add_output_delta, config_from_dict, match_modules,
                   register_method, remove_input_delta,
                   remove_output_delta)  # the protocol, re-exported: ``from minipeft.api import AdapterModule``

# minipeft's own format; peft's files (adapter_config.json, adapter_model.safetensors) are written by
# ``minipeft.interop.export_peft``. Directories written before the rename used the legacy names below.
CONFIG_FILE, WEIGHTS_FILE = "minipeft_adapter.json", "minipeft_adapter.safetensors"
LEGACY_CONFIG_FILE, LEGACY_WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


def _home(model: nn.Module) -> nn.Module:
    """The backbone when there is one, else the model: where adapter configs are kept and what saved paths are
    relative to, so a task model and its backbone agree."""
    try:
        return find_backbone(model)
    except TypeError:
        return model


# ---- attach / remove / activate / freeze --------------------------------------------------------------------

def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Attach ``config``'s method under ``name`` (active; each new module takes its parent's train/eval mode).
    On any error the model is left as it was."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig (e.g. BottleneckConfig), got {type(config).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be a Python identifier (letters, digits, _), got {name!r}")
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists in this model; existing: {adapter_names(model)}")
    home, existing = _home(model), {id(m) for m in model.modules()}
    try:
        config.attach(model, name)
        if not adapter_modules(model, name):
            raise RuntimeError(f"{config.method}.attach created no AdapterModule")
    except Exception:
        _remove_modules(model, name)
        raise
    _take_parents_mode(model, existing)
    home.__dict__.setdefault("adapter_configs", {})[name] = config  # kept once, on the model
    return model


def _take_parents_mode(model: nn.Module, existing: set[int]) -> None:
    """Each module not in ``existing`` (ids) takes its parent's train/eval mode, as if it had been there when
    ``model.train()`` / ``model.eval()`` ran. (PyTorch leaves a module added later in training mode: a new LoRA's
    dropout would stay on in an ``eval()`` model, and two forwards of it would differ.)"""
    mode = {"": model.training}
    for path, module in model.named_modules():  # parents come before their children
        if path and id(module) not in existing:
            module.training = mode[path.rpartition(".")[0]]
        mode[path] = module.training


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: its modules (each undoes what it changed outside itself first), the containers
    and hooks that only it needed, and its config. The model is then as if it had never been added."""
    _check_names(model, [name])
    readers = fusions_reading(model, name)
    if readers:
        raise ValueError(f"adapter {name!r} is a source of AdapterFusion {', '.join(map(repr, readers))}, which "
                         f"calls it at every forward: delete the fusion first (delete_adapter(model, {readers[0]!r})), "
                         f"then {name!r}. Nothing was deleted")
    _remove_modules(model, name)
    for module in model.modules():
        module.__dict__.get("adapter_configs", {}).pop(name, None)


def _remove_modules(model: nn.Module, name: str) -> None:
    """Delete every module of adapter ``name`` from the ModuleDict that holds it; an emptied output site goes too."""
    for path, module in adapter_modules(model, name).items():
        module.on_delete()
        parent_path, _, key = path.rpartition(".")
        container = model.get_submodule(parent_path)
        owner_path, _, container_name = parent_path.rpartition(".")
        if container_name == "output_deltas":
            remove_output_delta(model.get_submodule(owner_path), key)
        elif container_name == "input_deltas":
            remove_input_delta(model.get_submodule(owner_path), key)
        else:
            del container[key]


def fusions_reading(model: nn.Module, name: str) -> list[str]:
    """The AdapterFusions over adapter ``name`` (each calls its sources' modules at every forward)."""
    from .methods.fusion import FusionConfig

    return sorted(f for f, c in adapter_configs(model).items() if isinstance(c, FusionConfig) and name in c.adapters)


def _check_names(model: nn.Module, names) -> None:
    """Raise unless every name is a string naming an adapter of ``model``, each once: a typo is an error, never a
    silent no-op. Called by every verb that takes names, before it changes anything."""
    wrong = [n for n in names if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"adapter names are strings, one per argument (set_active(model, 'a', 'b')); got "
                        f"{type(wrong[0]).__name__} {wrong[0]!r}")
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"adapter names {twice} are given more than once; name each adapter once")
    unknown = [n for n in names if n not in adapter_names(model)]
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r}{f' (nor {unknown[1:]})' if unknown[1:] else ''}; "
                       f"existing: {adapter_names(model)}")


def _active_names(model: nn.Module) -> set[str]:
    return {m.adapter_name for m in adapter_modules(model).values() if m.active}


def set_active(model: nn.Module, *names: str) -> None:
    """Activate exactly the adapters ``names`` (none: the base model)."""
    _check_names(model, names)
    for module in adapter_modules(model).values():
        module.active = module.adapter_name in names


def activate(model: nn.Module, name: str) -> None:
    """Add adapter ``name`` to the active ones (already active: nothing changes)."""
    set_active(model, *(_active_names(model) | {name}))


def deactivate(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` out of the active ones (already inactive: nothing changes)."""
    _check_names(model, [name])
    set_active(model, *(_active_names(model) - {name}))


def train_adapter(model: nn.Module, name: str, train_norms: bool = False, train_head: bool = True) -> None:
    """Freeze everything except adapter ``name`` (optionally also all LayerNorms / RMSNorms, as Houlsby et al.
    2019 §2.1 do, and the task head ``model.head``), and make it the only active adapter."""
    set_active(model, name)
    model.requires_grad_(False)
    for module in adapter_modules(model, name).values():
        module.requires_grad_(True)
    if train_norms:
        for module in model.modules():
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.requires_grad_(True)
    head = getattr(model, "head", None)
    if train_head and isinstance(head, nn.Module):
        head.requires_grad_(True)


def apply_recipe(model: nn.Module, recipe: Recipe, size=None) -> nn.Module:
    """Set up a fresh task model as ``recipe`` says: its ``prepare``, or its adapter at ``size`` (default: the
    knob's) attached under the recipe's name, the only adapter that trains (with the head)."""
    if recipe.prepare is not None:
        recipe.prepare(model)
        return model
    add_adapter(model, recipe.make(recipe.knob.default if size is None else size), recipe.name)
    train_adapter(model, recipe.name)
    return model


def for_inference(model: nn.Module) -> nn.Module:
    """Deploy: every adapter's own deployment step (``AdapterConfig.deploy``: an active LoRA folds into its weight,
    W = W0 + (α/r)BA, Hu et al. 2021 §4.1; a prefix drops its reparameterisation MLP, Li & Liang 2021 §4.3; the
    others keep their modules); eval mode. Returns ``model`` (changed in place). What is left of the adapters
    afterwards is what inference pays for (``adapter_modules(model)``)."""
    for name, config in adapter_configs(model).items():
        config.deploy(model, name)
    return model.eval()


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
    per_part: dict[str, tuple[int, int]] = field(default_factory=dict)  # composite adapters: (adapter, stored)

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
        rows += [f"part {part!r}: {n:,} parameters, stored {s:,}" for part, (n, s) in self.per_part.items()]
        return "\n".join(rows)


def parameter_summary(model: nn.Module, name: str) -> ParameterSummary:
    modules = adapter_modules(model, name)
    if not modules:
        raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")
    in_adapters = {id(p) for m in adapter_modules(model).values() for p in m.parameters()}
    head = getattr(model, "head", None)
    in_head = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    backbone = sum(p.numel() for p in model.parameters() if id(p) not in in_adapters | in_head)
    # weights held in 4 bits (minipeft.quant.Linear4bit) are buffers, yet parameters of the backbone
    backbone += sum(m.quantized_numel() for m in model.modules() if callable(getattr(m, "quantized_numel", None)))
    per_layer: dict[str, int] = {}
    seen: set[int] = set()  # a parameter shared by several modules (Compacter's A_i) counts once, where first met
    for path, module in modules.items():
        layer = re.search(r"layers\.(\d+)\.", path)
        key = f"layer {layer.group(1)}" if layer else path.rsplit(".", 1)[0] or path
        fresh = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in fresh)
        per_layer[key] = per_layer.get(key, 0) + sum(p.numel() for p in fresh)
    parts: dict[str, list[nn.Module]] = {}
    for module in modules.values():
        if hasattr(module, "adapter_part"):
            parts.setdefault(module.adapter_part, []).append(module)
    per_part = {part: (sum({id(p): p.numel() for m in ms for p in m.parameters()}.values()), stored_count(ms))
                for part, ms in parts.items()}
    return ParameterSummary(
        name=name, backbone=backbone, adapter=sum(per_layer.values()), stored=stored_count(modules.values()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad), per_layer=per_layer,
        per_part=per_part)


def stored_count(modules) -> int:
    """Parameters one must store per task for inference, in a model or in a list of adapter modules.

    A module that defines ``stored_parameter_count()`` (an adapter: e.g. a prefix whose reparameterisation MLP is
    dropped after training, Li & Liang 2021 §4.3) reports its own number and the parameters inside it are not
    counted again; any other parameter counts when it trains. A tensor shared by several modules (Compacter's
    shared A_i) counts once. A model passed whole is walked, never asked for its own count."""
    seen: set[int] = set()

    def visit(m: nn.Module, reports: bool = True) -> int:
        if reports and callable(getattr(m, "stored_parameter_count", None)):
            params = list(m.parameters())
            shared = sum(p.numel() for p in params if id(p) in seen)
            seen.update(id(p) for p in params)
            return max(0, int(m.stored_parameter_count()) - shared)
        own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in own)
        return sum(p.numel() for p in own) + sum(visit(c) for c in m.children())

    if isinstance(modules, nn.Module):
        return visit(modules, reports=False)
    return sum(visit(m) for m in modules)


# ---- saving and loading -------------------------------------------------------------------------------------

def _backbone_identity(model: nn.Module) -> dict:
    root = _home(model)
    if isinstance(root, Backbone):
        return root.identity()
    return {"family": None, "name": type(root).__name__, "hidden_size": None, "num_layers": None}


def adapter_state_dict(model: nn.Module, name: str, saved_as: str | None = None) -> dict[str, torch.Tensor]:
    """Path -> tensor of adapter ``name``; a tensor shared by several modules is kept once (first path).
    Each module's path ends with the adapter's name (its ModuleDict key); ``saved_as`` writes another there."""
    state, seen = {}, set()
    for path, module in adapter_modules(_home(model), name).items():
        path = path[: len(path) - len(name)] + (saved_as or name)
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                state[f"{path}.{key}"] = tensor.detach()
    return state


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    configs = adapter_configs(model)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")
    return configs[name]


def save_adapter(model: nn.Module, name: str, directory: str | Path) -> Path:
    """Write ``minipeft_adapter.safetensors`` (this adapter's tensors) and ``minipeft_adapter.json`` (method,
    hyperparameters, backbone identity and hidden size). Never pickle. (peft's format: ``interop.export_peft``.)"""
    from safetensors.torch import save_file

    config, state = adapter_config(model, name), adapter_state_dict(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    meta = {"method": config.method, "name": name, "config": config.to_dict(), "backbone": _backbone_identity(model)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def saved_files(directory: Path) -> tuple[Path, Path]:
    """(config, weights) of a minipeft adapter directory: today's names, else the legacy ones (a directory saved
    before the rename: ``adapter_config.json`` holding minipeft's schema + ``adapter.safetensors``)."""
    for config_name, weights_name in ((CONFIG_FILE, WEIGHTS_FILE), (LEGACY_CONFIG_FILE, LEGACY_WEIGHTS_FILE)):
        config_file, weights_file = directory / config_name, directory / weights_name
        if config_file.is_file() and weights_file.is_file():
            return config_file, weights_file
    hint = ""
    if (directory / "adapter_model.safetensors").is_file():
        hint = " (it holds a peft adapter: load it with minipeft.interop.import_peft)"
    raise FileNotFoundError(f"{directory} is not a saved adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE}{hint}")


RECORD_TYPES = {"method": str, "name": str, "config": dict, "backbone": dict}  # what save_adapter writes


def read_saved_adapter(directory: str | Path) -> tuple[dict, AdapterConfig, dict[str, torch.Tensor]]:
    """The config record, the config it describes and the tensors of a saved adapter, or an error naming the file
    and what is wrong."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = saved_files(directory)
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); it should be what save_adapter wrote") from None
    missing = [k for k in RECORD_TYPES if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{config_file} lacks {missing}; a saved adapter's config has method, name, config "
                         "and backbone")
    wrong = [f"{k} is a {type(meta[k]).__name__}" for k, kind in RECORD_TYPES.items() if not isinstance(meta[k], kind)]
    if not wrong and not meta["name"].isidentifier():
        wrong = [f"name {meta['name']!r} is not an identifier"]
    if wrong:
        raise ValueError(f"{config_file}: {'; '.join(wrong)}; a saved adapter's config has method (a string), name "
                         "(an identifier), config and backbone (objects)")
    try:
        config = config_from_dict(meta["method"], meta["config"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_file} does not describe a valid adapter: {e}") from None
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e}); "
                         "it may be truncated or corrupt: save the adapter again") from None
    return meta, config, state


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> AdapterConfig:
    """Attach a saved adapter (under its saved name unless ``name`` is given) and load its tensors.

    Fails with a clear error, leaving the model untouched, when a file is missing or unreadable, the backbone
    differs (family, hidden size, depth, key/value width), the method is unknown, or a tensor does not fit."""
    meta, config, state = read_saved_adapter(directory)
    saved, here = meta["backbone"], _backbone_identity(model)
    for key in ("family", "hidden_size", "num_layers", "kv_width"):
        if saved.get(key) is not None and here.get(key) is not None and saved[key] != here[key]:
            raise ValueError(f"adapter in {directory} was trained on a backbone with {key}={saved[key]} "
                             f"({saved.get('name')}); this model has {key}={here[key]} ({here['name']})")
    name = name or meta["name"]
    try:
        add_adapter(model, config, name)
    except (ValueError, TypeError) as e:  # e.g. its targets are not in this model, or the name is taken
        raise type(e)(f"cannot load the adapter in {directory} into this model: {e}") from None
    try:
        expected = adapter_state_dict(model, name, saved_as=meta["name"])
        problems = [f"missing {k}" for k in sorted(set(expected) - set(state))]
        problems += [f"unexpected {k}" for k in sorted(set(state) - set(expected))]
        problems += [f"{k}: file has shape {tuple(state[k].shape)}, this model needs {tuple(expected[k].shape)}"
                     for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
        if problems:
            raise ValueError(f"tensors in {saved_files(Path(directory))[1]} do not fit a {meta['method']} adapter "
                             f"on this model ({len(problems)} problems): " + "; ".join(problems[:5]))
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor)
    except Exception:
        delete_adapter(model, name)
        raise
    return config
