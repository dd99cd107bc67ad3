"""The memory model of training (``minipeft.lab.memory``) against what PyTorch really holds: the tensors autograd
keeps for the backward (counted by storage with ``saved_tensors_hooks``), AdamW's state after a step, the stored
weights. Tiny random encoder and decoder, full fine-tuning, LoRA on W_q, W_v, LoRA on every linear, QLoRA."""
import pytest
import torch

from minipeft import LoRAConfig, add_adapter, train_adapter
from minipeft import quant as Q
from minipeft.backbones import REGISTRY
from minipeft.lab import memory as M

KINDS = ["full", "lora", "lora_all", "qlora"]


def build(family: str, kind: str):
    entry = REGISTRY[family]
    torch.manual_seed(0)
    model = entry.cls(entry.tiny()).train()
    if kind == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if kind == "qlora":
        Q.quantize_linears(model)
    every = sorted({n for s in model.sites("attn") + model.sites("ffn") for n in s.linears()})
    add_adapter(model, LoRAConfig(r=4, targets=["q", "v"] if kind == "lora" else every), "a")
    train_adapter(model, "a")
    return model


def saved_bytes(model, batch: int, length: int) -> int:
    """Bytes of the distinct storages autograd keeps from one forward, parameters and buffers excepted."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, model.cfg.vocab_size, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, torch.ones_like(ids))
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return sum(n for ptr, n in storages.items() if ptr not in held)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("shape", [(2, 10), (3, 24)])
def test_activations_match_what_autograd_keeps(family, kind, shape):
    """The per-layer closed form against the kept tensors: within 5% on 2-layer models (what it leaves out, the
    token ids and the first block's savings where no gradient flows below it, is a smaller share with more
    layers); exactly for LoRA on every linear of the encoder."""
    model = build(family, kind)
    measured, modelled = saved_bytes(model, *shape), M.activation_bytes(model, *shape)
    assert abs(modelled / measured - 1) < 0.05, (measured, modelled)
    if family == "bert" and kind in ("lora_all", "qlora"):
        assert modelled == measured


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_checkpointing_keeps_block_inputs(family, kind):
    """With checkpointing the forward keeps L·nd (each block's input) and what lies outside the blocks; the
    model's peak adds the one block rebuilt in the backward."""
    model = build(family, kind).gradient_checkpointing(True)
    B, T = 3, 24
    backbone_inputs = 4 * model.num_layers * B * T * model.cfg.hidden_size
    outside = 4 * M.outside_activation_values(model, B, T)
    measured = saved_bytes(model, B, T)
    assert backbone_inputs <= measured and abs((backbone_inputs + outside) / measured - 1) < 0.05
    ranks = M.lora_ranks(model)
    one_block = 4 * max(M.layer_activation_values(model, i, B, T, ranks) for i in range(model.num_layers))
    assert M.activation_bytes(model, B, T, checkpointing=True) == backbone_inputs + outside + one_block
    assert M.activation_bytes(model, B, T, checkpointing=True) < M.activation_bytes(model, B, T)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_and_adamw_state(kind):
    """4 bytes of gradient and 8 of AdamW state (m, v) per trainable value, as the optimizer really holds."""
    model = build("llama", kind)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, model.cfg.vocab_size, (2, 10))
    model(ids, torch.ones_like(ids)).pow(2).mean().backward()
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    grads, adam = M.state_bytes(M.trainable_count(model))
    assert grads == sum(p.grad.nbytes for p in params)
    assert adam == sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))


def test_weights_of_a_4bit_model():
    """fp32 parameters at 4 bytes; each 4-bit linear at its stored codes and constants (``nf4_nbytes``)."""
    fp32, qlora = build("llama", "lora_all"), build("llama", "qlora")
    layers = [m for m in qlora.modules() if isinstance(m, Q.Linear4bit)]
    saved = sum(4 * m.in_features * m.out_features - Q.nf4_nbytes(m.in_features * m.out_features) for m in layers)
    assert M.weight_bytes(fp32) - M.weight_bytes(qlora) == saved > 0
    assert M.training_memory(qlora, 2, 10).weights == M.weight_bytes(qlora)


def test_unknown_block_is_a_clear_error():
    model = build("gpt2", "full") if "gpt2" in REGISTRY else None
    if model is None:
        pytest.skip("no gpt2 backbone registered")
    with pytest.raises(ValueError, match="knows the Llama and BERT blocks"):
        M.activation_bytes(model, 2, 10)
