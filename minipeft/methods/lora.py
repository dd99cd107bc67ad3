"""LoRA: a trainable low-rank update next to a frozen linear layer (Hu et al. 2021), with exact merging.

    h = W0 x + ΔW x,   ΔW = (α/r) B A,   A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, r ≪ min(d_in, d_out)
                                                                          Hu et al. 2021, §4.1, Eq. 3
A starts random (Kaiming-uniform as in loralib/peft, or Gaussian as in the paper), B = 0, so ΔW = 0 and the
model starts exactly as the pretrained one. The scale α/r keeps the effective step size roughly constant
when r changes (§4.1: "tuning α is roughly the same as tuning the learning rate"); rsLoRA's α/√r
(Kalajdzievski 2023, Eq. 6) is the switch ``rslora=True``.

ΔW is linear in x, so it folds into the weight: ``merge()`` sets W = W0 + (α/r)BA (no extra latency,
Hu et al. §4.1 and Table 1), ``unmerge()`` subtracts it again.

Placement: on each ``nn.Linear`` that ``targets`` name (``core.match_modules``): roles on a minipeft backbone
(``q``, ``v``: the query and value projections of every backbone; ``ffn_in`` is Llama's gate and up), else names,
``.suffix`` or regex on any nn.Module (``query``, ``value`` on a ``transformers`` BertModel), the update is a
parallel Δh on the layer's output (``api.add_output_delta``), so the Linear and its state-dict names stay.
Parameters per target: r·d_in + d_out·r = r(d_in + d_out); in all L · |targets| · r(d_in + d_out) when every
target of the L layers has the same shape (BERT-base, r=8 on W_q, W_v: 294,912; Hu et al. §5.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, adapter_modules, adapter_names,
                    add_output_delta, match_modules, register_example, register_method, register_recipe,
                    remove_output_delta)

INITS = ("kaiming", "gaussian")


@register_method
@dataclass
class LoRAConfig(AdapterConfig):
    """r: rank; alpha: α of the scale α/r (α/√r with ``rslora``); dropout on the LoRA input x;
    targets: roles (``ROLES``) or Linear names/suffixes/regexes; init of A: "kaiming" (uniform, a=√5, as loralib/peft) or
    "gaussian" (N(0, 1/r²), the paper's "random Gaussian", std as peft's)."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r (the rank) must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a number > 0 (the scale is alpha/r), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; allowed: {INITS}")
        self.targets = [self.targets] if isinstance(self.targets, str) else list(self.targets or [])
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"targets must be a non-empty list of module names, e.g. ['q', 'v'] on minipeft's "
                             f"Encoder or ['query', 'value'] on a transformers BertModel; got {self.targets!r}")

    @property
    def scale(self) -> float:
        """α/r (Hu et al. 2021, §4.1), or α/√r with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def attach(self, model: nn.Module, name: str) -> None:
        for linear in match_modules(model, self.targets, nn.Linear).values():
            add_output_delta(linear, name, LoRALinear(name, linear, self))

    def deploy(self, model: nn.Module, name: str) -> None:
        fold_and_unload(model, name)


class LoRALinear(AdapterModule):
    """The LoRA of one adapter on one ``nn.Linear``: returns Δh = (α/r) B A dropout(x); merges into it.

    It does not replace the Linear (as loralib's ``lora.Linear`` does): it sits in the Linear's
    ``output_deltas`` and adds Δh to its output. That keeps the base weight's name and place (a checkpoint
    still loads), works on any model, and lets several adapters share one Linear. It keeps a plain
    (unregistered) reference to that Linear, ``base_layer``, to fold ΔW into its weight.
    """

    def __init__(self, adapter_name: str, base_layer: nn.Linear, config: LoRAConfig):
        self.merged = False
        super().__init__(adapter_name)
        self.__dict__["base_layer"] = base_layer  # not a submodule: its weights stay the backbone's
        w = base_layer.weight
        self.r, self.scale = config.r, config.scale
        self.A = nn.Parameter(torch.empty(config.r, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.B = nn.Parameter(torch.zeros(base_layer.out_features, config.r, device=w.device, dtype=w.dtype))
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.A, std=1 / config.r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def active(self) -> bool:
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        """Deactivating a merged LoRA unmerges it first, so an inactive adapter is exactly the base model."""
        if not value and self.merged:
            self.unmerge()
        self._active = bool(value)

    def forward(self, x, h=None, norm=None):
        if self.merged:  # ΔW is already inside base_layer.weight: nothing to add
            if self.training and torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad):
                raise RuntimeError(f"LoRA {self.adapter_name!r} is merged into its layer's weight and cannot be "
                                   "trained (its A, B would drift from the merged ΔW); call unmerge() first, "
                                   "or model.eval() / torch.no_grad() for inference")
            return None
        # Δh = (α/r) B (A x)   (Hu et al. 2021, Eq. 3); the scale is applied on the r-wide intermediate
        return F.linear(F.linear(self.dropout(x), self.A) * self.scale, self.B)  # (..., d_out)

    def not_per_example(self) -> str:
        return "is merged into its layer's weight, which every example shares: unmerge it first" if self.merged else ""

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) B A, shaped like the base weight (d_out, d_in)."""
        return self.scale * (self.B @ self.A)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + (α/r) B A (Hu et al. 2021, §4.1); then Δh is skipped."""
        if self.merged:
            raise RuntimeError(f"LoRA {self.adapter_name!r} is already merged into this layer; merging again "
                               "would add ΔW twice. Weights left unchanged.")
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − (α/r) B A: back to W0 (up to fp32 rounding, ~1e-7 relative)."""
        if not self.merged:
            raise RuntimeError(f"LoRA {self.adapter_name!r} is not merged into this layer, so there is nothing "
                               "to unmerge. Weights left unchanged.")
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def on_delete(self) -> None:
        """Deleting a merged LoRA takes its ΔW out of the base weight first."""
        if self.merged:
            self.unmerge()

    def extra_repr(self) -> str:
        b = self.base_layer
        return f"r={self.r}, scale={self.scale:g}, {b.in_features}->{b.out_features}, merged={self.merged}"


# ---- whole-model merging ---------------------------------------------------------------------------------------

def lora_layers(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    """Path -> LoRALinear of adapter ``name``; a clear error if it is not a LoRA adapter of this model."""
    layers = {p: m for p, m in adapter_modules(model, name).items() if isinstance(m, LoRALinear)}
    if not layers:
        raise KeyError(f"no LoRA adapter named {name!r}; adapters in this model: {adapter_names(model)}")
    return layers


def merge_adapter(model: nn.Module, name: str) -> None:
    """Merge every layer of LoRA adapter ``name``; if any is already merged, raise and change nothing."""
    layers = lora_layers(model, name)
    done = [p for p, m in layers.items() if m.merged]
    if done:
        raise RuntimeError(f"LoRA {name!r} is already merged (e.g. {done[0]}); weights left unchanged")
    inactive = [p for p, m in layers.items() if not m.active]
    if inactive:  # folding ΔW into W0 would change the output of a model that reads the adapter as off
        raise RuntimeError(f"LoRA {name!r} is inactive (e.g. {inactive[0]}): activate it before merging; "
                           "weights left unchanged")
    for m in layers.values():
        m.merge()


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Unmerge every layer of LoRA adapter ``name``; if any is not merged, raise and change nothing."""
    layers = lora_layers(model, name)
    todo = [p for p, m in layers.items() if not m.merged]
    if todo:
        raise RuntimeError(f"LoRA {name!r} is not merged (e.g. {todo[0]}); weights left unchanged")
    for m in layers.values():
        m.unmerge()


def merge_and_unload(model: nn.Module, *names: str) -> nn.Module:
    """Fold LoRA adapters ``names`` (default: every active LoRA) into the weights and remove every LoRA module,
    its output-delta container and hook once empty: a plain model again (other methods' modules stay)."""
    every = {p: m for p, m in adapter_modules(model).items() if isinstance(m, LoRALinear)}
    if names:
        for name in names:
            lora_layers(model, name)  # unknown name: error before any change
    else:
        names = tuple({m.adapter_name for m in every.values() if m.active})
    for m in every.values():
        if m.adapter_name in names and not m.merged:
            m.merge()
    for m in every.values():
        m.merged = False  # its ΔW now belongs to the weight
        remove_output_delta(m.base_layer, m.adapter_name)
    return model


def fold_and_unload(model: nn.Module, name: str) -> None:
    """LoRA's deployment step (``api.for_inference``): if adapter ``name`` is active, W = W0 + (α/r)BA in each of
    its layers (Hu et al. 2021, §4.1) and its modules go (plain Linears again); inactive, it is left as it is (it
    adds nothing and can still be activated). Layers behind a UniPELT gate are not folded (the gate depends on x)."""
    for m in adapter_modules(model, name).values():
        if isinstance(m, LoRALinear) and m.active:
            if not m.merged:
                m.merge()
            m.merged = False  # its ΔW now belongs to the weight
            remove_output_delta(m.base_layer, name)


# ---- counting --------------------------------------------------------------------------------------------------

def lora_count(r: int, d_in: int, d_out: int, n_targets: int = 1, num_layers: int = 1) -> int:
    """L · |targets| · r(d_in + d_out): A is r×d_in, B is d_out×r (Hu et al. 2021, §4.1)."""
    return num_layers * n_targets * r * (d_in + d_out)


def encoder_linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each Linear of minipeft's Encoder blocks."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}


def lora_count_encoder(cfg, r: int, targets=("q", "v")) -> int:
    """Σ over targets of L · r(d_in + d_out) on minipeft's Encoder (targets from ``encoder_linear_shapes``)."""
    shapes = encoder_linear_shapes(cfg)
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise ValueError(f"unknown targets {unknown}; the Encoder's Linears are {sorted(shapes)}")
    return sum(lora_count(r, *shapes[t], num_layers=cfg.num_layers) for t in targets)


register_recipe(Recipe.adapter(
    "lora", lesson="02", lr=2e-3, make=lambda r: LoRAConfig(r=r, alpha=2 * r, targets=["q", "v"]),
    knob=Knob("rank r", (1, 2, 4, 8, 16, 32, 64), 8),
    description="LoRA r=8, alpha=16 on W_q, W_v (0.33% of MiniLM; Hu et al. 2021): L·2·r(d + d), mergeable"))

def lora_qv_count(d: int, L: int, w: int, r: int) -> int:
    """LoRA on the query and value roles of any backbone: L·r(d + d) + L·r(d + w), w the key/value width."""
    return lora_count(r, d, d, num_layers=L) + lora_count(r, d, w, num_layers=L)


# the conformance suite's example (tests/test_conformance.py: every method on every backbone)
register_example("lora", "lora", Example(lambda: LoRAConfig(r=4), lambda d, L, w: lora_qv_count(d, L, w, 4)))
