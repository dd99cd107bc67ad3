"""Where training memory goes: a closed-form model of the bytes one training step holds, per part.

    weights       4 · N (fp32) ; a 4-bit linear: its stored codes and constants (``quant.nf4_nbytes``)
    gradients     4 · N_t                      (one per trainable value)
    optimizer     8 · N_t                      (AdamW's m and v; Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019)
    activations   Σ_layers A_layer(n) + A_outside(n),    n = B · T tokens           (fp32: 4 bytes per value)

Activations are what autograd keeps from the forward for the backward. Counted the way Korthikanti et al. (2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.1) count them (per op, the tensors its backward
reads), for this package's blocks and PyTorch's CPU kernels, per layer, in values (d width, f FFN width, w key/value
width, H heads, r LoRA rank):

    Llama block (SmolLM2)   n(4d + 2w + 3f + 2 + H)     two RMSNorm inputs and 1/rms, q and the attention output
                                                         (d each), k and v (w each), SwiGLU's gate, silu(gate), up
                                                         (3f), the flash kernel's log-sum-exp (H)
    BERT block (MiniLM)     n(7d + f + 4) + 3BHT²        q, kᵀ, v, two dropout masks and two LayerNorm inputs (7d),
                                                         GELU's input (f), LayerNorm means and 1/σ (4); the attention
                                                         probabilities, their dropout mask, the dropped probabilities
                                                         (3 · B·H·T²: the math kernel, as dropout is on in training)

plus what trained weights need: a Linear whose weight trains, or that carries LoRA, keeps its input (the attention
input nd, shared by q, k, v; the FFN input nd; the FFN output layer's input nf; BERT's output projection input nd,
Llama's being the attention output already kept), a trained RMSNorm weight keeps x̂ (nd), and each LoRA keeps
its r-wide A x (nr) for B's gradient. Korthikanti et al.'s 34 sbh + 5 a s² b (16-bit, all weights trained) is the
same count for GPT's block. With activation checkpointing (Chen et al. 2016, §3; ``Backbone.gradient_checkpointing``)
only each block's input (nd per layer) stays, and the block being differentiated is rebuilt: L·nd + A_layer.

The model leaves out the backward's own transients (activation gradients, a few nd at a time; a 4-bit layer's W
dequantized for one matmul) and the allocator's slack: ``bench/memory.py`` measures peaks against it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

FP32 = 4


@dataclass
class MemoryModel:
    """Bytes per part of one training step (see the module docstring)."""
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def mib(self) -> dict[str, float]:
        return {k: v / 2**20 for k, v in {**asdict(self), "total": self.total}.items()}


def weight_bytes(model: nn.Module) -> int:
    """Every parameter in fp32 and every buffer as stored (a 4-bit linear's codes and constants)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.nbytes for b in model.buffers())


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_bytes(n_trainable: int) -> tuple[int, int]:
    """(gradients, AdamW state) in bytes: 4 N_t and 2 · 4 N_t (m and v, Kingma & Ba 2015, Alg. 1)."""
    return FP32 * n_trainable, 2 * FP32 * n_trainable


def _trains(linear: nn.Module) -> bool:
    """The layer's own weight trains (a 4-bit layer's never does: it is no Parameter)."""
    weight = linear._parameters.get("weight")
    return bool(weight is not None and weight.requires_grad)


def lora_ranks(model: nn.Module) -> dict[int, int]:
    """id(linear) -> Σ r of the active LoRA modules on it."""
    from ..methods.lora import LoRALinear

    ranks: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.active and not m.merged:
            ranks[id(m.base_layer)] = ranks.get(id(m.base_layer), 0) + m.r
    return ranks


def layer_activation_values(backbone, layer_index: int, batch: int, length: int, ranks: dict[int, int]) -> int:
    """Values autograd keeps for block ``layer_index`` (the module docstring's per-layer count)."""
    cfg, n = backbone.cfg, batch * length
    d, f = cfg.hidden_size, cfg.intermediate_size
    attn, ffn = backbone.layers[layer_index].attn, backbone.layers[layer_index].ffn
    lin_a, lin_f = attn.linears(), ffn.linears()

    def kept(linears, names) -> bool:  # does any of these linears keep its (shared) input?
        return any(_trains(linears[k]) or id(linears[k]) in ranks for k in names if k in linears)

    lora = n * sum(ranks.get(id(m), 0) for m in [*lin_a.values(), *lin_f.values()])
    if backbone.family == "llama":
        w, H = backbone.attention.kv_width, backbone.attention.num_heads
        values = n * (4 * d + 2 * w + 3 * f + 2 + H)
        values += n * d * kept(lin_a, ("q", "k", "v")) + n * d * kept(lin_f, ("gate", "up"))
        values += n * f * kept(lin_f, ("down",))
        values += n * d * sum(p.requires_grad for p in (attn.norm.weight, ffn.norm.weight))
        return values + lora
    if backbone.family == "bert":
        H = backbone.attention.num_heads
        values = n * (7 * d + f + 4) + 3 * batch * H * length ** 2
        values += n * d * (kept(lin_a, ("q", "k", "v")) + kept(lin_a, ("o",)) + kept(lin_f, ("ffn_in",)))
        values += n * f * kept(lin_f, ("ffn_out",))
        return values + lora
    raise ValueError(f"the memory model knows the Llama and BERT blocks, not {backbone.family!r}")


def outside_activation_values(backbone, batch: int, length: int) -> int:
    """Values kept outside the blocks when the embeddings train (full fine-tuning): BERT's embedding LayerNorm
    input, its dropout mask and its mean and 1/σ; Llama's final RMSNorm (input, x̂, 1/rms). Frozen: ~0."""
    n, d = batch * length, backbone.cfg.hidden_size
    if backbone.family == "bert":
        return (2 * n * d + 2 * n) if backbone.embed.norm.weight.requires_grad else 0
    final = backbone.final_norm.weight
    return (2 * n * d + n) if final.requires_grad else (n * d + n)


def activation_bytes(model: nn.Module, batch: int, length: int, checkpointing: bool = False) -> int:
    """Σ_layers A_layer + A_outside in bytes (fp32); with checkpointing L·nd + the largest A_layer + A_outside."""
    from ..backbones.contract import find_backbone

    backbone = find_backbone(model)
    ranks = lora_ranks(model)
    per_layer = [layer_activation_values(backbone, i, batch, length, ranks) for i in range(backbone.num_layers)]
    outside = outside_activation_values(backbone, batch, length)
    if checkpointing:
        inputs = backbone.num_layers * batch * length * backbone.cfg.hidden_size
        return FP32 * (inputs + max(per_layer) + outside)
    return FP32 * (sum(per_layer) + outside)


def training_memory(model: nn.Module, batch: int, length: int, checkpointing: bool = False) -> MemoryModel:
    """The model of one training step of ``model`` (adapters attached, what trains set) on B × T tokens."""
    gradients, optimizer = state_bytes(trainable_count(model))
    return MemoryModel(weight_bytes(model), gradients, optimizer,
                       activation_bytes(model, batch, length, checkpointing))
