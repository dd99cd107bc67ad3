"""The protocol every method follows, and the registry of methods (below ``methods/``, above ``backbones/``).

- A method is a config dataclass (subclass of ``AdapterConfig``, validated in ``__post_init__``, registered with
  ``@register_method``) whose ``attach(model, name)`` creates ``AdapterModule``s inside the model, through the
  backbone contract (``minipeft.backbones.contract``) or on any ``nn.Module`` by name (``add_output_delta``).
- Every ``AdapterModule`` sits in an ``nn.ModuleDict`` under its adapter's name (a site's ``deltas``, the
  backbone's ``prefixes``, a module's ``output_deltas`` or ``input_deltas``), so one model holds several named
  adapters.
- An inactive module contributes nothing: a model with every adapter inactive is exactly the base model.
- An adapter's config is kept once, on the model (``adapter_configs``), never copied onto its modules.
- A method's deployment step is its config's ``deploy(model, name)``: ``api.for_inference`` asks each attached
  adapter's config (a class registered here) for it, and knows no method by name.
- An *example* is a small config of a method that the conformance suite (tests/test_conformance.py) attaches to
  every registered backbone, with its closed-form counts; each method file registers its own (``EXAMPLES``).
- A *recipe* is a method as the course trains it (name, lesson, learning rate, config, size knob): each method
  file registers its own, and ``compare``, the lessons and the parameter explorer read them from ``RECIPES``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, ClassVar

from torch import nn

from .backbones.contract import ROLES, Backbone, add_deltas, find_backbone  # noqa: F401  (re-exports but add_deltas)


class AdapterModule(nn.Module):
    """Base of every module a method adds. ``adapter_name`` ties it to its adapter; ``active`` switches it."""

    def __init__(self, adapter_name: str):
        super().__init__()
        self.adapter_name, self.active = adapter_name, True

    def on_delete(self) -> None:
        """Called by ``delete_adapter`` just before removal: undo what the module changed outside itself
        (a merged LoRA takes its ΔW back out of the base weight). Default: nothing."""

    def not_per_example(self) -> str:
        """Why this module cannot be computed for some examples of a batch only (``per_example``); "" = it can."""
        return ""

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

    def after_ejection(self) -> "AdapterConfig":
        """The config that rebuilds this adapter once its training-only parts are dropped (default: itself)."""
        return self

    def deploy(self, model: nn.Module, name: str) -> None:
        """The deployment step ``api.for_inference`` runs for adapter ``name`` of ``model``: fold in or drop what
        only training needs, keeping the function (LoRA merges, prefix tuning drops its MLP). Default: nothing."""


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


# ---- recipes: a method as the course trains it ------------------------------------------------------------------

@dataclass(frozen=True)
class Knob:
    """The one size a learner turns in the explorer (``name`` = the formula's symbol)."""
    name: str
    sizes: tuple
    default: object

    def __post_init__(self):
        if self.default not in self.sizes:
            raise ValueError(f"default size {self.default!r} must be one of sizes {self.sizes!r}")


@dataclass(frozen=True)
class Recipe:
    """A method as the harness runs it. An adapter recipe gives ``make(size)`` (its config at a knob size) and
    ``knob``; ``api.apply_recipe`` then attaches ``make(knob.default)`` under the recipe's name and trains only it
    and the head. Any other recipe (the baselines, a lesson's variant) gives ``prepare(model)``, which sets up a
    fresh task model itself (attach, ``requires_grad``)."""
    name: str
    lesson: str                                   # "00".."09": where the course teaches it
    lr: float                                     # tuned for Budget.lesson()
    prepare: Callable[[nn.Module], None] | None = None
    config: dict = field(default_factory=dict)    # hyperparameters, recorded in every Result
    description: str = ""
    knob: Knob | None = None
    make: Callable[[object], AdapterConfig] | None = None
    ablation: bool = False                        # a lesson's design-space variant, not one of the compared methods
    not_for_tasks: tuple[str, ...] = ()           # tasks it must not be compared on (fusion: its sources' tasks)
    order: int = 0                                # place among its lesson's recipes (then registration order)

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"method name must be letters, digits, '-' or '_', got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr of {self.name!r} must be > 0, got {self.lr}")
        if (self.prepare is None) == (self.make is None) or (self.make is not None and self.knob is None):
            raise TypeError(f"recipe {self.name!r} needs either prepare(model) or make(size) with a knob")
        if self.prepare is not None and not callable(self.prepare):
            raise TypeError(f"prepare of {self.name!r} must be a function prepare(model) -> None")

    @classmethod
    def adapter(cls, name: str, lesson: str, lr: float, make: Callable[[object], AdapterConfig], knob: Knob,
                description: str = "", ablation: bool = False, order: int = 0) -> "Recipe":
        """The usual recipe: an adapter config at a knob size; its default size's config is recorded."""
        return cls(name, lesson, lr, None, make(knob.default).to_dict(), description, knob, make, ablation,
                   order=order)


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, replace: bool = False) -> Recipe:
    """Add a recipe to ``RECIPES`` (``replace=True`` to overwrite an existing name)."""
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"method {recipe.name!r} is already registered; pass replace=True to overwrite it")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(RECIPES)}")
    return RECIPES[name]


def in_lesson_order(ablations: bool = False) -> list[str]:
    """The registered recipes' names in the order the course teaches them (lesson 06's ablations too if asked): by
    lesson, then ``order``, then registration."""
    ordered = sorted(RECIPES, key=lambda name: (RECIPES[name].lesson, RECIPES[name].order))
    return [n for n in ordered if ablations or not RECIPES[n].ablation]


# ---- examples: a method as the conformance suite tries it on every backbone --------------------------------------

@dataclass(frozen=True)
class Example:
    """A small config of a method that attaches to any registered backbone. ``counts(d, L, w)``: its closed form
    in the backbone's width d, layers L and key/value width w, as (trained, stored), or one number when everything
    trained is stored (None: the method offers none); ``sources``: how many trained, frozen adapters it reads
    (AdapterFusion), which the suite attaches first as s0, s1, ...; ``refuses``: backbone family -> a pattern of the
    ValueError that adding it there raises (BitFit on a model without biases), which the suite checks instead."""
    config: Callable[[], AdapterConfig]
    counts: Callable[[int, int, int], int | tuple[int, int]] | None = None
    sources: int = 0
    refuses: dict[str, str] = field(default_factory=dict)

    def expected_counts(self, backbone: Backbone) -> tuple[int, int] | None:
        """(trained, stored) on ``backbone`` from the closed form, or None."""
        if self.counts is None:
            return None
        n = self.counts(backbone.hidden_size, backbone.num_layers, backbone.attention.kv_width)
        return (n, n) if isinstance(n, int) else n


EXAMPLES: dict[str, dict[str, Example]] = {}


def register_example(method: str, label: str, example: Example) -> None:
    """Add ``example`` under ``label`` to ``EXAMPLES[method]`` (each method file registers its own)."""
    EXAMPLES.setdefault(method, {})[label] = example


# ---- finding things -----------------------------------------------------------------------------------------

def adapter_modules(model: nn.Module, name: str | None = None) -> dict[str, AdapterModule]:
    """Path -> module for every adapter module (of adapter ``name``, or all), outermost only."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, AdapterModule) and (name is None or module.adapter_name == name):
            if not any(path.startswith(p + ".") for p in found):
                found[path] = module
    return found


def regularizers(model: nn.Module) -> list[AdapterModule]:
    """Adapter modules with a ``regularization()`` term for the training loss (AdapterFusion's λ‖I − V‖²_F);
    ``minipeft.lab.train`` adds the terms of the active ones to every step's loss."""
    return [m for m in model.modules() if isinstance(m, AdapterModule) and callable(getattr(m, "regularization", None))]


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Name -> config of every adapter attached to ``model`` or to a module inside it."""
    configs = {}
    for module in model.modules():
        configs.update(module.__dict__.get("adapter_configs", {}))
    return configs


def adapter_names(model: nn.Module) -> list[str]:
    return sorted(set(adapter_configs(model)) | {m.adapter_name for m in adapter_modules(model).values()})


def match_modules(model: nn.Module, targets, kind=nn.Module) -> dict[str, nn.Module]:
    """Modules of type ``kind`` that a target names, outside every adapter module (LoRA on "up" must not land on an
    adapter's own ``up``). On a model holding a minipeft backbone, a target that is a role (``ROLES``: "q", "v",
    "ffn_in", ...) means the linears that play it in every block (Llama's "ffn_in": gate and up); any other target
    matches a module whose name equals it, ends with ``.target``, or fully matches it as a regex. Every target
    must match at least one module (a typo is an error, not a silently smaller adapter)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    inside = tuple(p + "." for p in adapter_modules(model))  # an adapter's own layers are never targets
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, kind) and not isinstance(m, AdapterModule)
                  and not n.startswith(inside)}
    roles = role_players(model)
    hits = {}
    for t in targets:
        if t in roles:
            found = {n: m for n, m in candidates.items() if id(m) in roles[t]}
        else:
            found = {n: m for n, m in candidates.items() if n == t or n.endswith("." + t) or re.fullmatch(t, n)}
        if not found:
            raise ValueError(f"no {kind.__name__} in the model matches target {t!r} (of {targets}); "
                             f"available names include {[n for n in candidates if n][:8]}")
        hits.update(found)
    return dict(sorted(hits.items(), key=lambda item: list(candidates).index(item[0])))


def role_players(model: nn.Module) -> dict[str, set[int]]:
    """Role -> ids of the linears that play it in the blocks of ``model``'s minipeft backbone ({} without one)."""
    try:
        backbone = find_backbone(model)
    except TypeError:
        return {}
    return {role: {id(m) for layer in backbone.layers for site in (layer.attn, layer.ffn) for m in site.role(role)}
            for role in ROLES}


def module_widths(module: nn.Module, hidden_size: int | None = None) -> tuple[int, int]:
    """(input width, output width) of a target: a Linear's in/out features, else the first Linear's input and
    the last Linear's output inside it (an MLP block), else ``hidden_size`` for both."""
    if hidden_size is not None:
        return hidden_size, hidden_size
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"cannot infer the input/output width of {type(module).__name__}; pass hidden_size")
    return linears[0].in_features, linears[-1].out_features


# ---- a site on any module's output (for models minipeft did not write) --------------------------------------

def _output_delta_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """h = module(x); h ← h + Δh for each active attached module (the site protocol, with no closing rule).
    x is the module's first input, positional or by keyword (``transformers`` calls Llama's ``self_attn`` with
    ``hidden_states=...``); when the module returns a tuple (``transformers`` attention blocks return
    ``(h, attention weights)``), h is its first element and the rest passes through unchanged.
    A module may return None: nothing to add (a merged LoRA, whose ΔW is already in the weight)."""
    x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
    h = output[0] if isinstance(output, tuple) else output
    h = add_deltas(module.output_deltas, h,
                   lambda d, h, rows: d(x, h, None) if rows is None else d(x[rows], h[rows], None))
    return (h, *output[1:]) if isinstance(output, tuple) else h


def add_output_delta(target: nn.Module, name: str, delta: AdapterModule) -> None:
    """Make ``target``'s output a site: its output h becomes h + delta(x, h, None), x its first input."""
    _add_to_site(target, "output_deltas", _output_delta_hook, name, delta)


def remove_output_delta(target: nn.Module, name: str) -> None:
    """Detach ``name`` from ``target``'s output site; the last one out removes the site (container and hook)."""
    _remove_from_site(target, "output_deltas", _output_delta_hook, name)


def _add_to_site(target: nn.Module, container: str, hook, name: str, delta: AdapterModule) -> None:
    """Put ``delta`` in ``target.<container>`` (output_deltas: a forward hook; input_deltas: a pre-hook), making
    the site on first use."""
    side = "output" if container == "output_deltas" else "input"
    if isinstance(target, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f"cannot make a {type(target).__name__}'s {side} a site (a child module would become one "
                        f"of its layers); target its {'last' if side == 'output' else 'first'} layer instead")
    if not hasattr(target, container):
        setattr(target, container, nn.ModuleDict())
        register = target.register_forward_hook if side == "output" else target.register_forward_pre_hook
        register(hook, with_kwargs=True)
    getattr(target, container)[name] = delta


def _remove_from_site(target: nn.Module, container: str, hook, name: str) -> None:
    """Take ``name`` out of ``target.<container>``; the last one out removes the site (container and hook)."""
    del getattr(target, container)[name]
    if len(getattr(target, container)):
        return
    delattr(target, container)
    pre = "_pre" if container == "input_deltas" else ""
    hooks = getattr(target, f"_forward{pre}_hooks")
    for key, registered in list(hooks.items()):
        if registered is hook:
            del hooks[key]
            getattr(target, f"_forward{pre}_hooks_with_kwargs").pop(key, None)
            getattr(target, "_forward_hooks_always_called").pop(key, None)


# ---- a site on any module's input (a method that rescales what a Linear reads: IA³'s l_ff) ----------------------

def _input_delta_hook(module: nn.Module, args: tuple, kwargs: dict):
    """x ← x + Δx for each active attached module, before ``module`` runs on x, its first input (positional or the
    first keyword); the other inputs pass unchanged. Each attached module is called as ``delta(x)`` and returns
    Δx (None: nothing to add). Inside ``per_example``, a module changes the rows routed to its adapter only."""
    if args:
        x, rest, key = args[0], args[1:], None
    else:
        key = next(iter(kwargs))
        x = kwargs[key]
    x = add_deltas(module.input_deltas, x, lambda d, x, rows: d(x if rows is None else x[rows]))
    return ((x, *rest), kwargs) if key is None else (args, {**kwargs, key: x})


def add_input_delta(target: nn.Module, name: str, delta: AdapterModule) -> None:
    """Make ``target``'s input a site: it reads x + delta(x) in place of x (a forward pre-hook), x its first
    input. The input-side twin of ``add_output_delta``: a method that rescales what a Linear reads (IA³'s
    l_ff ⊙ x = x + (l_ff − 1) ⊙ x) is a Δx here, so it can be switched off, deleted or routed per example."""
    _add_to_site(target, "input_deltas", _input_delta_hook, name, delta)


def remove_input_delta(target: nn.Module, name: str) -> None:
    """Detach ``name`` from ``target``'s input site; the last one out removes the site (container and pre-hook)."""
    _remove_from_site(target, "input_deltas", _input_delta_hook, name)
