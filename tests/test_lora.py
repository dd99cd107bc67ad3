"""LoRA (Hu et al. 2021): counts, formula, training, exact merging, merge-and-unload, save/load, peft equivalence."""
import copy
import math

import pytest
import torch

from minipeft import (Encoder, activate, add_adapter, deactivate, delete_adapter, load_adapter, parameter_summary,
                      save_adapter, set_active, train_adapter)
from minipeft.api import AdapterModule
from minipeft.methods.lora import (LoRAConfig, LoRALinear, lora_count, lora_count_encoder, lora_layers,
                                   merge_adapter, merge_and_unload, unmerge_adapter)
from helpers import TOL, run, state


def gap(a, b, batch):
    """Largest difference at real tokens (padded positions are undefined and amplify fp32 rounding)."""
    return (a - b)[batch["attention_mask"].bool()].abs().max()


def randomise_B(model, name="a", std=0.05, seed=0):
    """B = 0 at init makes ΔW = 0; give it values so merging has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model, name).values():
            m.B.copy_(torch.randn(m.B.shape, generator=g) * std)


# ---- counts ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r,targets,expected", [
    (8, ["q", "v"], 294_912), (1, ["q", "v"], 36_864), (4, ["q", "v"], 147_456), (16, ["q", "v"], 589_824),
    (4, ["q", "k", "v", "o"], 294_912), (2, ["ffn_in", "ffn_out"], 12 * 2 * 2 * (768 + 3072))])
def test_counts_bert_base(bert_base_sized, r, targets, expected):
    add_adapter(bert_base_sized, LoRAConfig(r=r, targets=targets), "a")
    numel = sum(p.numel() for n, p in bert_base_sized.named_parameters() if ".output_deltas.a." in n)
    assert numel == expected == lora_count_encoder(bert_base_sized.cfg, r, targets)
    assert parameter_summary(bert_base_sized, "a").adapter == expected


def test_closed_form_bert_base_q_v():
    """L · |targets| · r(d_in + d_out) = 12 · 2 · 8 · 1536 (Hu et al. 2021, §5.2: 0.3M on RoBERTa-base)."""
    assert lora_count(8, 768, 768, n_targets=2, num_layers=12) == 294_912


def test_summary_on_minilm(model):
    add_adapter(model, LoRAConfig(r=8), "a")
    s = parameter_summary(model, "a")
    assert s.backbone == sum(p.numel() for p in Encoder.from_pretrained().parameters())
    assert len(s.per_layer) == 6 and s.adapter == lora_count(8, 384, 384, 2, 6) == 73_728


# ---- config validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "r .the rank. must be a positive integer"), ({"r": 2.5}, "positive integer"),
    ({"alpha": 0}, "alpha must be a number > 0"), ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"init": "zeros"}, "unknown init 'zeros'; allowed"), ({"targets": []}, "targets must be a non-empty list")])
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_unknown_target_leaves_the_model_unchanged(model, batch):
    before, out = state(model), run(model, batch)
    with pytest.raises(ValueError, match="no Linear in the model matches target 'query'.*available names"):
        add_adapter(model, LoRAConfig(targets=["query"]), "a")
    assert list(model.state_dict()) == list(before) and torch.equal(run(model, batch), out)


# ---- the forward ----------------------------------------------------------------------------------------------

def test_B_zero_init_is_exactly_the_base_model(model, batch):
    base = run(model, batch)
    add_adapter(model, LoRAConfig(r=8, targets=["q", "k", "v", "o", "ffn_in", "ffn_out"]), "a")
    assert torch.equal(run(model, batch), base)
    a = model.layers[0].attn.q.output_deltas["a"].A
    bound = 1 / math.sqrt(384)  # kaiming_uniform_(a=√5) on fan_in 384: U(-1/√fan_in, 1/√fan_in)
    assert a.abs().max() <= bound and a.std() > 0.5 * bound / math.sqrt(3)


@pytest.mark.parametrize("rslora", [False, True])
def test_formula_h_equals_W0x_plus_scaled_BAx(model, rslora):
    add_adapter(model, LoRAConfig(r=4, alpha=8, rslora=rslora), "a")
    randomise_B(model)
    q = model.layers[0].attn.q
    lora = q.output_deltas["a"]
    scale = 8 / (math.sqrt(4) if rslora else 4)  # α/r, or α/√r (rsLoRA)
    assert lora.scale == scale
    x = torch.randn(2, 5, 384)
    expected = x @ q.weight.T + q.bias + scale * (x @ lora.A.T @ lora.B.T)  # W0x + b + (α/r)BAx
    assert torch.allclose(q(x), expected, atol=TOL)


def test_gaussian_init_and_dropout(model):
    add_adapter(model, LoRAConfig(r=4, init="gaussian", dropout=0.5), "a")
    lora = model.layers[0].attn.q.output_deltas["a"]
    assert abs(lora.A.std().item() - 1 / 4) < 0.02
    randomise_B(model)
    x = torch.randn(3, 7, 384)
    lora.train()
    assert not torch.equal(lora(x), lora(x))  # dropout on the LoRA input while training
    lora.eval()
    assert torch.equal(lora(x), lora(x))


def test_only_A_B_and_head_train(model, batch):
    add_adapter(model, LoRAConfig(r=4), "a")
    train_adapter(model, "a")
    before = state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".output_deltas.a." in n for n in grads) and len(grads) == 6 * 2 * 2
    opt.step()
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == grads


def test_two_adapters_on_one_layer_and_deactivation(model, batch):
    base = run(model, batch)
    add_adapter(model, LoRAConfig(r=2), "a")
    add_adapter(model, LoRAConfig(r=4, targets=["v", "o"]), "b")
    randomise_B(model, "a"), randomise_B(model, "b", seed=1)
    both = run(model, batch)
    deactivate(model, "a")
    only_b = run(model, batch)
    assert not torch.allclose(only_b, both) and not torch.allclose(only_b, base)
    set_active(model)
    assert torch.equal(run(model, batch), base)


# ---- merging --------------------------------------------------------------------------------------------------

@pytest.fixture
def trained(model):
    add_adapter(model, LoRAConfig(r=8, alpha=16, targets=["q", "k", "v", "o", "ffn_in", "ffn_out"]), "a")
    randomise_B(model)
    return model


def test_merged_equals_unmerged_and_unmerge_restores_W0(trained, batch):
    w0 = state(trained)
    unmerged = run(trained, batch)
    merge_adapter(trained, "a")
    assert all(m.merged for m in lora_layers(trained, "a").values())
    assert not torch.equal(trained.layers[0].attn.q.weight, w0["layers.0.attn.q.weight"])
    assert gap(run(trained, batch), unmerged, batch) < TOL
    unmerge_adapter(trained, "a")
    assert max((v - w0[k]).abs().max() for k, v in trained.state_dict().items()) < 1e-6
    assert gap(run(trained, batch), unmerged, batch) < TOL


def test_merge_twice_and_unmerge_unmerged_are_errors_weights_untouched(trained):
    w0 = state(trained)
    with pytest.raises(RuntimeError, match="not merged .* nothing to unmerge"):
        trained.layers[0].attn.q.output_deltas["a"].unmerge()
    with pytest.raises(RuntimeError, match="LoRA 'a' is not merged"):
        unmerge_adapter(trained, "a")
    assert all(torch.equal(v, w0[k]) for k, v in trained.state_dict().items())
    trained.layers[0].attn.q.output_deltas["a"].merge()  # one layer merged ...
    merged = state(trained)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapter(trained, "a")  # ... so the whole adapter refuses, nothing else changes
    with pytest.raises(RuntimeError, match="already merged into this layer; merging again would add ΔW twice"):
        trained.layers[0].attn.q.output_deltas["a"].merge()
    assert all(torch.equal(v, merged[k]) for k, v in trained.state_dict().items())
    with pytest.raises(KeyError, match="no LoRA adapter named 'b'"):
        merge_adapter(trained, "b")


def test_training_a_merged_layer_is_refused(trained, batch):
    train_adapter(trained, "a")
    merge_adapter(trained, "a")
    trained.train()
    with pytest.raises(RuntimeError, match="merged .* cannot be trained .*unmerge"):
        trained(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():  # inference in train mode is fine
        trained(batch["input_ids"], batch["attention_mask"])
    unmerge_adapter(trained, "a")
    trained(batch["input_ids"], batch["attention_mask"]).sum().backward()  # and unmerged it trains again


def test_deactivating_a_merged_adapter_unmerges_it(trained, batch, minilm):
    base = run(minilm, batch)
    merge_adapter(trained, "a")
    deactivate(trained, "a")
    assert not any(m.merged for m in lora_layers(trained, "a").values())
    assert gap(run(trained, batch), base, batch) < TOL
    activate(trained, "a")
    assert not torch.allclose(run(trained, batch), base, atol=1e-3)



def test_deleting_a_merged_adapter_restores_W0(trained, minilm):
    merge_adapter(trained, "a")
    delete_adapter(trained, "a")
    assert max((v - minilm.state_dict()[k]).abs().max() for k, v in trained.state_dict().items()) < 1e-6

def test_merge_and_unload_gives_a_plain_model(trained, batch, minilm):
    expected = run(trained, batch)
    add_adapter(trained, LoRAConfig(r=2), "other")
    randomise_B(trained, "other", seed=3)
    deactivate(trained, "other")
    plain = merge_and_unload(trained)  # merges the active LoRA ("a"), drops every LoRA module
    assert plain is trained
    assert not any(isinstance(m, AdapterModule) for m in plain.modules())
    assert all(not m._forward_hooks and not hasattr(m, "output_deltas") for m in plain.modules())
    assert list(plain.state_dict()) == list(minilm.state_dict())
    assert gap(run(plain, batch), expected, batch) < TOL


def test_merge_and_unload_named_adapter_keeps_other_methods(model, batch):
    from minipeft import BottleneckConfig

    add_adapter(model, LoRAConfig(r=4), "a")
    add_adapter(model, BottleneckConfig(placement="modules", targets=["q"], init_std=0.1), "bn")
    randomise_B(model)
    expected = run(model, batch)
    merge_and_unload(model, "a")
    assert "bn" in model.layers[0].attn.q.output_deltas and "a" not in model.layers[0].attn.q.output_deltas
    assert not hasattr(model.layers[0].attn.v, "output_deltas")
    assert gap(run(model, batch), expected, batch) < TOL


# ---- save / load ----------------------------------------------------------------------------------------------

def test_save_load_reproduces_bit_for_bit(trained, minilm, batch, tmp_path):
    expected = run(trained, batch)
    save_adapter(trained, "a", tmp_path)
    fresh = copy.deepcopy(minilm)
    config = load_adapter(fresh, tmp_path)
    assert isinstance(config, LoRAConfig) and config.r == 8 and config.targets == ["q", "k", "v", "o", "ffn_in",
                                                                                  "ffn_out"]
    assert torch.equal(run(fresh, batch), expected)


def test_module_class_and_deepcopy(trained):
    lora = trained.layers[2].ffn.ffn_out.output_deltas["a"]
    assert isinstance(lora, LoRALinear) and lora.base_layer is trained.layers[2].ffn.ffn_out
    assert "base_layer" not in dict(lora.named_modules())  # the base weight is not part of the adapter
    twin = copy.deepcopy(trained)
    assert twin.layers[2].ffn.ffn_out.output_deltas["a"].base_layer is twin.layers[2].ffn.ffn_out


# ---- equivalence with peft ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_peft():
    """transformers' BertModel (MiniLM) with peft LoRA r=8, α=16 on query/value, B non-zero random."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    from minipeft.assets import minilm_path

    hf = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    ours = Encoder.from_hf(hf)  # the same pretrained weights, before peft touches the model
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                               lora_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model, ours


def hf_to_ours_lora(peft_model, ours, name="a"):
    """Copy peft's lora_A / lora_B (as nn.Linear weights: (r, d_in), (d_out, r)) into our A, B."""
    peft_to_ours = {"attention.self.query": "attn.q", "attention.self.value": "attn.v"}
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" not in n:
                continue
            i = int(n.split("encoder.layer.")[1].split(".")[0])
            part = next(ours_part for hf, ours_part in peft_to_ours.items() if hf in n)
            target = ours.get_submodule(f"layers.{i}.{part}").output_deltas[name]
            (target.A if "lora_A" in n else target.B).copy_(p)


def real_tokens(t, mask):
    return t[mask.bool()]  # (N_real, d): padded positions are undefined in both implementations


def test_equal_to_peft_on_transformers_bert(hf_peft, batch):
    peft_model, ours = hf_peft
    ours = copy.deepcopy(ours)
    add_adapter(ours, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "a")
    hf_to_ours_lora(peft_model, ours)
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mine = run(ours, batch)
    mask = batch["attention_mask"]
    assert (real_tokens(mine, mask) - real_tokens(theirs, mask)).abs().max() < TOL
    no_lora = run(hf_peft[1], batch)  # the LoRA does change the output: the test is not vacuous
    assert (real_tokens(mine, mask) - real_tokens(no_lora, mask)).abs().max() > 1e-3


def test_generic_targets_on_a_transformers_model_equal_peft(hf_peft, batch):
    """minipeft's LoRA attached to transformers' BertModel by name (query, value) equals peft's LoRA."""
    from transformers import BertModel

    from minipeft.assets import minilm_path

    peft_model, _ = hf_peft
    hf = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    add_adapter(hf, LoRAConfig(r=8, alpha=16, targets=["query", "value"]), "a")
    layers = lora_layers(hf, "a")
    assert len(layers) == 12
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                path = n.split("base_model.model.")[1].split(".lora_")[0]
                (layers[f"{path}.output_deltas.a"].A if "lora_A" in n else layers[f"{path}.output_deltas.a"].B).copy_(p)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mine, theirs = hf(**kw).last_hidden_state, peft_model(**kw).last_hidden_state
    mask = batch["attention_mask"]
    assert (real_tokens(mine, mask) - real_tokens(theirs, mask)).abs().max() < TOL
    merge_and_unload(hf)
    assert "lora" not in " ".join(n for n, _ in hf.named_modules()).lower() and not hasattr(
        hf.encoder.layer[0].attention.self.query, "output_deltas")
    with torch.no_grad():
        assert (real_tokens(hf(**kw).last_hidden_state, mask) - real_tokens(theirs, mask)).abs().max() < TOL
