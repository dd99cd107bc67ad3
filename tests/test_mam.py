"""The MAM adapter (He et al. 2022, §4.4) and composite adapters: counts against the reference library, output equal
to the composition of the parts, one name that activates, saves, loads, ejects and deletes as one."""
import pytest
import torch

from minipeft import (BottleneckConfig, LoRAConfig, PrefixConfig, ScaledParallelAdapterConfig, add_adapter,
                      delete_adapter, eject_prefix, load_adapter, parameter_summary, save_adapter, set_active)
from minipeft.api import adapter_config
from minipeft.backbones.encoder import Encoder
from minipeft.methods.composite import CompositeConfig
from minipeft.methods.mam import MAMConfig, adapter_lora, mam_stored_count
from minipeft.methods.parallel import parallel_count
from minipeft.methods.prefix import prefix_training_count
from helpers import TOL, assert_unchanged, gap, perturb, run, structure




def test_counts_equal_the_reference_library_on_bert_base(bert_base_sized):
    """AdapterHub's ``mam`` on BERT-base: 22,493,984 trained, 7,644,672 after ejecting the prefix MLP."""
    add_adapter(bert_base_sized, MAMConfig(), "m")
    s = parameter_summary(bert_base_sized, "m")
    assert s.adapter == prefix_training_count(768, 12, 30, 800) + parallel_count(768, 12, 384) == 22_493_984
    assert s.stored == mam_stored_count(768, 12, 30, 384) == 7_644_672
    assert s.per_part == {"prefix": (15_402_272, 552_960), "ffn": (7_091_712, 7_091_712)}


@pytest.mark.parametrize("length,budget", [(30, 0.01), (16, 0.005)])
def test_budget_knob(bert_base_sized, length, budget):
    """``budget`` picks the largest r whose stored MAM fits (He et al.'s 0.5% setting needs a shorter prefix)."""
    add_adapter(bert_base_sized, MAMConfig(length=length, reduction_factor=None, budget=budget), "m")
    stored, base = parameter_summary(bert_base_sized, "m").stored, bert_base_sized.bare_parameter_count()
    r = bert_base_sized.layers[0].ffn.deltas["m"].down.out_features
    assert stored == mam_stored_count(768, 12, length, r) <= budget * base < mam_stored_count(768, 12, length, r + 1)


def test_a_budget_the_prefix_alone_exceeds_is_explained(bert_base_sized):
    before = structure(bert_base_sized)
    with pytest.raises(ValueError, match="the prefix alone .length 30. stores 552,960; lower the length"):
        add_adapter(bert_base_sized, MAMConfig(reduction_factor=None, budget=0.005), "m")
    assert_unchanged(bert_base_sized, before)


def test_output_is_exactly_the_composition_of_its_parts(model, batch):
    """MAM under one name == a prefix and a scaled parallel adapter under two names, same tensors."""
    add_adapter(model, MAMConfig(length=4, hidden=16, reduction_factor=8), "mam")
    perturb(model, "mam")
    mam_out = run(model, batch)
    add_adapter(model, PrefixConfig(length=4, hidden=16), "p")
    add_adapter(model, ScaledParallelAdapterConfig(r=48), "a")
    with torch.no_grad():
        for q, p in zip(model.prefixes["mam"].parameters(), model.prefixes["p"].parameters()):
            p.copy_(q)
        for layer in model.layers:
            for q, p in zip(layer.ffn.deltas["mam"].parameters(), layer.ffn.deltas["a"].parameters()):
                p.copy_(q)
    set_active(model, "p", "a")
    assert torch.equal(run(model, batch), mam_out)


def test_one_name_saves_loads_ejects_and_deletes(model, minilm, batch, tmp_path):
    before = structure(model)
    add_adapter(model, MAMConfig(length=4, hidden=16, reduction_factor=8), "mam")
    perturb(model, "mam")
    expected = run(model, batch)
    eject_prefix(model, "mam")
    assert adapter_config(model, "mam").ejected
    assert gap(run(model, batch), expected, batch["attention_mask"]) < TOL
    save_adapter(model, "mam", tmp_path)
    fresh = Encoder(minilm.cfg)
    fresh.load_state_dict(minilm.state_dict())
    load_adapter(fresh.eval(), tmp_path, name="again")
    assert torch.equal(run(fresh, batch), run(model, batch))  # save -> load is bit-identical
    set_active(model)
    assert torch.equal(run(model, batch), run(minilm, batch))  # inactive: the base model exactly
    delete_adapter(model, "mam")
    assert_unchanged(model, before)


def test_adapter_plus_lora_composite_saves_and_loads(model, minilm, batch, tmp_path):
    add_adapter(model, adapter_lora(m=8, r=4), "al")
    perturb(model, "al")
    s = parameter_summary(model, "al")
    assert set(s.per_part) == {"adapter", "lora"} and sum(n for n, _ in s.per_part.values()) == s.adapter
    save_adapter(model, "al", tmp_path)
    fresh = Encoder(minilm.cfg)
    fresh.load_state_dict(minilm.state_dict())
    load_adapter(fresh.eval(), tmp_path)
    assert torch.equal(run(fresh, batch), run(model, batch))


def test_bad_composites_are_refused_and_change_nothing(model):
    with pytest.raises(ValueError, match="at least two parts"):
        CompositeConfig(parts={"only": LoRAConfig()})
    with pytest.raises(ValueError, match="must be a method config"):
        CompositeConfig(parts={"a": LoRAConfig(), "b": "lora"})
    with pytest.raises(ValueError, match="one of reduction_factor"):
        MAMConfig(budget=0.01)
    before = structure(model)
    clash = CompositeConfig(parts={"one": BottleneckConfig(placement="pfeiffer"), "two": BottleneckConfig()})
    with pytest.raises(ValueError, match="part 'two' .* would replace part 'one'"):
        add_adapter(model, clash, "c")
    assert_unchanged(model, before)


def test_gated_composite_is_half_open_at_start_and_learns_its_gates(model, batch):
    """UniPELT's gates: σ(0) = 1/2 at the start, so Δh is half the ungated one; the gates get gradients."""
    from minipeft import train_adapter
    from minipeft.methods.composite import Gate

    add_adapter(model, adapter_lora(m=8, r=4), "plain")
    perturb(model, "plain")
    set_active(model)
    base = run(model, batch)
    set_active(model, "plain")
    plain = run(model, batch)
    add_adapter(model, adapter_lora(m=8, r=4, gated=True), "gated")
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert len(gates) == 6 + 12 and all(g.adapter_part in ("adapter", "lora") for g in gates)
    assert parameter_summary(model, "gated").adapter == parameter_summary(model, "plain").adapter + 6 * 385 + 12 * 385
    with torch.no_grad():  # the same adapter and LoRA tensors behind the gates
        for (_, q), (_, p) in zip(sorted((n.replace("plain", "x"), p) for n, p in model.named_parameters()
                                         if ".plain." in n),
                                  sorted((n.replace("gated", "x").replace(".inner", ""), p)
                                         for n, p in model.named_parameters() if ".gated." in n and ".inner." in n)):
            p.copy_(q)
    set_active(model, "gated")
    gated = run(model, batch)
    assert gap(gated, plain, batch["attention_mask"]) > 100 * TOL and not torch.allclose(gated, base)
    train_adapter(model, "gated")
    model.train()
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    assert all(g.weight.grad is not None and g.weight.grad.abs().sum() > 0 for g in gates)
