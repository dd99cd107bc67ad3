"""A from-scratch GPT-2 decoder (Radford et al. 2019) that loads ``transformers``' GPT2LMHeadModel.

Every block is two pre-norm *sites* (He et al. 2022, §3; Radford et al. 2019, §2.3 moved LayerNorm to the
sublayer's input, as in Child et al. 2019):

    attention site   x = LN(r),  h = o(CausalAttn(q(x), k(x), v(x)))          out = r + h
    FFN site         x = LN(r),  h = ffn_out(gelu_tanh(ffn_in(x)))            out = r + h

Positions are learned, added to the token embedding (Radford et al. 2018, §3.1); the FFN uses GELU's tanh
approximation (Hendrycks & Gimpel 2016, §2: 0.5x(1 + tanh(√(2/π)(x + 0.044715x³))), "gelu_new"); a final
LayerNorm follows the last block and the output embedding is tied to the input one (Press & Wolf 2017).

The checkpoint stores its linears as ``Conv1D`` (weight (d_in, d_out), the transpose of ``nn.Linear``'s) and
fuses W_q, W_k, W_v into one ``c_attn`` (d, 3d): ``convert_hf_state`` transposes and splits them, so the sites
hold the same named ``nn.Linear``s as the encoder's (q k v o, ffn_in ffn_out) and every method attaches
through the backbone contract unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contract import (ACTIVATIONS, AttentionLayout, Backbone, FeedForward, Site, causal_key_masks,
                       check_decoder_config, check_prompt_length, prefix_keys, prefixed_keys_values)
from .decoder import Decoder, KVCache, LayerKV
from .registry import BackboneEntry, register_backbone

SUPPORTED_MODEL_TYPES = ("gpt2",)


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 1024
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu_new"
    tie_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    name: str = "gpt2-sized (random)"

    def __post_init__(self):
        check_decoder_config(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                                    "max_position"))
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; allowed: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls) -> "GPT2Config":
        """A random 2-layer GPT-2 for tests (d = 64, 4 heads)."""
        return cls(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                   max_position=64, bos_token_id=0, eos_token_id=0, name="tiny-gpt2 (random)")

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> "GPT2Config":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"checkpoint {name!r} is a {model_type!r} model; minipeft's GPT2 loads model_type "
                             f"in {SUPPORTED_MODEL_TYPES}")
        refused = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
        for key, supported in refused.items():
            if cfg.get(key, supported) != supported:
                raise ValueError(f"{key}={cfg[key]!r} not supported: minipeft's GPT2 computes softmax(QKᵀ/√d_h) V "
                                 f"of self-attention only ({key}={supported!r})")
        vocab, d = cfg["vocab_size"], cfg["n_embd"]
        in_vocab = lambda t: t if isinstance(t, int) and 0 <= t < vocab else None  # noqa: E731 (random configs)
        return cls(vocab_size=vocab, hidden_size=d, num_layers=cfg["n_layer"], num_heads=cfg["n_head"],
                   intermediate_size=cfg.get("n_inner") or 4 * d, max_position=cfg["n_positions"],
                   layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5), dropout=cfg.get("resid_pdrop", 0.1),
                   attention_dropout=cfg.get("attn_pdrop", 0.1),
                   hidden_act=cfg.get("activation_function", "gelu_new"),
                   tie_embeddings=cfg.get("tie_word_embeddings", True), pad_token_id=in_vocab(cfg.get("pad_token_id")),
                   bos_token_id=in_vocab(cfg.get("bos_token_id")), eos_token_id=in_vocab(cfg.get("eos_token_id")),
                   name=name or cfg.get("_name_or_path") or model_type)


class Attention(Site):
    """Causal multi-head attention softmax(QKᵀ/√d_h + mask) V (Vaswani et al. 2017, Eq. 1), optional prefix
    keys/values (Li & Liang 2021, §4.2) and KV cache."""

    def __init__(self, cfg: GPT2Config):
        super().__init__(nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps), post_norm=False, dropout=cfg.dropout)
        d, self.H, self.d_h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.attention_dropout = cfg.attention_dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def heads(self, t):  # (B, T, d) -> (B, H, T, d_h)
        return t.view(t.shape[0], t.shape[1], self.H, self.d_h).transpose(1, 2)

    def sublayer(self, x, mask=None, prefix=None, kv: LayerKV | None = None):
        """x (B, T, d); mask (B, 1, T, keys) bool or None (causal); prefix (P_k, P_v); kv: this layer's cache."""
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if prefix is not None and (kv is None or kv.k is None):  # a cache holds them after its first call
            k, v = prefixed_keys_values(k, v, prefix, self.H)  # (B, H, l + T, d_h)
            if kv is not None:
                kv.hold_prefix(prefix)
        if kv is not None:
            k, v = kv.append(k, v)  # (B, H, l + S + T, d_h)
        p = self.attention_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=p)
        return self.o(a.transpose(1, 2).flatten(2))  # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.attn, self.ffn = Attention(cfg), FeedForward(cfg, post_norm=False)  # act: gelu_tanh (Radford et al. 2019)

    def forward(self, x, mask=None, prefix=None, kv=None):
        return self.ffn(self.attn(x, mask, prefix, kv))


class GPT2(Backbone):
    """Token + learned position embeddings, L pre-LN blocks, final LayerNorm; returns hidden states (B, T, d).
    ``logits(h)`` applies the tied output embedding; ``new_cache()`` a KV cache, as ``Decoder``'s."""

    family, config_class, description = "gpt2", GPT2Config, "GPT-2 decoder"
    HF_NAMES = (  # (transformers fragment, ours), applied in order; c_attn is split by convert_hf_state
        ("transformer.wte", "embed"), ("transformer.wpe", "position"), ("transformer.h.", "layers."),
        ("transformer.ln_f", "final_norm"), ("ln_1", "attn.norm"), ("ln_2", "ffn.norm"), ("attn.c_proj", "attn.o"),
        ("mlp.c_fc", "ffn.ffn_in"), ("mlp.c_proj", "ffn.ffn_out"),
    )
    CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored (d_in, d_out)
    peft_mismatch = ("transformers' GPT-2 fuses W_q, W_k, W_v into one Conv1D (c_attn, stored transposed), so a "
                     "peft LoRA on c_attn is one low-rank ΔW over q|k|v, not a LoRA on our q, k, v")

    def __init__(self, cfg: GPT2Config):
        super().__init__(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.attention = AttentionLayout(cfg.num_heads, cfg.num_heads, cfg.head_dim)

    check_inputs = Decoder.check_inputs  # the same checks: token ids in the vocabulary, context, mask, cache batch
    logits = Decoder.logits

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None):
        """input_ids (B, T); attention_mask (B, T), 1 = real token (left or right padding); cache: a KVCache of
        the S tokens before these (filled in place). Real tokens sit at positions 0..n-1 whatever the padding
        (as ``transformers``' generate passes them). Returns (B, T, d)."""
        self.check_inputs(input_ids, attention_mask, cache)
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        first = cache is None or not len(cache)
        past = mask.new_zeros(mask.shape[0], 0) if first else cache.mask  # (B, S)
        words = self.embed(input_ids)  # (B, T, d)
        # prompt tuning: soft tokens in front of the word embeddings on the first call, real tokens after them
        words, mask, n_prompt = self.prepend_prompts(words, mask) if first else (words, mask, 0)
        check_prompt_length(n_prompt, input_ids.shape[1], self.cfg.max_position)
        positions = (past.sum(1, keepdim=True) + mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        masks = causal_key_masks(mask, past)
        # e = W_e[ids] + W_p[positions]  (Radford et al. 2018, §3.1)
        x = self.dropout(words + self.position(positions))  # (B, T, d)
        prefixes = self.layer_prefixes() if first else [None] * self.num_layers  # a cache already holds them
        for i, (layer, prefix) in enumerate(zip(self.layers, prefixes)):
            kv = None if cache is None else cache.layers[i]
            x = self.run_layer(layer, x, masks(*prefix_keys(prefix, kv)), prefix, kv,
                               filling_cache=kv is not None)  # checkpointed if asked (Backbone.run_layer)
        if cache is not None:
            cache.mask = torch.cat([past, mask], dim=1)
        return self.final_norm(x[:, n_prompt:])  # (B, T, d): the real tokens

    def convert_hf_state(self, hf_state: dict) -> dict:
        """GPT2LMHeadModel / GPT2Model tensors -> ours: Conv1D weights transposed, c_attn split into q, k, v; a
        tied ``lm_head.weight`` (the embedding) and the old causal-mask buffers (attn.bias, attn.masked_bias)
        skipped."""
        ours = {}
        for key, value in hf_state.items():
            key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key  # GPT2Model too
            tied_head = key == "lm_head.weight" and self.cfg.tie_embeddings
            if tied_head or key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if key.endswith(".weight") and any(f".{c}." in key for c in self.CONV1D):
                value = value.t()  # Conv1D (d_in, d_out) -> Linear (d_out, d_in)
            if ".attn.c_attn." in key:  # [W_q; W_k; W_v] stacked along the output axis
                for role, part in zip("qkv", value.chunk(3, dim=0)):
                    ours[self.our_name(key).replace("attn.c_attn", f"attn.{role}")] = part.contiguous()
            else:
                ours[self.our_name(key)] = value.contiguous()
        return ours


def load_gpt2_tokenizer(path=None):
    """GPT-2's tokenizer from a local checkpoint directory; no offline GPT-2 asset ships with the course."""
    from transformers import AutoTokenizer

    if path is None:
        raise ValueError("no offline GPT-2 checkpoint ships with minipeft: pass the directory of a local GPT-2 "
                         "checkpoint (its tokenizer.json / vocab.json + merges.txt)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


register_backbone(BackboneEntry("gpt2", GPT2, GPT2Config.tiny, asset=None, tokenizer=load_gpt2_tokenizer))
