"""A from-scratch BERT-family encoder (BERT, MiniLM; RoBERTa position offsets) that loads HF checkpoints.

Every block is two *sites* (He et al. 2022, §3: every PEFT method adds a Δh to a hidden state):

    attention site   h = o(Attn(q(x), k(x), v(x)))        out = LN(x + h)
    FFN site         h = ffn_out(act(ffn_in(x)))          out = LN(x + h)

x is the sublayer input, h its output before residual + LayerNorm (Vaswani et al. 2017, post-LN).
Methods attach to a site's ``deltas`` (each returns Δh from x, h and the site's LayerNorm), replace a
named ``nn.Linear`` (q, k, v, o, ffn_in, ffn_out), or hand prefix keys/values to the attention via
``Encoder.prefixes``. With nothing attached the encoder is exactly the pretrained model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
               "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


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

    def forward(self, input_ids, attention_mask, token_type_ids):
        T = input_ids.shape[1]
        if self.cfg.model_type == "roberta":  # real tokens count from pad+1, padding sits at pad
            pos = torch.cumsum(attention_mask, dim=1) * attention_mask + self.cfg.pad_token_id
        else:
            pos = torch.arange(T, device=input_ids.device)[None]
        e = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.dropout(self.norm(e))  # (B, T, d)


class Site(nn.Module):
    """A sublayer that ends in ``out = LN(x + h)``; attached modules add Δh to h before the residual.

    Each module in ``deltas`` is called as ``delta(x, h, norm)`` and returns Δh (He et al. 2022, Eq. 1-2):
    sequential adapters read h, Pfeiffer's reads ``norm(x + h)``, parallel adapters read x.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.deltas = nn.ModuleDict()

    def add_and_norm(self, x, h):
        h = self.dropout(h)
        for delta in self.deltas.values():
            if getattr(delta, "active", True):
                h = h + delta(x, h, self.norm)
        return self.norm(x + h)  # (B, T, d)


class Attention(Site):
    """Multi-head self-attention, softmax(Q Kᵀ/√d_h) V (Vaswani et al. 2017, Eq. 1), with optional prefix."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        d = cfg.hidden_size
        self.num_heads, self.attention_dropout = cfg.num_heads, cfg.attention_dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def split_heads(self, t):  # (B, T, d) -> (B, H, T, d_h)
        B, T, d = t.shape
        return t.view(B, T, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, x, key_mask=None, prefix=None):
        """x (B, T, d); key_mask (B, T) bool, True = attend; prefix (P_k, P_v), each (l, d) or (B, l, d)."""
        B = x.shape[0]
        k, v = self.k(x), self.v(x)
        if prefix is not None:  # Li & Liang 2021, §4.2: prefix keys/values in front of the real ones
            pk, pv = (p.expand(B, -1, -1) if p.dim() == 3 else p.expand(B, *p.shape) for p in prefix)
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            if key_mask is not None:  # every query attends to every prefix position
                key_mask = torch.cat([key_mask.new_ones(B, pk.shape[1]), key_mask], dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, l+T)
        a = F.scaled_dot_product_attention(self.split_heads(self.q(x)), self.split_heads(k), self.split_heads(v),
                                           attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        h = self.o(a.transpose(1, 2).flatten(2))  # (B, T, d)
        return self.add_and_norm(x, h)


class FeedForward(Site):
    """h = W_out act(W_in x + b_in) + b_out (Vaswani et al. 2017, Eq. 2)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.ffn_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.add_and_norm(x, self.ffn_out(self.act(self.ffn_in(x))))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.attn, self.ffn = Attention(cfg), FeedForward(cfg)

    def forward(self, x, key_mask=None, prefix=None):
        return self.ffn(self.attn(x, key_mask, prefix))


class Encoder(nn.Module):
    """Embeddings + L post-LN blocks; returns the last hidden states (B, T, d). No pooler."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # name -> module whose forward() returns, per layer, the prefix (P_k, P_v) or None (prefix tuning)
        self.prefixes = nn.ModuleDict()

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    def check_inputs(self, input_ids, attention_mask, token_type_ids):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("input_ids must be an integer tensor of shape (batch, seq_len), got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size - 1}] (vocab_size "
                             f"{self.cfg.vocab_size}); got ids in [{lo}, {hi}]")
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
        x = self.embed(input_ids, attention_mask.long(), token_type_ids)
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()
        prefixes = self.layer_prefixes()
        for layer, prefix in zip(self.layers, prefixes):
            x = layer(x, key_mask, prefix)
        return x  # (B, T, d)

    def layer_prefixes(self):
        """Per layer, the (P_k, P_v) of all active prefix modules concatenated along the prefix axis."""
        per_layer = [[] for _ in self.layers]
        for module in self.prefixes.values():
            if getattr(module, "active", True):
                for i, kv in enumerate(module()):
                    if kv is not None:
                        per_layer[i].append(kv)
        return [None if not kvs else tuple(torch.cat(t, dim=-2) for t in zip(*kvs)) for kvs in per_layer]

    # ---- loading pretrained weights ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> "Encoder":
        """Load a Hugging Face checkpoint directory (config.json + model.safetensors); default: MiniLM."""
        from safetensors.torch import load_file

        from ..assets import minilm_path

        path = Path(path) if path is not None else minilm_path()
        config_file, weights_file = path / "config.json", path / "model.safetensors"
        if not path.is_dir() or not config_file.exists() or not weights_file.exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory: expected config.json "
                                    "and model.safetensors inside it")
        cfg = EncoderConfig.from_hf_dict(json.loads(config_file.read_text()), name=str(path))
        model = cls(cfg)
        model.load_hf_state_dict(load_file(str(weights_file)))
        return model.eval()

    @classmethod
    def from_hf(cls, hf_model) -> "Encoder":
        """Convert a loaded ``transformers`` BertModel / RobertaModel (same weights, our modules)."""
        cfg = EncoderConfig.from_hf_dict(hf_model.config.to_dict(), name=hf_model.config.name_or_path)
        model = cls(cfg)
        model.load_hf_state_dict(hf_model.state_dict())
        return model.eval()

    def load_hf_state_dict(self, hf_state: dict):
        """Map HF names (embeddings.*, encoder.layer.i.*) onto ours; strict apart from pooler/position_ids."""
        ours = {}
        for key, value in hf_state.items():
            key = key.split(".", 1)[1] if key.split(".", 1)[0] in ("bert", "roberta") else key
            if key.startswith("pooler.") or key.endswith("position_ids"):
                continue
            ours[hf_to_minipeft_name(key)] = value
        missing = sorted(set(self.state_dict()) - set(ours))
        unexpected = sorted(set(ours) - set(self.state_dict()))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit a BERT-family encoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.load_state_dict(ours)

    def describe(self) -> str:
        c = self.cfg
        n = sum(p.numel() for p in self.parameters())
        return (f"Encoder {c.name}: {c.model_type}, L={c.num_layers}, d={c.hidden_size}, heads={c.num_heads}, "
                f"FFN={c.intermediate_size}, vocab={c.vocab_size}, {n:,} parameters")

    def config_dict(self) -> dict:
        return asdict(self.cfg)


HF_NAMES = [  # (HF fragment, minipeft fragment), applied in order
    ("embeddings.word_embeddings", "embed.word"), ("embeddings.position_embeddings", "embed.position"),
    ("embeddings.token_type_embeddings", "embed.token_type"), ("embeddings.LayerNorm", "embed.norm"),
    ("encoder.layer.", "layers."), ("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
    ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.o"),
    ("attention.output.LayerNorm", "attn.norm"), ("intermediate.dense", "ffn.ffn_in"),
    ("output.dense", "ffn.ffn_out"), ("output.LayerNorm", "ffn.norm"),
]


def hf_to_minipeft_name(key: str) -> str:
    for hf, ours in HF_NAMES:
        key = key.replace(hf, ours)
    return key
