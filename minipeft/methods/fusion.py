"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning").

Stage 1 trains one Pfeiffer adapter per source task (``BottleneckConfig(placement="pfeiffer")``); stage 2 freezes
them and learns, in every layer l, an attention over their outputs (§3, Fig. 2; per token t, adapters n = 1..N):

    u     = close(h)                              the FFN block's output before any adapter: LN(x + h) on BERT
    z_n   = A_n(u)                                adapter n's output Δh_n (its up-projection, no residual)
    s     = softmax_n( (u Q + b_Q) · (z_n K + b_K) )          s_{l,t} = softmax(h_{l,t}ᵀ Q_l ⊗ z_{l,t,n}ᵀ K_l)
    o     = Σ_n s_n z_n V                                     z′ = zᵀ V,  o_{l,t} = s_{l,t}ᵀ Z′_{l,t}
    out   = close(h + o) = LN(x + h + o)                      the site adds o as its Δh

The reference implementation (AdapterHub ``BertFusion``, its default "dynamic" config, checked against its source)
places it exactly so: query = the sublayer's closed output (``query_before_ln=False``), keys = values = each adapter's
up-projection, V applied before the weighting (``value_before_softmax``; the same thing: V is linear without bias),
the residual h added after (``residual_before=False``), dropout on the scores (the model's attention dropout).
Initialisation as there: Q, K ~ N(0, 0.02) with zero biases (BERT's), V = I with 1e-6 off the diagonal. Training
adds λ Σ_l ‖I − V_l‖²_F (λ = 0.01) to the loss (§3; AdapterHub ``get_fusion_regularization_loss``), which keeps V
near the identity; ``minipeft.lab.train`` adds every active module's ``regularization()``. The paper trains fusion
with lr 5e-5 (``PAPER_LR``; §4).

Parameters per layer: Q and K (d² + d each) and V (d², no bias): L(3d² + 2d), independent of N; on BERT-base
21,252,096 (19.4% of the model): far more than the adapters it fuses. b_K adds q·b_K to every score of a token
alike, so softmax ignores it (its gradient is 0 up to rounding); it is counted because the reference has it.

The sources stay where they were (their own names, frozen, inactive: the fusion calls them); the fusion owns only
Q, K, V per layer, so it trains, counts, saves and loads alone; loading it needs its sources attached first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, adapter_configs, adapter_modules, adapter_names,
                    find_backbone, register_example, register_method)
from .bottleneck import Bottleneck, BottleneckConfig

PAPER_LR = 5e-5                        # the fusion parameters' learning rate in Pfeiffer et al. 2021, §4
FUSABLE_PLACEMENTS = ("pfeiffer", "ffn")  # bottleneck adapters with one module per layer at the FFN site


@register_method
@dataclass
class FusionConfig(AdapterConfig):
    """``adapters``: the names of ≥ 2 trained, frozen bottleneck adapters at the FFN site of this model.
    ``dropout`` on the attention scores; ``init_std`` of Q, K; ``value_offdiag``: V = I + this off the diagonal;
    ``regularization``: λ of λ Σ_l ‖I − V_l‖²_F."""

    method = "fusion"
    adapters: list[str] = field(default_factory=list)
    dropout: float = 0.1
    init_std: float = 0.02
    value_offdiag: float = 1e-6
    regularization: float = 0.01

    def __post_init__(self):
        if isinstance(self.adapters, str) or not all(isinstance(n, str) for n in self.adapters):
            raise ValueError(f"adapters must be a list of adapter names, got {self.adapters!r}")
        self.adapters = list(self.adapters)
        if len(self.adapters) < 2:
            raise ValueError(f"AdapterFusion combines at least 2 adapters, got {self.adapters}; with one adapter, "
                             "use it directly (set_active(model, name))")
        if len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters must be distinct names, got {self.adapters}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.init_std > 0 or not math.isfinite(self.value_offdiag) or not self.regularization >= 0:
            raise ValueError("need init_std > 0, a finite value_offdiag and regularization >= 0, got "
                             f"{self.init_std}, {self.value_offdiag}, {self.regularization}")

    def attach(self, model: nn.Module, name: str) -> None:
        backbone = find_backbone(model)
        check_sources(model, self.adapters)  # every check before any change: a bad fusion leaves the model as it was
        ref = next(backbone.parameters())
        for site in backbone.sites("ffn"):
            layer = FusionLayer(name, site, backbone.hidden_size, self).to(ref.device, ref.dtype)
            site.deltas[name] = layer.train(site.training)  # eval model: no score dropout
        for source in self.adapters:  # the fusion calls them; active on their own they would add Δh twice
            for module in adapter_modules(model, source).values():
                module.active = False


def check_sources(model: nn.Module, names: list[str]) -> None:
    """Raise, naming what is wrong and what is allowed, unless every name is a frozen bottleneck adapter with one
    module of this backbone's width at every layer's FFN site."""
    backbone, configs, existing = find_backbone(model), adapter_configs(model), adapter_names(model)
    d, where = backbone.hidden_size, f"this backbone ({backbone.cfg.name}, hidden size {backbone.hidden_size})"
    missing = [n for n in names if n not in existing]
    if missing:
        raise ValueError(f"no adapter named {missing} in this model; existing adapters: {existing}. AdapterFusion "
                         "fuses adapters already added (and trained) under those names")
    for n in names:
        config = configs.get(n)
        if not isinstance(config, BottleneckConfig) or config.placement not in FUSABLE_PLACEMENTS:
            kind = getattr(config, "method", "unknown") + (f"/{config.placement}" if hasattr(config, "placement")
                                                           else "")
            raise ValueError(f"adapter {n!r} is a {kind} adapter; AdapterFusion fuses bottleneck adapters at the FFN "
                             f"site: BottleneckConfig(placement='pfeiffer') (the paper's) or placement='ffn'")
        sites = backbone.sites("ffn")
        absent = [i for i, site in enumerate(sites) if not isinstance(site.deltas[n] if n in site.deltas else None,
                                                                       Bottleneck)]
        if absent:
            raise ValueError(f"adapter {n!r} is not on every FFN site of {where}: missing at layers {absent}")
        widths = {(i, s.deltas[n].down.in_features, s.deltas[n].up.out_features) for i, s in enumerate(sites)}
        wrong = sorted(w for w in widths if w[1:] != (d, d))
        if wrong:
            raise ValueError(f"adapter {n!r} reads/writes width {wrong[0][1]}/{wrong[0][2]} at layer {wrong[0][0]}, "
                             f"but {where} needs {d}: adapters of another backbone or hidden size cannot be fused")
    trainable = [n for n in names if any(p.requires_grad for m in adapter_modules(model, n).values()
                                         for p in m.parameters())]
    if trainable:
        raise ValueError(f"adapters {trainable} still have trainable parameters; AdapterFusion learns only the "
                         "fusion over frozen adapters (Pfeiffer et al. 2021, §3): freeze them first with "
                         f"freeze_adapters(model, {', '.join(map(repr, trainable))}) (minipeft.methods.fusion)")


def freeze_adapters(model: nn.Module, *names: str) -> None:
    """``requires_grad = False`` on every parameter of the named adapters."""
    for name in names:
        modules = adapter_modules(model, name)
        if not modules:
            raise KeyError(f"no adapter named {name!r}; existing: {adapter_names(model)}")
        for module in modules.values():
            module.requires_grad_(False)


class FusionLayer(AdapterModule):
    """One layer's fusion over the named adapters of its site (see the module docstring). Keeps the attention
    weights of its last forward in ``last_attention`` (B, T, N), for plotting."""

    def __init__(self, adapter_name: str, site: nn.Module, d: int, config: FusionConfig):
        super().__init__(adapter_name)
        self.sources = list(config.adapters)
        self.__dict__["site"] = site  # a plain reference: the site is not a child (it holds this module)
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.lam = config.regularization
        with torch.no_grad():
            for linear in (self.query, self.key):  # BERT's initialisation (AdapterHub ``init_bert_weights``)
                linear.weight.normal_(0.0, config.init_std)
                linear.bias.zero_()
            self.value.weight.fill_(config.value_offdiag).fill_diagonal_(1.0)  # V ≈ I: o starts as Σ s_n z_n
        self.last_attention: torch.Tensor | None = None
        self.was_active = {n: site.deltas[n].active for n in self.sources}  # restored by delete_adapter

    def source(self, name: str) -> AdapterModule:
        deltas = self.site.deltas
        if name not in deltas:
            raise RuntimeError(f"fusion {self.adapter_name!r} reads adapter {name!r}, which is no longer in the model; "
                               "add or load it again, or delete the fusion")
        if deltas[name].active:
            raise RuntimeError(f"adapter {name!r} is active alongside fusion {self.adapter_name!r}, which already adds "
                               f"its output: activate only the fusion (set_active(model, {self.adapter_name!r}))")
        return deltas[name]

    def forward(self, x, h, close):
        u = close(h)  # (B, T, d): the query reads the block's output before any adapter

        def closed(h_):  # the sources read the same close(h): computed once, not once per source
            return u if h_ is h else close(h_)

        z = torch.stack([self.source(n)(x, h, closed) for n in self.sources], dim=2)  # (B, T, N, d)
        # q = W_Q u + b_Q; scores_n = q · (W_K z_n + b_K) = (q W_K) · z_n + q · b_K: one d×d product instead of N
        wq, bq, wk, bk = self.query.weight, self.query.bias, self.key.weight, self.key.bias
        if u[..., 0].numel() >= u.shape[-1]:  # B·T ≥ d tokens: q W_K = u (W_Qᵀ W_K) + b_Q W_K, the weights
            qk = F.linear(u, wk.T @ wq, bq @ wk)  # multiplied once (d³) instead of a second (B·T)×d×d product
            qb = F.linear(u, (bk @ wq)[None], (bq @ bk)[None])  # (B, T, 1) = q · b_K
        else:
            q = self.query(u)  # (B, T, d)
            qk, qb = q @ wk, (q @ bk).unsqueeze(-1)
        scores = torch.einsum("btd,btnd->btn", qk, z) + qb  # (B, T, N)
        s = torch.softmax(self.dropout(scores), dim=-1)  # (B, T, N), softmax over the adapters
        self.last_attention = s.detach()
        return self.value(torch.einsum("btn,btnd->btd", s, z))  # o = Σ_n s_n V z_n = V Σ_n s_n z_n   (B, T, d)

    def regularization(self) -> torch.Tensor:
        """λ ‖I − V‖²_F (Pfeiffer et al. 2021, §3): 0 when V = I."""
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return self.lam * (eye - self.value.weight).pow(2).sum()

    def on_delete(self) -> None:
        for name, active in self.was_active.items():
            if name in self.site.deltas:
                self.site.deltas[name].active = active


def fusion_layers(model: nn.Module, name: str) -> list[FusionLayer]:
    layers = [m for m in adapter_modules(model, name).values() if isinstance(m, FusionLayer)]
    if not layers:
        raise KeyError(f"no fusion named {name!r}; existing adapters: {adapter_names(model)}")
    return layers


def fusion_regularization(model: nn.Module, name: str) -> torch.Tensor:
    """λ Σ_l ‖I − V_l‖²_F over the fusion's layers (what ``train`` adds to the loss while it is active)."""
    return sum(layer.regularization() for layer in fusion_layers(model, name))


def fusion_attention(model: nn.Module, name: str, attention_mask: torch.Tensor | None = None,
                     per_example: bool = False) -> torch.Tensor:
    """The softmax weights of the last forward, averaged over real tokens (``attention_mask`` (B, T), 1 = real;
    None: every position): (layers, adapters), or (batch, layers, adapters) with ``per_example``.
    Columns follow ``FusionConfig.adapters``."""
    layers = fusion_layers(model, name)
    if any(layer.last_attention is None for layer in layers):
        raise RuntimeError(f"fusion {name!r} has not run yet: call the model on a batch first")
    s = torch.stack([layer.last_attention for layer in layers], dim=1)  # (B, L, T, N)
    m = torch.ones(s.shape[0], s.shape[2]) if attention_mask is None else attention_mask
    m = m.to(s.device, s.dtype)[:, None, :, None]  # (B, 1, T, 1)
    if per_example:
        return (s * m).sum(2) / m.sum(2).clamp(min=1)  # (B, L, N)
    return (s * m).sum((0, 2)) / m.sum((0, 2)).clamp(min=1)  # (L, N)


def fusion_count(d: int, L: int) -> int:
    """One fusion layer per transformer layer: Q, K (d² + d each), V (d², no bias): L(3d² + 2d)."""
    return L * (3 * d * d + 2 * d)

# the conformance suite's example: it reads two trained, frozen adapters (s0, s1), attached first
register_example("fusion", "fusion", Example(lambda: FusionConfig(adapters=["s0", "s1"]),
                                             lambda d, L, w: fusion_count(d, L), sources=2))
