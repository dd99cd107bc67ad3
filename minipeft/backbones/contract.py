"""The backbone contract: what every backbone offers the methods, written once.

He et al. (2022, §3) show that every method adds a Δh to a hidden state. A backbone makes the places where
that happens explicit, and methods attach only through what is listed here (never through a concrete class):

    backbone.layers[i].attn, backbone.layers[i].ffn     the two *sites* of block i (``Site``)
    site.linears()                                       its named ``nn.Linear``s (q k v o, ffn_in ffn_out, ...)
    site.role(role)                                      the linears that play a ``ROLES`` part in it (see below)
    backbone.attention                                   head layout: heads, key/value heads, head width
    backbone.prefixes                                    prefix modules: per layer extra keys/values (l, kv_width)
    backbone.prompts                                     prompt modules: soft tokens (l, d) before the embedded input
    backbone.hidden_size, .num_layers, .identity()       what a saved adapter records and checks
    backbone.hf_name(ours) / backbone.our_name(hf)       the two-way name map to the ``transformers`` checkpoint
    Backbone.from_hf(hf_model)                           loading: one path, each backbone's ``convert_hf_state`` hook
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

import contextvars
from contextlib import contextmanager
from contextvars import ContextVar
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

# The parts a recipe names (LoRA's "q", "v"; IA³'s "k", "v", "ffn_out"); each site says which of its linears
# play them, so one recipe means the same projections on every backbone. Most backbones name their linears after
# their role; Llama's SwiGLU reads its input through two (gate and up) and writes through ``down``.
ROLES = {"q": "attention query", "k": "attention key", "v": "attention value", "o": "attention output",
         "ffn_in": "feed-forward input (the linears before the activation)",
         "ffn_out": "feed-forward output (the linear after the activation)"}


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


def check_decoder_config(cfg, sizes: tuple[str, ...]) -> None:
    """What every decoder config must hold: ``sizes`` positive integers, d divisible by the heads, its pad / bos /
    eos ids None or in the vocabulary; a ValueError naming the field."""
    for key in sizes:
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} must be divisible by num_heads {cfg.num_heads}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(cfg, key)
        if value is not None and not (isinstance(value, int) and 0 <= value < cfg.vocab_size):
            raise ValueError(f"{key} must be None or a token id in [0, {cfg.vocab_size - 1}], got {value!r}")


# ---- serving: a different adapter for each example of one batch ------------------------------------------------
# Inside ``per_example(model, names)``, example i of every batch uses adapter ``names[i]`` alone ("base": none),
# whatever the active set: each site computes an adapter's Δh on the rows routed to it only (gathered, then added
# back in place), so a mixed batch costs one adapter's work per example (Punica's / S-LoRA's gather-scatter,
# Chen et al. 2023; Sheng et al. 2023). ROUTES holds adapter name -> the rows (a LongTensor) while it is set.

BASE = "base"
ROUTES: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("minipeft_routes", default=None)


@contextmanager
def per_example(model: nn.Module, adapter_names):
    """Route example i of every batch run inside to adapter ``adapter_names[i]`` ("base" = the bare model). Every
    name must be an adapter of ``model`` that can be computed per example; otherwise a ValueError/KeyError says
    which and why, and nothing is set. Batches run inside must have ``len(adapter_names)`` rows."""
    names = list(adapter_names) if not isinstance(adapter_names, str) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"adapter_names must be a non-empty list with one adapter name (or {BASE!r}) per example, "
                         f"got {adapter_names!r}")
    held = {}  # adapter name -> its modules
    for m in model.modules():
        if hasattr(m, "adapter_name") and m.adapter_name is not None:
            held.setdefault(m.adapter_name, []).append(m)
    unknown = sorted(set(names) - set(held) - {BASE})
    if unknown:
        raise KeyError(f"no adapter named {unknown[0]!r} to route examples to; adapters: {sorted(held)} or {BASE!r}")
    for name, modules in sorted(held.items()):  # any of them (a merged LoRA changes the weights of every example)
        why = next(filter(None, (getattr(m, "not_per_example", lambda: "")() for m in modules)), "")
        if why:
            raise ValueError(f"cannot route examples to adapters one by one: adapter {name!r} {why}")
    device = next(model.parameters()).device
    index = torch.arange(len(names), device=device)
    routes = {n: index[[i for i, a in enumerate(names) if a == n]] for n in set(names) - {BASE}}
    token = ROUTES.set({"": index, **routes})  # "": every row, to check the batch size
    try:
        yield
    finally:
        ROUTES.reset(token)


def routed_rows(routes: dict, module: nn.Module, batch: int) -> torch.Tensor | None:
    """The rows routed to ``module``'s adapter (None: none), checking that the batch is the routed one."""
    if batch != len(routes[""]):
        raise ValueError(f"the batch has {batch} examples but adapter_names names {len(routes[''])}")
    return routes.get(module.adapter_name)


def add_deltas(deltas: nn.ModuleDict, h: torch.Tensor, delta_of) -> torch.Tensor:
    """h plus each attached module's Δ, in order (a later module reads the h its predecessors made): every active
    module on every row; inside ``per_example``, each module on the rows routed to its adapter only, its Δ added
    back at those rows. ``delta_of(module, h, rows)`` computes one module's Δ on ``rows`` (None: the whole batch)
    of what it reads, or None (nothing to add). The one loop of every site: a block's, a module's output, its input."""
    routes = ROUTES.get()
    for delta in deltas.values():
        if routes is None:
            if not delta.active:
                continue
            rows = None
        elif (rows := routed_rows(routes, delta, h.shape[0])) is None:
            continue
        dh = delta_of(delta, h, rows)
        if dh is not None:
            h = h + dh if rows is None else h.index_add(0, rows, dh)
    return h


class Site(nn.Module):
    """One sublayer of a block (see the module docstring). Subclasses implement ``sublayer(x, *args) -> h``.

    ``norm``: post-LN, the LayerNorm after the residual; pre-norm, the norm before the sublayer."""

    def __init__(self, norm: nn.Module, post_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.norm, self.post_norm = norm, post_norm
        self.dropout = nn.Dropout(dropout)
        self.deltas = nn.ModuleDict()

    # role -> the attribute names of the linears that play it, where they are not the role's own name
    roles: dict[str, tuple[str, ...]] = {}

    def sublayer(self, x: torch.Tensor, *args) -> torch.Tensor:
        raise NotImplementedError

    def linears(self) -> dict[str, nn.Linear]:
        """The site's named linear layers, e.g. {"q": ..., "k": ..., "v": ..., "o": ...}."""
        return {n: m for n, m in self.named_children() if isinstance(m, nn.Linear)}

    def role(self, role: str) -> list[nn.Linear]:
        """The linears of this site that play ``role`` (one of ``ROLES``); [] if the site has none."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {sorted(ROLES)}")
        linears = self.linears()
        return [linears[n] for n in self.roles.get(role, (role,)) if n in linears]

    def forward(self, r: torch.Tensor, *args) -> torch.Tensor:
        x = r if self.post_norm else self.norm(r)  # (B, T, d): what the sublayer reads
        return self.add_and_close(x, self.sublayer(x, *args), r)

    def add_and_close(self, x: torch.Tensor, h: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """h ← h + Δh for each active module in ``deltas`` (in order), then the closing rule; r = x on post-LN."""
        r = x if r is None else r
        h = self.dropout(h)  # (B, T, d): before the residual

        def closing(r) -> Close:  # the block's closing rule for the residual r
            return (lambda h: self.norm(r + h)) if self.post_norm else (lambda h: r + h)

        def delta_h(delta, h, rows):  # Δh (He et al. 2022, Eq. 1-2 and Table 1), on the rows routed to it
            if rows is None:
                return delta(x, h, closing(r))
            return delta(x[rows], h[rows], closing(r[rows]))

        return closing(r)(add_deltas(self.deltas, h, delta_h))  # (B, T, d)


class FeedForward(Site):
    """h = W_out act(W_in x + b_in) + b_out (Vaswani et al. 2017, Eq. 2), LayerNorm'd after the residual (BERT,
    ``post_norm``) or before the sublayer (GPT-2)."""

    def __init__(self, cfg, post_norm: bool):
        norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        super().__init__(norm, post_norm=post_norm, dropout=cfg.dropout)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def sublayer(self, x):
        return self.ffn_out(self.act(self.ffn_in(x)))


class Backbone(nn.Module):
    """Base of every backbone: ``layers`` (blocks with ``attn`` and ``ffn`` sites), ``prefixes``, the layout.

    Subclasses set ``self.cfg``, ``self.layers`` and ``self.attention``, and as class attributes ``family``,
    ``config_class`` (a config dataclass with ``from_hf_dict(hf_config, name)``), ``description`` (for errors)
    and ``HF_NAMES`` (pairs of (transformers fragment, our fragment), applied in order); a checkpoint whose
    tensors are not a renaming of ours (fused, transposed) overrides ``convert_hf_state``."""

    HF_NAMES: tuple[tuple[str, str], ...] = ()
    family: str = ""
    config_class: type = None
    description: str = "backbone"
    # why a peft LoRA on the transformers checkpoint is not a LoRA on our linears ("" : it is, name for name)
    peft_mismatch: str = ""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # adapter name -> module whose forward() returns, per layer, the prefix (P_k, P_v) or None
        self.prefixes = nn.ModuleDict()
        # adapter name -> module whose forward() returns soft input tokens (l, d) (prompt tuning)
        self.prompts = nn.ModuleDict()

    def __call__(self, *args, adapter_names=None, **kwargs):
        """``adapter_names``: one adapter name (or "base") per example of the batch, each computed with its own
        adapter alone (``per_example``); None: the active adapters for every example."""
        if adapter_names is None:
            return super().__call__(*args, **kwargs)
        with per_example(self, adapter_names):
            return super().__call__(*args, **kwargs)

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

    # activation checkpointing per block (``gradient_checkpointing``): off unless asked for
    checkpoint_layers: bool = False

    def gradient_checkpointing(self, on: bool = True) -> "Backbone":
        """Activation checkpointing per block (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
        §3; ``torch.utils.checkpoint``): in a training forward each block keeps only its inputs, and its forward is
        run again in the backward to rebuild what the gradients need. Activation memory goes from L blocks' worth
        to L blocks' inputs + one block's, for about one more forward of compute. Gradients are unchanged (the same
        operations on the same values; dropout replays the same random numbers). Returns the backbone."""
        if not isinstance(on, bool):
            raise TypeError(f"gradient_checkpointing takes True or False, got {on!r}")
        self.checkpoint_layers = on
        return self

    def run_layer(self, layer: nn.Module, *args, filling_cache: bool = False) -> torch.Tensor:
        """``layer(*args)``, checkpointed when checkpointing is on, the model trains and gradients are recorded,
        and the block is not filling a KV cache (running it twice would append its keys twice). The block runs
        again in the backward inside a copy of the context it first ran in (any context variable it reads, such as
        a per-example adapter routing, holds what it held)."""
        if not (self.checkpoint_layers and self.training and torch.is_grad_enabled() and not filling_cache):
            return layer(*args)
        return torch.utils.checkpoint.checkpoint(contextvars.copy_context().run, layer, *args, use_reentrant=False)

    def soft_tokens(self, batch: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The soft tokens of every active module in ``prompts`` (prompt tuning, Lester et al. 2021, §2), concatenated,
        as (P (B, l, d), real (B, l) of ``mask``'s dtype), or None when there are none. Inside ``per_example`` row i
        holds the soft tokens of its own adapter, left-aligned and padded to the longest (``real`` marks them)."""
        routes = ROUTES.get()
        modules = {n: m for n, m in self.prompts.items()
                   if (m.active if routes is None else routed_rows(routes, m, batch) is not None)}
        if not modules:
            return None
        if routes is None:
            p = torch.cat([m() for m in modules.values()], dim=0)  # (l, d)
            return p.expand(batch, -1, -1), mask.new_ones(batch, p.shape[0])
        soft = {n: m() for n, m in modules.items()}
        first = next(iter(soft.values()))
        p = first.new_zeros(batch, max(t.shape[0] for t in soft.values()), first.shape[1])  # (B, l_max, d)
        real = mask.new_zeros(batch, p.shape[1])
        for n, t in soft.items():
            p[routes[n], :t.shape[0]], real[routes[n], :t.shape[0]] = t, 1
        return p, real

    def prepend_prompts(self, e: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[P; e] and [real; mask]: the soft tokens (``soft_tokens``) in front of the embedded input e (B, T, d)
        (Lester et al. 2021, §2: the model reads [P; X_e]) as positions of the sequence; mask (B, T). Returns
        (e, mask, l), e and mask as they were and l = 0 when there are none. The backbone numbers the soft tokens
        0..l-1 and the real tokens l..l+n-1, runs every block on all l + T, and returns the T real tokens only."""
        soft = self.soft_tokens(e.shape[0], mask)
        if soft is None:
            return e, mask, 0
        p, real = soft
        return torch.cat([p.to(e.dtype), e], dim=1), torch.cat([real, mask], dim=1), p.shape[1]

    def sites(self, kind: str) -> list[Site]:
        """Every block's ``attn`` or ``ffn`` site, in layer order."""
        if kind not in ("attn", "ffn"):
            raise ValueError(f"a site is 'attn' or 'ffn', got {kind!r}")
        return [getattr(layer, kind) for layer in self.layers]

    def layer_prefixes(self) -> list[tuple[torch.Tensor, ...] | None]:
        """Per layer, the (P_k, P_v) of all active prefix modules concatenated along the prefix axis; inside
        ``per_example``, (P_k, P_v, real) with each row's own prefix (see ``routed_prefixes``)."""
        routes = ROUTES.get()
        if routes is not None:
            return self.routed_prefixes(routes)
        per_layer = [[] for _ in self.layers]
        for module in self.prefixes.values():
            if module.active:
                for i, kv in enumerate(module()):
                    if kv is not None:
                        per_layer[i].append(kv)
        return [None if not kvs else tuple(torch.cat(t, dim=-2) for t in zip(*kvs)) for kvs in per_layer]

    def routed_prefixes(self, routes: dict) -> list[tuple[torch.Tensor, ...] | None]:
        """Per layer (P_k, P_v, real): row i holds the prefix of the adapter routed to it, left-aligned and padded to
        the longest, P_k, P_v (B, l_max, w); ``real`` (B, l_max) bool marks the positions it may attend."""
        B = len(routes[""])
        routed = {n: m for n, m in self.prefixes.items() if routed_rows(routes, m, B) is not None}
        if not routed:
            return [None] * self.num_layers
        kvs = {n: m() for n, m in routed.items()}  # name -> per layer (P_k, P_v) or None
        out = []
        for i in range(self.num_layers):
            here = {n: kv[i] for n, kv in kvs.items() if kv[i] is not None}
            if not here:
                out.append(None)
                continue
            first = next(iter(here.values()))[0]
            l_max = max(kv[0].shape[-2] for kv in here.values())
            pk, pv = (first.new_zeros(B, l_max, first.shape[-1]) for _ in range(2))
            real = torch.zeros(B, l_max, dtype=torch.bool, device=first.device)
            for n, (k, v) in here.items():
                rows, l = routes[n], k.shape[-2]
                pk[rows, :l], pv[rows, :l], real[rows, :l] = k, v, True
            out.append((pk, pv, real))
        return out

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

    # ---- loading from transformers: one path, a conversion hook per backbone ---------------------------------

    @classmethod
    def from_hf(cls, hf_model) -> "Backbone":
        """Convert a loaded ``transformers`` model (same weights, our modules)."""
        cfg = cls.config_class.from_hf_dict(hf_model.config.to_dict(), name=hf_model.config.name_or_path)
        return cls.from_hf_state(cfg, hf_model.state_dict())

    @classmethod
    def from_hf_dir(cls, path, name: str, hint: str = "", on_meta: bool = False) -> "Backbone":
        """Load a Hugging Face checkpoint directory (config.json + model.safetensors); the config is checked before
        the weights are read. ``name``: what ``identity()`` records."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        path = Path(path)
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        if not path.is_dir() or not config_file.exists() or not weights_file.exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: expected config.json "
                                    f"and model.safetensors inside it{hint}")
        try:
            cfg = cls.config_class.from_hf_dict(json.loads(config_file.read_text()), name=name)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON ({e})") from None
        try:
            weights = load_file(str(weights_file))
        except Exception as e:  # safetensors' own error types for a truncated or corrupt file
            raise ValueError(f"{weights_file} is not a readable safetensors file ({type(e).__name__}: {e})") from None
        return cls.from_hf_state(cfg, weights, source=str(weights_file), on_meta=on_meta)

    @classmethod
    def from_hf_state(cls, cfg, hf_state: dict, source: str = "the checkpoint", on_meta: bool = False) -> "Backbone":
        """Build from our config and a ``transformers`` state dict. ``on_meta``: no random init first, the
        checkpoint's tensors become the parameters (a large model loads without a second copy)."""
        if on_meta:
            with torch.device("meta"):
                model = cls(cfg)
        else:
            model = cls(cfg)
        model.load_hf_state_dict(hf_state, source=source, assign=on_meta)
        return model.eval()

    def convert_hf_state(self, hf_state: dict) -> dict:
        """The conversion hook: ``transformers`` tensors -> ours. Default: rename through ``HF_NAMES``; a backbone
        overrides it to drop tensors it does not hold, transpose or split fused ones."""
        return {self.our_name(k): v for k, v in hf_state.items()}

    def load_hf_state_dict(self, hf_state: dict, source: str = "the checkpoint", assign: bool = False):
        """Load converted ``transformers`` tensors; strict: every tensor present, none extra, every shape right."""
        ours, expected = self.convert_hf_state(hf_state), self.state_dict()
        missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source} does not fit a {self.description}: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {unexpected[:5]} ({len(unexpected)}); this one has {self.num_layers} layers")
        wrong = [f"{k}: {tuple(v.shape)} where the config says {tuple(expected[k].shape)}"
                 for k, v in ours.items() if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"{source} does not match its config ({len(wrong)} tensors of another shape, e.g. "
                             f"another hidden size): " + "; ".join(wrong[:3]))
        self.load_state_dict(ours, assign=assign)

    def bare_parameter_count(self) -> int:
        """Parameters of this backbone with nothing attached (rebuilt from its config on the meta device)."""
        with torch.device("meta"):
            return sum(p.numel() for p in type(self)(self.cfg).parameters())


def check_prompt_length(n_prompt: int, n_tokens: int, limit: int) -> None:
    """l soft tokens (prompt tuning) take positions too: l + n must fit the backbone's ``limit`` positions."""
    if n_prompt and n_prompt + n_tokens > limit:
        raise ValueError(f"{n_tokens} tokens after {n_prompt} soft tokens (prompt tuning) exceed the context of "
                         f"{limit} positions: shorten the input (at most {limit - n_prompt} tokens) or the prompt")


def find_backbone(model: nn.Module) -> Backbone:
    """The backbone: the model itself, or its ``.backbone`` / ``.encoder`` (a task model wrapping one)."""
    for candidate in (model, getattr(model, "backbone", None), getattr(model, "encoder", None)):
        if isinstance(candidate, Backbone):
            return candidate
    raise TypeError(f"this method attaches to a minipeft backbone (Encoder, Decoder, or a model whose .backbone "
                    f"is one), got {type(model).__name__}; use its generic targets=... form for other modules")


# ---- attention helpers every backbone's attention shares -----------------------------------------------------

def prefixed_keys_values(k: torch.Tensor, v: torch.Tensor, prefix, num_kv_heads: int):
    """[P_k; K] and [P_v; V], head by head (Li & Liang 2021, §4.2: the prefix's keys/values sit in front of the real
    ones, used as given). k, v (B, n, T, d_h) with n = num_kv_heads; prefix (P_k, P_v), each (l, n·d_h) or
    (B, l, n·d_h), as ``Backbone.layer_prefixes`` gives them. Returns (B, n, l + T, d_h) twice."""
    B, n, _, d_h = k.shape
    if any(p.dim() not in (2, 3) or p.shape[-1] != n * d_h for p in prefix[:2]):
        raise ValueError(f"prefix keys/values must be (l, {n * d_h}) or (B, l, {n * d_h}): this attention has {n} "
                         f"key/value heads of width {d_h}; got {[tuple(p.shape) for p in prefix]}")
    pk, pv = (p.expand(B, -1, -1).view(B, -1, n, d_h).transpose(1, 2) for p in prefix[:2])  # (B, n, l, d_h)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def prefix_keys(prefix, kv) -> tuple[int, torch.Tensor | None]:
    """(l, real_prefix) of one layer's prefix keys: from this call's prefix, else from what the cache holds."""
    if prefix is not None:
        return prefix[0].shape[-2], prefix[2] if len(prefix) > 2 else None
    return (kv.prefix_len, kv.real_prefix) if kv is not None else (0, None)


def causal_key_masks(mask: torch.Tensor, past: torch.Tensor) -> Callable[..., torch.Tensor | None]:
    """For a causal decoder: (n_prefix, real_prefix=None) -> which keys each query may attend, (B, 1, T, l + S + T)
    bool, or None when plain causal attention is exact (no prefix, no cache, no padding). mask (B, T): the new
    tokens that are real; past (B, S): the cached ones; real_prefix (B, l): each row's own prefix positions
    (``per_example``; None: every row sees all l). Query t (token S + t) sees its prefix positions, the real keys
    j <= S + t, and itself (so a padding row is never all -inf)."""
    B, T, S = mask.shape[0], mask.shape[1], past.shape[1]
    real = torch.cat([past, mask], dim=1)  # (B, S + T)
    j, t = torch.arange(S + T, device=mask.device), torch.arange(T, device=mask.device)[:, None] + S
    allowed = (real[:, None, :] & (j <= t)) | (j == t)  # (B, T, S + T)
    plain = S == 0 and bool(mask.all())
    masks = {}

    def for_prefix(n_prefix: int, real_prefix: torch.Tensor | None = None) -> torch.Tensor | None:
        if real_prefix is not None:  # per row: built per call (the layers share one)
            return torch.cat([real_prefix[:, None, :].expand(B, T, n_prefix), allowed], dim=2)[:, None]
        if n_prefix not in masks:
            full = torch.cat([allowed.new_ones(B, T, n_prefix), allowed], dim=2)[:, None]
            masks[n_prefix] = None if plain and n_prefix == 0 else full
        return masks[n_prefix]
    return for_prefix
