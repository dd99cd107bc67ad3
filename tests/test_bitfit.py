"""BitFit (Ben Zaken et al. 2022): the adapter h + Δb is the model with b + Δb (values and gradients), its closed
form L·(7d + f) + d = numel (tiny BERT and GPT-2, MiniLM, BERT-base's 102,144), the deployment fold, the recipe
trains the biases and the head only, and a model without biases refuses it with the reason, unchanged. What every
method does on every backbone is test_conformance.py."""
import copy

import pytest
import torch

from minipeft import add_adapter, for_inference, parameter_summary
from minipeft.api import apply_recipe
from minipeft.backbones import REGISTRY
from minipeft.core import RECIPES, adapter_modules
from minipeft.methods.bitfit import BiasDelta, BitFitConfig, bitfit_count
from helpers import TOL, assert_unchanged, build, gap, padded_tokens, perturb, run, structure


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_adapter_is_the_model_with_shifted_biases(family):
    """h + Δb on every biased module = the base model whose biases are b + Δb; the gradient reaching Δb is the one
    reaching b there (BitFit trains exactly those numbers)."""
    model = build(family)
    add_adapter(model, BitFitConfig(), "a")
    perturb(model, "a")
    shifted = build(family)
    modules = dict(shifted.named_modules())
    deltas = {p.rsplit(".output_deltas.", 1)[0]: m for p, m in adapter_modules(model, "a").items()}
    with torch.no_grad():
        for path, m in deltas.items():
            modules[path].bias += m.delta
    batch = padded_tokens(model.cfg, 8, (0, 3), left=family != "bert")
    mask = batch["attention_mask"]
    assert gap(run(model, batch), run(shifted, batch), mask) < TOL
    for m in (model, shifted):
        m(batch["input_ids"], mask)[mask.bool()].pow(2).mean().backward()
    for path, m in deltas.items():
        assert torch.allclose(m.delta.grad, modules[path].bias.grad, rtol=1e-4, atol=1e-7), path


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_bias_count_is_the_closed_form(family):
    """L·(7d + f) + d on the tiny configs: q k v o, the FFN's two linears, two norms per layer, one more norm."""
    model = build(family)
    add_adapter(model, BitFitConfig(), "a")
    cfg = model.cfg
    numel = sum(p.numel() for m in adapter_modules(model, "a").values() for p in m.parameters())
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter))
    assert numel == biases == bitfit_count(cfg.hidden_size, cfg.num_layers, cfg.intermediate_size)
    assert parameter_summary(model, "a").stored == numel


def test_minilm_and_bert_base_counts(minilm, bert_base_sized):
    model = copy.deepcopy(minilm)
    add_adapter(model, BitFitConfig(), "a")
    assert parameter_summary(model, "a").adapter == bitfit_count(384, 6, 1536) == 25_728
    add_adapter(bert_base_sized, BitFitConfig(), "a")
    assert parameter_summary(bert_base_sized, "a").adapter == bitfit_count(768, 12, 3072) == 102_144


def test_deploy_folds_delta_b_into_the_biases():
    model = build("bert")
    add_adapter(model, BitFitConfig(targets=["q", "ffn_in"]), "a")
    perturb(model, "a")
    batch = padded_tokens(model.cfg, 8, (0, 3), left=False)
    expected, bias = run(model, batch), model.layers[0].attn.q.bias.clone()
    delta = model.layers[0].attn.q.output_deltas["a"].delta.detach().clone()
    for_inference(model)
    assert not any(isinstance(m, BiasDelta) for m in model.modules())
    assert not hasattr(model.layers[0].attn.q, "output_deltas")  # a plain Linear again
    assert torch.allclose(model.layers[0].attn.q.bias, bias + delta)
    assert gap(run(model, batch), expected, batch["attention_mask"]) < TOL


def test_the_recipe_trains_the_biases_and_the_head_only(minilm):
    from minipeft.lab.train import SequenceClassifier

    model = SequenceClassifier(copy.deepcopy(minilm), num_labels=2)
    apply_recipe(model, RECIPES["bitfit"])
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".output_deltas.bitfit." in n or not n.startswith("encoder.") for n in trained)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")) \
        == 25_728


def test_a_model_without_biases_refuses_it_and_says_why():
    model = build("llama")
    before = structure(model)
    with pytest.raises(ValueError, match="has no bias.*bias-free.*nothing to train"):
        add_adapter(model, BitFitConfig(), "a")
    with pytest.raises(ValueError, match="match only modules with no bias"):
        add_adapter(model, BitFitConfig(targets=["q", "ffn_in"]), "a")
    assert_unchanged(model, before)


@pytest.mark.parametrize("targets", [[], [""], [3]])
def test_bad_targets_say_what_is_allowed(targets):
    with pytest.raises(ValueError, match="None .every bias. or a non-empty list"):
        BitFitConfig(targets=targets)


def test_every_registered_backbone_with_biases_accepts_it():
    """Every backbone either has biases BitFit trains or is named in the conformance example's refusals."""
    from minipeft.core import EXAMPLES

    refuses = EXAMPLES["bitfit"]["every bias"].refuses
    for family in REGISTRY:
        model = build(family)
        has = any(isinstance(getattr(m, "bias", None), torch.nn.Parameter) for m in model.modules())
        assert has != (family in refuses), family
