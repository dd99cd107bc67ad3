"""Serving many adapters on one backbone (``per_example``): in one batch, each example's output equals running its
own adapter alone, for every registered method (its examples, ``minipeft.core.EXAMPLES``) on every registered
backbone, padding and prefixes included; generate with the KV cache too. What cannot be routed (a merged LoRA)
is refused with the reason, and routing leaves the model exactly as it was."""
import pytest
import torch

from minipeft import (BottleneckConfig, LoRAConfig, PrefixConfig, add_adapter, generate, merge_adapter, per_example,
                      set_active)
from minipeft.backbones import REGISTRY
from minipeft.core import EXAMPLES
from helpers import assert_unchanged, build, gap, padded_tokens, perturb, run, structure, with_sources

CASES = [pytest.param(method, label, family, id=f"{method}-{label}-{family}")
         for method in EXAMPLES for label in EXAMPLES[method] for family in REGISTRY
         if family not in EXAMPLES[method][label].refuses]  # (BitFit refuses the bias-free Llama)
# one example's adapter computed on a gathered sub-batch vs on the whole batch: the same sums over other GEMM
# blockings, fp32 rounding only (helpers.TOL's docstring); the bounds: 1e-5 on the encoder, 1e-4 decoders
BOUND = {"bert": 1e-5, "llama": 1e-4, "gpt2": 1e-4}


def four_rows(model):
    return padded_tokens(model.cfg, 10, (0, 4, 7, 2), left=hasattr(model, "new_cache"))


def assert_each_row_equals_its_adapter_alone(model, batch, names, family):
    before = structure(model)
    mixed = run_routed(model, batch, names)
    assert_unchanged(model, before)  # routing sets nothing on the model (active flags included)
    mask = batch["attention_mask"]
    for name in set(names):
        set_active(model, *([] if name == "base" else [name]))
        rows = [i for i, n in enumerate(names) if n == name]
        assert gap(mixed[rows], run(model, batch)[rows], mask[rows]) < BOUND[family], name
    return mixed


def run_routed(model, batch, names):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], adapter_names=names)


@pytest.mark.parametrize("method,label,family", CASES)
def test_each_example_equals_its_adapter_alone(method, label, family):
    ex = EXAMPLES[method][label]
    model = with_sources(family, ex)
    for name, seed in (("a", 3), ("b", 4)):
        add_adapter(model, ex.config(), name)
        perturb(model, name, seed=seed)
    batch = four_rows(model)
    mixed = assert_each_row_equals_its_adapter_alone(model, batch, ["a", "base", "b", "a"], family)
    set_active(model)
    assert gap(mixed[[0]], run(model, batch)[[0]], batch["attention_mask"][[0]]) > 1e-3  # "a" does something


@pytest.mark.parametrize("family", list(REGISTRY))
def test_a_batch_mixes_methods_and_prefix_lengths(family):
    """LoRA, a bottleneck adapter and two prefixes of different lengths (padded to the longest, each row attending
    its own positions only) in one batch."""
    model = build(family)
    add_adapter(model, LoRAConfig(r=4), "lora")
    add_adapter(model, BottleneckConfig(bottleneck=8), "adapter")
    add_adapter(model, PrefixConfig(length=3, reparameterize=False), "short")
    add_adapter(model, PrefixConfig(length=6, reparameterize=False), "long")
    perturb(model)
    batch = padded_tokens(model.cfg, 10, (0, 4, 7, 2, 1, 3), left=hasattr(model, "new_cache"))
    assert_each_row_equals_its_adapter_alone(model, batch, ["long", "lora", "base", "short", "adapter", "long"],
                                             family)


@pytest.mark.parametrize("family", [f for f in REGISTRY if hasattr(REGISTRY[f].cls, "new_cache")])
def test_generate_continues_each_prompt_with_its_own_adapter(family):
    """generate(adapter_names=...) with the KV cache gives each prompt the tokens its adapter alone gives it."""
    model = build(family)
    add_adapter(model, LoRAConfig(r=4, targets=["q", "v", "o"]), "lora")
    add_adapter(model, PrefixConfig(length=4, reparameterize=False), "prefix")
    perturb(model, scale=0.5)
    torch.manual_seed(7)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,)).tolist() for n in (5, 9, 3, 7)]
    names = ["prefix", "lora", "base", "lora"]
    mixed = generate(model, prompts, max_new_tokens=6, stop_at_eos=False, adapter_names=names).tokens
    for name in set(names):
        set_active(model, *([] if name == "base" else [name]))
        alone = generate(model, prompts, max_new_tokens=6, stop_at_eos=False).tokens
        assert [mixed[i] for i, n in enumerate(names) if n == name] == [alone[i] for i, n in enumerate(names)
                                                                        if n == name], name


def test_what_cannot_be_routed_is_refused_and_changes_nothing():
    model = build("bert")
    add_adapter(model, LoRAConfig(r=4), "a")
    add_adapter(model, BottleneckConfig(bottleneck=8), "b")
    perturb(model)
    batch = four_rows(model)
    before = structure(model)
    with pytest.raises(KeyError, match="no adapter named 'typo'.*adapters: \\['a', 'b'\\] or 'base'"):
        run_routed(model, batch, ["a", "typo", "b", "base"])
    with pytest.raises(ValueError, match="the batch has 4 examples but adapter_names names 3"):
        run_routed(model, batch, ["a", "b", "base"])
    for bad in ([], "a", ["a", None, "b", "a"]):
        with pytest.raises(ValueError, match="one adapter name \\(or 'base'\\) per example"):
            run_routed(model, batch, bad)
    assert_unchanged(model, before)
    merge_adapter(model, "a")
    merged = structure(model)
    with pytest.raises(ValueError, match="adapter 'a' is merged into its layer's weight.*unmerge it first"):
        run_routed(model, batch, ["b", "b", "base", "b"])
    with pytest.raises(ValueError, match="merged"), per_example(model, ["b"]):
        pass
    assert_unchanged(model, merged)
