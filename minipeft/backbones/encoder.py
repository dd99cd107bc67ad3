"""A from-scratch BERT-family encoder (BERT, MiniLM; RoBERTa position offsets) that loads HF checkpoints.

Every block is two *sites* (He et al. 2022, §3: every PEFT method adds a Δh to a hidden state):

    attention site   h = o(Attn(q(x), k(x), v(x)))        out = LN(x + h)
    FFN site         h = ffn_out(act(ffn_in(x)))          out = LN(x + h)

x is the sublayer input, h its output before residual + LayerNorm (Vaswani et al. 2017, post-LN). The sites, the
named ``nn.Linear``s (q, k, v, o, ffn_in, ffn_out) and ``Encoder.prefixes`` are the backbone contract
(``minipeft.backbones.contract``). With nothing attached the encoder is exactly the pretrained model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import load_tokenizer
from .contract import ACTIVATIONS, AttentionLayout, Backbone, FeedForward, Site, check_prompt_length
from .registry import BackboneEntry, register_backbone

SUPPORTED_MODEL_TYPES = ("bert", "roberta")


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    name: str = "bert-base-sized (random)"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported; allowed: {sorted(ACTIVATIONS)}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} not supported; allowed: {SUPPORTED_MODEL_TYPES}")

    @classmethod
    def minilm(cls) -> "EncoderConfig":
        """The shape of all-MiniLM-L6-v2 (the course's encoder), without loading it: L=6, d=384, 12 heads."""
        return cls(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, name="MiniLM-L6")

    @property
    def position_offset(self) -> int:
        """RoBERTa numbers real positions from pad_token_id + 1; BERT from 0."""
        return self.pad_token_id + 1 if self.model_type == "roberta" else 0

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> "EncoderConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"checkpoint {name!r} is a {model_type!r} model; minipeft's Encoder loads "
                             f"the BERT family: model_type in {SUPPORTED_MODEL_TYPES}")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")
        missing = [key for key in required if key not in cfg]
        if missing:
            raise ValueError(f"checkpoint config {name!r} lacks {missing}; a BERT-family config.json has {required}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {cfg['position_embedding_type']!r} not supported; "
                             "only 'absolute'")
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                   intermediate_size=cfg["intermediate_size"], max_position=cfg["max_position_embeddings"],
                   type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                   dropout=cfg.get("hidden_dropout_prob", 0.1),
                   attention_dropout=cfg.get("attention_probs_dropout_prob", 0.1),
                   hidden_act=cfg.get("hidden_act", "gelu"), pad_token_id=cfg.get("pad_token_id") or 0,
                   model_type=model_type, name=name or cfg.get("_name_or_path", model_type))


class Embeddings(nn.Module):
    """e = LN(word[ids] + position[pos] + token_type[types])  (Devlin et al. 2019, §3, Fig. 2)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids, attention_mask, token_type_ids, prompt=None):
        """``prompt``: prompt tuning's soft tokens (B, l, d) in front of the word embeddings, with token type 0;
        ``attention_mask`` then covers them too (B, l + T), and positions count the real ones only (l..l+n-1)."""
        words = self.word(input_ids)  # (B, T, d)
        if prompt is not None:
            words = torch.cat([prompt.to(words.dtype), words], dim=1)
            token_type_ids = torch.cat([token_type_ids.new_zeros(prompt.shape[:2]), token_type_ids], dim=1)
        T = words.shape[1]
        if self.cfg.model_type == "roberta":  # real tokens count from pad+1, padding sits at pad
            pos = torch.cumsum(attention_mask, dim=1) * attention_mask + self.cfg.pad_token_id
        elif prompt is not None:  # a row's masked soft positions (per_example) do not count
            pos = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        else:
            pos = torch.arange(T, device=input_ids.device)[None]
        e = words + self.position(pos) + self.token_type(token_type_ids)
        return self.dropout(self.norm(e))  # (B, T, d)


class Attention(Site):
    """Multi-head self-attention, softmax(Q Kᵀ/√d_h) V (Vaswani et al. 2017, Eq. 1), with optional prefix."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps), post_norm=True, dropout=cfg.dropout)
        d = cfg.hidden_size
        self.num_heads, self.attention_dropout = cfg.num_heads, cfg.attention_dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split_heads(self, t):  # (B, T, d) -> (B, H, T, d_h)
        B, T, d = t.shape
        return t.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2)

    def sublayer(self, x, key_mask=None, prefix=None):
        """x (B, T, d); key_mask (B, T) bool, True = attend; prefix (P_k, P_v), each (l, d) or (B, l, d)."""
        B = x.shape[0]
        k, v = self.k(x), self.v(x)
        if prefix is not None:  # Li & Liang 2021, §4.2: prefix keys/values in front of the real ones
            pk, pv = (p.expand(B, -1, -1) if p.dim() == 3 else p.expand(B, *p.shape) for p in prefix[:2])
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            real_prefix = prefix[2] if len(prefix) > 2 else None  # per_example: each row's own prefix positions
            if key_mask is not None or real_prefix is not None:  # else every query attends every prefix position
                key_mask = x.new_ones(B, x.shape[1], dtype=torch.bool) if key_mask is None else key_mask
                real_prefix = key_mask.new_ones(B, pk.shape[1]) if real_prefix is None else real_prefix
                key_mask = torch.cat([real_prefix, key_mask], dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, l+T)
        a = F.scaled_dot_product_attention(self.split_heads(self.q(x)), self.split_heads(k), self.split_heads(v),
                                           attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.o(a.transpose(1, 2).flatten(2))  # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn, self.ffn = Attention(cfg), FeedForward(cfg, post_norm=True)

    def forward(self, x, key_mask=None, prefix=None):
        return self.ffn(self.attn(x, key_mask, prefix))


class Encoder(Backbone):
    """Embeddings + L post-LN blocks; returns the last hidden states (B, T, d). No pooler."""

    family, config_class, description = "bert", EncoderConfig, "BERT-family encoder"
    HF_NAMES = (  # (transformers fragment, ours), applied in order
        ("embeddings.word_embeddings", "embed.word"), ("embeddings.position_embeddings", "embed.position"),
        ("embeddings.token_type_embeddings", "embed.token_type"), ("embeddings.LayerNorm", "embed.norm"),
        ("encoder.layer.", "layers."), ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
        ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.o"),
        ("attention.output.LayerNorm", "attn.norm"), ("intermediate.dense", "ffn.ffn_in"),
        ("output.dense", "ffn.ffn_out"), ("output.LayerNorm", "ffn.norm"),
    )

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.attention = AttentionLayout(cfg.num_heads, cfg.num_heads, cfg.hidden_size // cfg.num_heads)

    def check_inputs(self, input_ids, attention_mask, token_type_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len), got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        for what, ids, size in (("token ids", input_ids, self.cfg.vocab_size),
                                ("token_type_ids", token_type_ids, self.cfg.type_vocab_size)):
            if ids is None or not ids.numel():
                continue
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= size:
                raise ValueError(f"{what} must be in [0, {size - 1}] (this checkpoint has {size}); "
                                 f"got values in [{lo}, {hi}]")
        limit = self.cfg.max_position - self.cfg.position_offset
        if input_ids.shape[1] > limit:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the maximum of {limit} positions")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.check_inputs(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        soft = self.soft_tokens(input_ids.shape[0], attention_mask)  # prompt tuning: (P, real) or None
        n_prompt = 0 if soft is None else soft[0].shape[1]
        check_prompt_length(n_prompt, input_ids.shape[1], self.cfg.max_position - self.cfg.position_offset)
        if soft is not None:
            attention_mask = torch.cat([soft[1], attention_mask], dim=1)  # (B, l + T)
        x = self.embed(input_ids, attention_mask.long(), token_type_ids, None if soft is None else soft[0])
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        for layer, prefix in zip(self.layers, self.layer_prefixes()):
            x = self.run_layer(layer, x, key_mask, prefix)  # checkpointed if asked (Backbone.run_layer)
        return x[:, n_prompt:]  # (B, T, d): the real tokens

    # ---- loading pretrained weights: Backbone.from_hf / from_hf_dir, with this conversion hook ------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "Encoder":
        """Load a Hugging Face checkpoint directory (config.json + model.safetensors); default: MiniLM."""
        from ..assets import minilm_path

        path = Path(path) if path is not None else minilm_path()
        return cls.from_hf_dir(path, name=str(path / "config.json"))

    def convert_hf_state(self, hf_state: dict) -> dict:
        """HF names (bert./roberta. prefix optional) onto ours; the pooler and position_ids are not ours."""
        ours = {}
        for key, value in hf_state.items():
            key = key.split(".", 1)[1] if key.split(".", 1)[0] in ("bert", "roberta") else key
            if not (key.startswith("pooler.") or key.endswith("position_ids")):
                ours[self.our_name(key)] = value
        return ours


register_backbone(BackboneEntry(
    "bert", Encoder, lambda: EncoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                           intermediate_size=96, max_position=64, name="tiny-bert (random)"),
    asset="minilm", tokenizer=load_tokenizer))
