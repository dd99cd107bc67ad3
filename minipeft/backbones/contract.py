"""The backbone contract: what every backbone offers the methods, written once.

He et al. (2022, §3) show that every method adds a Δh to a hidden state. A backbone makes the places where
that happens explicit, and methods attach only through what is listed here (never through a concrete class):

    backbone.layers[i].attn, backbone.layers[i].ffn     the two *sites* of block i (``Site``)
    site.linears()                                       its named ``nn.Linear``s (q k v o, ffn_in ffn_out, ...)
    backbone.attention                                   head layout: heads, key/value heads, head width
    backbone.prefixes                                    prefix modules: per layer extra keys/values (l, kv_width)
    backbone.hidden_size, .num_layers, .identity()       what a saved adapter records and checks
    backbone.hf_name(ours) / backbone.our_name(hf)       the two-way name map to the ``transformers`` checkpoint
    backbone.cfg + type(backbone)(cfg)                   rebuild (on the meta device) to count the bare backbone

A site is one sublayer ``h = f(x)`` and the block's closing rule:

    post-LN (BERT)      x = r,        out = LN(r + h)        (Vaswani et al. 2017; Devlin et al. 2019)
    pre-norm (Llama)    x = norm(r),  out = r + h            (Xiong et al. 2020; Touvron et al. 2023)

r is the residual stream entering the sublayer, x what the sublayer's weights read, h its output before the
residual. Every module in ``site.deltas`` is called as ``delta(x, h, close)`` and returns Δh (or None): h ← h + Δh,
in order, then ``close(h)``. ``close(h)`` is the closing rule itself, so a module can read the block's output:
Pfeiffer's adapter reads ``close(h)`` = LN(r + h) on BERT, and r + h on a pre-norm block, where no LayerNorm
follows the residual (AdapterHub's bottleneck layer uses ``hidden + residual`` in place of
``LN(hidden + residual)`` when a model has no such LayerNorm, ``original_ln_before``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# the one activation table, for backbones (config "hidden_act") and for methods (config "activation")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
               "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu, "swish": F.silu,
               "tanh": torch.tanh}

Close = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionLayout:
    """Query heads, key/value heads (grouped-query attention when fewer) and the width of one head."""
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        """Width of one key (or value) vector over all key/value heads: what a prefix position holds."""
        return self.num_kv_heads * self.head_dim


class Site(nn.Module):
    """One sublayer of a block (see the module docstring). Subclasses implement ``sublayer(x, *args) -> h``.

    ``norm``: post-LN, the LayerNorm after the residual; pre-norm, the norm before the sublayer."""

    def __init__(self, norm: nn.Module, post_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.norm, self.post_norm = norm, post_norm
        self.dropout = nn.Dropout(dropout)
        self.deltas = nn.ModuleDict()

    def sublayer(self, x: torch.Tensor, *args) -> torch.Tensor:
        raise NotImplementedError

    def linears(self) -> dict[str, nn.Linear]:
        """The site's named linear layers, e.g. {"q": ..., "k": ..., "v": ..., "o": ...}."""
        return {n: m for n, m in self.named_children() if isinstance(m, nn.Linear)}

    def forward(self, r: torch.Tensor, *args) -> torch.Tensor:
        x = r if self.post_norm else self.norm(r)  # (B, T, d): what the sublayer reads
        return self.add_and_close(x, self.sublayer(x, *args), r)

    def add_and_close(self, x: torch.Tensor, h: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """h ← h + Δh for each active module in ``deltas`` (in order), then the closing rule; r = x on post-LN."""
        r = x if r is None else r
        h = self.dropout(h)  # (B, T, d): before the residual
        close: Close = (lambda h: self.norm(r + h)) if self.post_norm else (lambda h: r + h)
        for delta in self.deltas.values():
            if delta.active:
                dh = delta(x, h, close)  # Δh (He et al. 2022, Eq. 1-2 and Table 1)
                if dh is not None:
                    h = h + dh
        return close(h)  # (B, T, d)


class Backbone(nn.Module):
    """Base of every backbone: ``layers`` (blocks with ``attn`` and ``ffn`` sites), ``prefixes``, the layout.

    Subclasses set ``self.cfg``, ``self.layers`` and ``self.attention`` and implement ``HF_NAMES`` (pairs of
    (transformers fragment, our fragment), applied in order) and ``identity_fields``."""

    HF_NAMES: tuple[tuple[str, str], ...] = ()
    family: str = ""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # adapter name -> module whose forward() returns, per layer, the prefix (P_k, P_v) or None
        self.prefixes = nn.ModuleDict()

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def identity(self) -> dict:
        """What a saved adapter records about its backbone, and what loading checks."""
        return {"family": self.family, "name": self.cfg.name, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "kv_width": self.attention.kv_width}

    def sites(self, kind: str) -> list[Site]:
        """Every block's ``attn`` or ``ffn`` site, in layer order."""
        if kind not in ("attn", "ffn"):
            raise ValueError(f"a site is 'attn' or 'ffn', got {kind!r}")
        return [getattr(layer, kind) for layer in self.layers]

    def layer_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer, the (P_k, P_v) of all active prefix modules concatenated along the prefix axis."""
        per_layer = [[] for _ in self.layers]
        for module in self.prefixes.values():
            if module.active:
                for i, kv in enumerate(module()):
                    if kv is not None:
                        per_layer[i].append(kv)
        return [None if not kvs else tuple(torch.cat(t, dim=-2) for t in zip(*kvs)) for kvs in per_layer]

    @classmethod
    def our_name(cls, hf_key: str) -> str:
        for hf, ours in cls.HF_NAMES:
            hf_key = hf_key.replace(hf, ours)
        return hf_key

    @classmethod
    def hf_name(cls, our_key: str) -> str:
        for hf, ours in reversed(cls.HF_NAMES):
            our_key = our_key.replace(ours, hf)
        return our_key

    def bare_parameter_count(self) -> int:
        """Parameters of this backbone with nothing attached (rebuilt from its config on the meta device)."""
        with torch.device("meta"):
            return sum(p.numel() for p in type(self)(self.cfg).parameters())


def find_backbone(model: nn.Module) -> Backbone:
    """The backbone: the model itself, or its ``.backbone`` / ``.encoder`` (a task model wrapping one)."""
    for candidate in (model, getattr(model, "backbone", None), getattr(model, "encoder", None)):
        if isinstance(candidate, Backbone):
            return candidate
    raise TypeError(f"this method attaches to a minipeft backbone (Encoder, Decoder, or a model whose .backbone "
                    f"is one), got {type(model).__name__}; use its generic targets=... form for other modules")
