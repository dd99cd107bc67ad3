"""The conformance suite, generated from the registries: every registered method (``minipeft.core.METHODS``, its
examples ``minipeft.core.EXAMPLES``, registered in its file) on every registered backbone (``minipeft.backbones.REGISTRY``, its tiny random
config, seeded). A new method or backbone is covered without editing this file; a method with no example fails.

Each pair: it does something; inactive = base exactly; save -> load under another name bit-identical; delete
leaves the model as it was; the backward reaches every adapter parameter; trained and stored counts = their
closed form; a failed add changes nothing; ``for_inference`` keeps the outputs (within TOL) and drops what
inference does not need (no LoRA module left, no prefix MLP); LoRA equals peft's on the transformers twin of each backbone
peft can describe."""
import dataclasses

import pytest
import torch

from minipeft import (add_adapter, delete_adapter, for_inference, load_adapter, parameter_summary,
                      save_adapter, set_active)
from minipeft.backbones import REGISTRY
from minipeft.core import EXAMPLES, METHODS, adapter_configs, adapter_modules
from minipeft.methods.lora import LoRALinear
from minipeft.methods.prefix import Prefix
from helpers import (HF_TWINS, TOL, assert_unchanged, build, gap, perturb, run, structure, tiny_batch,
                     with_sources)

CASES = [pytest.param(method, label, family, id=f"{method}-{label}-{family}")
         for method in METHODS for label in EXAMPLES.get(method, {"no example": None}) for family in REGISTRY]


def example(method, label):
    if label not in EXAMPLES.get(method, {}):
        pytest.fail(f"method {method!r} is registered but has no example: register one in its file (core.register_example)")
    return EXAMPLES[method][label]


def assert_backward_reaches(model, batch):
    """A loss's gradient reaches every parameter of adapter "a" (then the model is back in eval, grads cleared)."""
    model.train()
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    grads = [p.grad for m in adapter_modules(model, "a").values() for p in m.parameters()]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_every_registered_method_has_an_example():
    missing = sorted(set(METHODS) - set(EXAMPLES))
    assert not missing, f"registered methods without an example config in tests/helpers.py EXAMPLES: {missing}"
    assert not set(EXAMPLES) - set(METHODS), "EXAMPLES names a method that is not registered"


def refused(ex, family) -> bool:
    """The example's method cannot apply to this backbone (``Example.refuses``): adding it raises the expected
    ValueError and changes nothing."""
    if family not in ex.refuses:
        return False
    model = with_sources(family, ex)
    before = structure(model)
    with pytest.raises(ValueError, match=ex.refuses[family]):
        add_adapter(model, ex.config(), "a")
    assert_unchanged(model, before)
    return True


@pytest.mark.parametrize("method,label,family", CASES)
def test_conformance(method, label, family, tmp_path):
    ex = example(method, label)
    if refused(ex, family):
        return
    model = with_sources(family, ex)
    batch = tiny_batch(model)
    mask = batch["attention_mask"]
    base, bare = run(build(family), batch), structure(model)  # the bare backbone's output; the model as it is

    add_adapter(model, ex.config(), "a")
    assert type(adapter_configs(model)["a"]) is METHODS[method]
    perturb(model, "a")
    adapted = run(model, batch)
    assert gap(adapted, base, mask) > 100 * TOL  # it does something

    set_active(model)
    assert torch.equal(run(model, batch), base)  # every adapter inactive: exactly the base model
    set_active(model, "a")
    assert torch.equal(run(model, batch), adapted)
    assert_backward_reaches(model, batch)

    if ex.counts is not None:  # closed forms = numel
        trained, stored = ex.expected_counts(model)
        summary = parameter_summary(model, "a")
        numel = sum({id(p): p.numel() for m in adapter_modules(model, "a").values() for p in m.parameters()}.values())
        assert (summary.adapter, summary.stored) == (trained, stored) and numel == trained

    attached = structure(model)  # a failed add changes nothing
    with pytest.raises(ValueError, match="already"):
        add_adapter(model, ex.config(), "a")
    assert_unchanged(model, attached)
    config = ex.config()
    if getattr(config, "targets", None) is not None:  # a target that matches nothing
        with pytest.raises(ValueError, match="nowhere"):
            add_adapter(model, dataclasses.replace(config, targets=["nowhere"]), "bad")
        assert_unchanged(model, attached)

    save_adapter(model, "a", tmp_path)  # save -> load under another name: bit-identical
    fresh = with_sources(family, ex)
    load_adapter(fresh, tmp_path, name="b")
    set_active(fresh, "b")
    assert torch.equal(run(fresh, batch), adapted)

    delete_adapter(model, "a")  # delete: as it was
    assert_unchanged(model, bare)


@pytest.mark.parametrize("method,label,family", CASES)
def test_for_inference_keeps_the_outputs(method, label, family):
    ex = example(method, label)
    if refused(ex, family):
        return
    model = with_sources(family, ex)
    batch = tiny_batch(model)
    add_adapter(model, ex.config(), "a")
    perturb(model, "a")
    expected = run(model, batch)
    for_inference(model.train())
    assert not model.training and gap(run(model, batch), expected, batch["attention_mask"]) < TOL
    left = list(adapter_modules(model).values())  # LoRA folded into W, the prefix's training-time MLP dropped
    assert not any(isinstance(m, LoRALinear) for m in left)
    assert not any(m.reparameterized for m in left if isinstance(m, Prefix))



@pytest.mark.parametrize("family", list(REGISTRY))
def test_lora_equals_peft_on_the_transformers_twin(family, tmp_path):
    """Our LoRA, exported to peft's files, gives peft's outputs on the same weights in transformers (a backbone
    whose transformers layout peft cannot describe says why: ``Backbone.peft_mismatch``)."""
    from peft import PeftModel

    from minipeft import LoRAConfig, export_peft

    if REGISTRY[family].cls.peft_mismatch:
        pytest.skip(REGISTRY[family].cls.peft_mismatch)
    assert family in HF_TWINS, f"backbone {family!r} has no transformers twin in tests/helpers.py HF_TWINS"
    make, hf_output, our_output = HF_TWINS[family]
    torch.manual_seed(0)
    hf = make().eval()
    ours = REGISTRY[family].cls.from_hf(hf)
    batch = tiny_batch(ours)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    add_adapter(ours, LoRAConfig(r=4, alpha=8), "a")
    perturb(ours, "a")
    export_peft(ours, "a", tmp_path)
    with torch.no_grad():
        base = hf_output(hf(input_ids=ids, attention_mask=mask))
        theirs = PeftModel.from_pretrained(hf, tmp_path).eval()  # wraps hf's Linears in place
        mine, peft_out = our_output(ours, ours(ids, mask)), hf_output(theirs(input_ids=ids, attention_mask=mask))
    assert gap(mine, peft_out, mask) < TOL
    assert gap(mine, base, mask) > 100 * TOL  # the LoRA is not a no-op
