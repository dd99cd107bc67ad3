"""Prefix tuning (Li & Liang 2021): l trainable key and value vectors in front of every layer's attention.

For each layer i the attention sees ``l`` extra positions that only exist as keys and values
(Li & Liang 2021, §4.2; the backbone's attention does the concatenation, e.g. ``encoder.Attention.sublayer``)::

    head_j = softmax(q_j [P_k,j ; K_j]ᵀ / √d_h) [P_v,j ; V_j]        P_k, P_v ∈ R^{l×d}, split into heads

The real tokens keep their positions, the key mask gets l ones in front, so padding still works and the
parameters do not depend on the batch. He et al. (2022, Eq. 7) rewrite this as a gated Δh:
``head = (1 − λ(x)) Attn(x) + λ(x) softmax(q P_kᵀ) P_v``, λ = the softmax mass on the prefix.

Parameterisation (``reparameterize``):
    reparameterised  P = MLP(P'): Embedding(l, d) → Linear(d, k) → tanh → Linear(k, 2·L·d)   (§4.3)
                     one row per prefix position gives every layer's (P_k, P_v); k = 512 by default.
                     Training-time parameters: l·d + (d·k + k) + (k·2Ld + 2Ld).
    flat             P ∈ R^{L×2×l×d} trained directly (Li & Liang: less stable, lower accuracy).
Either way the model needs only P at inference: 2·l·d·L stored parameters (BERT-base, l=30: 552,960).

Ejection (``Prefix.eject()``): run the MLP once, keep its output as the flat parameter ``prefix`` and drop
the MLP. What is stored:
    - ``stored_parameter_count()`` is 2·l·L·d always (what inference needs, before or after ejection);
    - ``save_adapter`` writes the module as it is: before ejection the MLP (a training checkpoint, from which
      training can resume), after ejection only ``prefix`` (L, 2, l, d). The saved config then says
      ``ejected=True`` so ``load_adapter`` rebuilds the flat form. Eject before saving for deployment.
    - after ejection the adapter *is* a flat prefix: ``prefix`` is an ``nn.Parameter`` (it can be trained on).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..core import (AdapterConfig, AdapterModule, Example, Knob, Recipe, find_backbone, register_example,
                    register_method, register_recipe)

INITS = ("normal", "tokens")


@register_method
@dataclass
class PrefixConfig(AdapterConfig):
    """``length`` l prefix positions per layer; ``reparameterize`` P = MLP(P') with hidden size ``hidden`` k.

    ``init``: "normal" — reparameterised: P' ~ N(0, 1) (nn.Embedding's default) and PyTorch's default Linear
    init; flat: P ~ N(0, ``init_std``²). "tokens" (flat only) — P starts as the keys/values the frozen model
    computes for ``init_tokens`` (l token ids; default: ids 1000, 1001, ...), i.e. the activations of real
    words (Li & Liang 2021, §7.2). ``ejected`` is set by ``Prefix.eject()`` (reparameterised only): the
    adapter then holds only P."""

    method = "prefix"
    length: int = 30
    reparameterize: bool = True
    hidden: int = 512
    init: str = "normal"
    init_std: float = 0.02
    init_tokens: list[int] | None = None
    ejected: bool = False

    def __post_init__(self):
        for key in ("length", "hidden"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"prefix {key} must be a positive integer, got {value!r}")
        for key in ("reparameterize", "ejected"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"prefix {key} must be True or False, got {getattr(self, key)!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown prefix init {self.init!r}; allowed: {INITS}")
        if self.init == "tokens" and self.reparameterize:
            raise ValueError("init='tokens' sets P directly, so it needs reparameterize=False (the flat prefix)")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        if self.ejected and not self.reparameterize:
            raise ValueError("ejected=True describes a reparameterised prefix whose MLP was dropped; "
                             "a flat prefix (reparameterize=False) has nothing to eject")
        if self.init_tokens is not None and (len(self.init_tokens) != self.length or self.init != "tokens"):
            raise ValueError(f"init_tokens needs init='tokens' and exactly length={self.length} token ids, "
                             f"got {len(self.init_tokens)} with init={self.init!r}")

    def attach(self, model: nn.Module, name: str) -> None:
        backbone = find_backbone(model)
        backbone.prefixes[name] = Prefix(name, backbone, self)

    def after_ejection(self) -> "PrefixConfig":
        return dataclasses.replace(self, ejected=True) if self.reparameterize else self

    def deploy(self, model: nn.Module, name: str) -> None:
        eject_prefix(model, name)  # inference needs only P (Li & Liang 2021, §4.3)


class Prefix(AdapterModule):
    """Returns, per layer, (P_k, P_v) each (l, w), w the attention's key/value width (the hidden size d on BERT,
    3 key/value heads × 64 = 192 on SmolLM2). Reparameterised: ``embedding``, ``mlp``; flat: ``prefix``."""

    def __init__(self, adapter_name: str, backbone, config: PrefixConfig):
        super().__init__(adapter_name)
        self.l, self.L, self.d = config.length, backbone.num_layers, backbone.attention.kv_width
        if config.reparameterize and not config.ejected:
            d_model = backbone.hidden_size
            self.embedding = nn.Embedding(self.l, d_model)  # P' (l, d)
            self.mlp = nn.Sequential(nn.Linear(d_model, config.hidden), nn.Tanh(),
                                     nn.Linear(config.hidden, 2 * self.L * self.d))
        else:
            self.prefix = nn.Parameter(torch.empty(self.L, 2, self.l, self.d))  # (L, 2, l, w)
            if config.init == "tokens" and not config.ejected:
                with torch.no_grad():
                    self.prefix.copy_(token_activations(backbone, config.init_tokens or
                                                        list(range(1000, 1000 + self.l))))
            else:
                nn.init.normal_(self.prefix, std=config.init_std)

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def full_prefix(self) -> torch.Tensor:
        """P for all layers, (L, 2, l, d): the MLP's output (§4.3) or the flat parameter."""
        if not self.reparameterized:
            return self.prefix
        # P = MLP(P'): (l, d) → (l, 2Ld) → (l, L, 2, d) → (L, 2, l, d)
        out = self.mlp(self.embedding.weight)
        return out.view(self.l, self.L, 2, self.d).permute(1, 2, 0, 3)

    def forward(self):
        p = self.full_prefix()
        return [(p[i, 0], p[i, 1]) for i in range(self.L)]  # per layer (P_k, P_v), each (l, d)

    @torch.no_grad()
    def eject(self) -> "Prefix":
        """Run the MLP once, keep only P as the parameter ``prefix`` (L, 2, l, d); drop embedding and MLP."""
        if not self.reparameterized:
            return self
        p = self.full_prefix().detach().clone().contiguous()
        requires_grad = self.mlp[0].weight.requires_grad
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(p, requires_grad=requires_grad)
        return self

    def stored_parameter_count(self) -> int:
        """What inference needs: 2·l·L·d (Li & Liang 2021, §4.3: the MLP is dropped after training)."""
        return prefix_stored_count(self.d, self.L, self.l)


@torch.no_grad()
def token_activations(backbone, token_ids: list[int]) -> torch.Tensor:
    """Per layer, the keys and values the frozen backbone computes for ``token_ids``: (L, 2, l, w)."""
    vocab = backbone.cfg.vocab_size
    if min(token_ids) < 0 or max(token_ids) >= vocab:
        raise ValueError(f"init_tokens must be token ids in [0, {vocab - 1}], got {min(token_ids)}..{max(token_ids)}")
    ids = torch.tensor([token_ids], device=next(backbone.parameters()).device)
    captured, hooks = [], []
    for layer in backbone.layers:
        for proj in layer.attn.role("k") + layer.attn.role("v"):
            hooks.append(proj.register_forward_hook(lambda m, i, o: captured.append(o[0])))
    was_training, saved = backbone.training, dict(backbone.prefixes.items())
    try:
        backbone.prefixes.clear()  # the activations of the base model
        backbone.eval()(ids)
    finally:
        for h in hooks:
            h.remove()
        backbone.prefixes.update(saved)
        backbone.train(was_training)
    return torch.stack(captured).view(backbone.num_layers, 2, len(token_ids), -1)


def eject_prefix(model: nn.Module, name: str) -> None:
    """Eject adapter ``name``'s prefix (see ``Prefix.eject``); its saved config then says ``ejected=True``, so
    ``load_adapter`` rebuilds the flat form."""
    backbone = find_backbone(model)
    if name not in backbone.prefixes:
        raise KeyError(f"no prefix adapter named {name!r}; prefixes: {list(backbone.prefixes)}")
    backbone.prefixes[name].eject()
    for module in model.modules():
        configs = module.__dict__.get("adapter_configs", {})
        if name in configs:
            configs[name] = configs[name].after_ejection()


def prefix_stored_count(d: int, L: int, l: int) -> int:
    """2·l·d·L: P_k and P_v, l vectors of size d, in each of L layers (BERT-base, l=30: 552,960)."""
    return 2 * l * d * L


def prefix_training_count(d: int, L: int, l: int, k: int = 512, reparameterize: bool = True,
                          kv_width: int | None = None) -> int:
    """Reparameterised: l·d (P') + d·k + k + k·2Lw + 2Lw (the MLP) (Li & Liang 2021, §4.3), w the key/value
    width (= d unless grouped-query attention makes it smaller); BERT-base, l=30, k=512: 9,872,384. Flat: 2·l·w·L."""
    w = kv_width or d
    if not reparameterize:
        return prefix_stored_count(w, L, l)
    return l * d + (d * k + k) + (k * 2 * L * w + 2 * L * w)


# only the prefix and the head train; inference needs only P (``eject_prefix`` drops the MLP, outputs within 1e-6)
register_recipe(Recipe.adapter(
    "prefix", lesson="05", lr=1e-3, make=lambda l: PrefixConfig(length=l, hidden=512, reparameterize=True),
    knob=Knob("prefix length l", (5, 10, 20, 30, 50, 100, 200), 30),
    description="prefix tuning l=30, reparameterised (k=512; Li & Liang 2021): trains P' + MLP, stores 2·l·d·L"))

# the conformance suite's examples (tests/test_conformance.py: every method on every backbone)
register_example("prefix", "reparameterized", Example(
    lambda: PrefixConfig(length=3, hidden=16),
    lambda d, L, w: (prefix_training_count(d, L, 3, 16, kv_width=w), prefix_stored_count(w, L, 3))))
register_example("prefix", "flat", Example(lambda: PrefixConfig(length=3, reparameterize=False),
                                           lambda d, L, w: prefix_stored_count(w, L, 3)))
