"""QLoRA (Dettmers et al. 2023): the frozen backbone's block linears stored in NF4 with double quantization
(``minipeft.quant``, §3), LoRA on every one of them (§4: "LoRA on all linear transformer block layers" is what
matches 16-bit full fine-tuning), only LoRA trained. QLoRA's forward (Eq. 5):

    Y = X · doubleDequant(c₁, c₂, W^NF4)ᵀ + (α/r) · X Aᵀ Bᵀ        (the first term frozen, W rebuilt per use)

The recipe keeps the course's LoRA size (r = 8, α = 16, the headline LoRA's) so that what changes against LoRA is
the stored weights and the targets; ``prepare_qlora(model, quantize=False)`` is the same adapter on the fp32
backbone, the twin QLoRA is compared with (``bench/qlora_headline.py``). Parameters trained:
Σ over the block linears of r(d_in + d_out) (``lora.lora_count`` per linear).

QLoRA is no new method (its adapter is LoRA's) but a way to train one: a recipe that changes the backbone's
stored weights, so it lives in the harness, beside fusion's (``transfer.py``), and uses the verbs of ``api``.
"""
from __future__ import annotations

from torch import nn

from ..api import add_adapter, train_adapter
from ..core import Recipe, register_recipe
from ..methods.lora import LoRAConfig
from ..quant import block_linears, quantize_linears

RANK, ALPHA = 8, 16
# learning rate on the headline task: the lower validation loss of 1e-3 and 3e-3 for this adapter on the fp32
# decoder (bench/qlora_headline.py probe: 3.217 vs 3.367; results/qlora/lr_probe.txt); QLoRA trains with its
# fp32 twin's rate
LR = 3e-3


def block_linear_names(model: nn.Module) -> list[str]:
    """The names of the linears in every block (Llama: q k v o gate up down; BERT: q k v o ffn_in ffn_out)."""
    return sorted({name for (_, name) in block_linears(model)})


def qlora_config(model: nn.Module) -> LoRAConfig:
    """LoRA r = 8, α = 16 on every linear of the blocks of ``model``'s backbone."""
    return LoRAConfig(r=RANK, alpha=ALPHA, targets=block_linear_names(model))


def prepare_qlora(model: nn.Module, quantize: bool = True, name: str = "qlora") -> None:
    """Quantize the block linears to NF4 (``quantize=False``: leave them fp32), attach LoRA on each of them under
    ``name`` and train only it (and a task head, if the model has one)."""
    if quantize:
        quantize_linears(model, double_quant=True)
    add_adapter(model, qlora_config(model), name)
    train_adapter(model, name)


register_recipe(Recipe(
    "qlora", lesson="11", lr=LR, prepare=prepare_qlora, ablation=True,
    config={"r": RANK, "alpha": ALPHA, "targets": "every linear of the blocks", "weights": "NF4, double quant"},
    description="QLoRA (Dettmers et al. 2023): NF4 block linears (64-value blocks, double quantization), "
                "LoRA r=8, alpha=16 on every one of them"))
