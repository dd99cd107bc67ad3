"""Activation checkpointing per block (``Backbone.gradient_checkpointing``, Chen et al. 2016): on every registered
backbone (tiny random configs) with every method's example adapter attached (prefixes included) and on a 4-bit
decoder, in training mode with dropout, the loss and every trainable gradient equal those without checkpointing;
only block inputs stay saved; it is off in evaluation, without gradients and while a KV cache fills.

Tolerance: the backward runs the same operations on the same values again (dropout replays the same random
numbers, ``preserve_rng_state``), so the gradients agree bit for bit on this machine; the tests allow a relative
1e-6 (the last bits of fp32) so that a kernel choosing another blocking on another CPU does not fail them."""
import copy

import pytest
import torch

from minipeft import LoRAConfig, add_adapter, train_adapter
from minipeft import quant as Q
from minipeft.backbones import REGISTRY
from minipeft.core import EXAMPLES
from helpers import assert_unchanged, padded_tokens, perturb, structure

REL = 1e-6
CONFIGS = {f"{method}-{label}": ex.config for method, labels in EXAMPLES.items() for label, ex in labels.items()
           if not ex.sources}
# (family, example) pairs that attach (an example may refuse a backbone, e.g. BitFit where there is no bias)
CASES = [(family, f"{method}-{label}") for method, labels in EXAMPLES.items() for label, ex in labels.items()
         if not ex.sources for family in sorted(REGISTRY) if family not in getattr(ex, "refuses", {})]


def tiny(family: str, method: str | None = None):
    entry = REGISTRY[family]
    torch.manual_seed(0)
    model = entry.cls(entry.tiny())
    if method is not None:
        add_adapter(model, CONFIGS[method](), "a")
        perturb(model, "a")
        train_adapter(model, "a")
    return model.train()  # dropout on, as in training


def loss_and_grads(model, batch, checkpointing: bool):
    """A loss at the real tokens and the gradients of every trainable parameter, with or without checkpointing."""
    model.gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks in both runs
    hidden = model(batch["input_ids"], batch["attention_mask"])
    loss = hidden[batch["attention_mask"].bool()].pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_gradients(model, batch):
    loss, grads = loss_and_grads(model, batch, False)
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch, True)
    assert torch.equal(loss, loss_ckpt) or abs(float(loss - loss_ckpt)) <= REL * abs(float(loss))
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, g in grads.items():
        assert g is not None and grads_ckpt[name] is not None, name
        assert float((g - grads_ckpt[name]).abs().max()) <= REL * float(g.abs().max()), name


def batch_for(family: str):
    return padded_tokens(REGISTRY[family].tiny(), 10, (0, 3, 6))


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_full_fine_tuning_gradients_unchanged(family):
    assert_same_gradients(tiny(family).requires_grad_(True), batch_for(family))


@pytest.mark.parametrize("family,method", CASES)
def test_adapter_gradients_unchanged(family, method):
    """Every method's example (LoRA, adapters, prefixes, MAM, ...) on every backbone: the same loss and gradients."""
    assert_same_gradients(tiny(family, method), batch_for(family))


def test_qlora_gradients_unchanged():
    """LoRA on every linear of a 4-bit decoder: the 4-bit layers dequantize again in the recomputed forward."""
    model = Q.quantize_linears(tiny("llama"))
    add_adapter(model, LoRAConfig(r=4, targets=["q", "k", "v", "o", "gate", "up", "down"]), "a")
    perturb(model, "a")
    train_adapter(model, "a")
    assert_same_gradients(model, batch_for("llama"))


def saved_bytes(model, batch, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward (distinct storages)."""
    model.gradient_checkpointing(checkpointing)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["input_ids"], batch["attention_mask"]).sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("family", sorted(REGISTRY))
def test_checkpointing_saves_less(family):
    """With checkpointing, the forward keeps each block's inputs instead of all of its activations."""
    model, batch = tiny(family, "lora-lora"), batch_for(family)
    plain, ckpt = saved_bytes(model, batch, False), saved_bytes(model, batch, True)
    assert ckpt < plain / 2, (ckpt, plain)


def test_off_in_evaluation_without_gradients_and_with_a_cache():
    model, batch = tiny("llama", "lora-lora"), batch_for("llama")
    model.gradient_checkpointing(True)
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.utils.checkpoint.checkpoint = counting
    try:
        model.eval()
        model(batch["input_ids"], batch["attention_mask"])  # evaluation mode
        model.train()
        with torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"])  # no gradients
        cache = model.new_cache()
        model(batch["input_ids"], batch["attention_mask"], cache=cache)  # filling a cache: keys appended once
        assert not calls and cache.layers[0].k.shape[2] == batch["input_ids"].shape[1]
        model(batch["input_ids"], batch["attention_mask"])
        assert len(calls) == model.num_layers  # the check can fail: training with gradients is checkpointed
    finally:
        torch.utils.checkpoint.checkpoint = original


def test_bad_switch_is_a_clear_error():
    model = tiny("bert")
    before = structure(model)
    with pytest.raises(TypeError, match="True or False"):
        model.gradient_checkpointing("yes")
    assert_unchanged(model, before) and model.checkpoint_layers is False
    assert model.gradient_checkpointing() is model and model.checkpoint_layers
    copy.deepcopy(model)  # still a plain module
