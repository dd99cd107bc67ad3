"""The core API (attach, freeze, activate, count, save, load) through the bottleneck adapter."""
import copy
import json

import pytest
import torch

from minipeft import (BottleneckConfig, Encoder, activate, add_adapter, adapter_names, deactivate, delete_adapter,
                      load_adapter, parameter_summary, save_adapter, set_active, train_adapter)
from minipeft.methods.bottleneck import houlsby_count, pfeiffer_count
from helpers import TOL, run, state


# ---- counts: closed form vs numel on a BERT-base-sized encoder ------------------------------------------------

@pytest.mark.parametrize("placement,m,expected,formula", [
    ("houlsby", 64, 2_379_264, houlsby_count), ("pfeiffer", 48, 894_528, pfeiffer_count),
    ("houlsby", 8, 313_536, houlsby_count), ("ffn", 64, 1_189_632, pfeiffer_count)])
def test_counts_bert_base(bert_base_sized, placement, m, expected, formula):
    add_adapter(bert_base_sized, BottleneckConfig(placement=placement, bottleneck=m), "a")
    numel = sum(p.numel() for n, p in bert_base_sized.named_parameters() if ".deltas.a." in n)
    assert formula(768, 12, m) == expected == numel == parameter_summary(bert_base_sized, "a").adapter


def test_reduction_factor_16_is_pfeiffer_48(bert_base_sized):
    add_adapter(bert_base_sized, BottleneckConfig(placement="pfeiffer", reduction_factor=16), "a")
    assert parameter_summary(bert_base_sized, "a").adapter == 894_528


def test_summary_denominator_and_per_layer(model):
    add_adapter(model, BottleneckConfig(placement="houlsby", bottleneck=16), "a")
    s = parameter_summary(model, "a")
    assert s.backbone == sum(p.numel() for p in Encoder.from_pretrained().parameters())
    assert len(s.per_layer) == 6 and sum(s.per_layer.values()) == s.adapter == houlsby_count(384, 6, 16)
    assert s.percent == pytest.approx(100 * s.adapter / s.backbone) and "layer 5" in str(s)


# ---- behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer", "ffn"])
def test_identity_init_is_exactly_the_base_model(model, batch, placement):
    base = run(model, batch)
    add_adapter(model, BottleneckConfig(placement=placement, init="identity"), "a")
    assert torch.equal(run(model, batch), base)


def test_near_identity_init_is_close_but_not_equal(model, batch):
    base = run(model, batch)
    add_adapter(model, BottleneckConfig(init_std=1e-2), "a")
    drift = (run(model, batch) - base).abs().max()
    assert 0 < drift < 0.1


def test_deactivate_gives_the_base_output(model, batch):
    base = run(model, batch)
    add_adapter(model, BottleneckConfig(init_std=0.1), "a")
    add_adapter(model, BottleneckConfig(placement="pfeiffer", init_std=0.1), "b")
    assert not torch.allclose(run(model, batch), base)
    deactivate(model, "a"), deactivate(model, "b")
    assert torch.equal(run(model, batch), base)
    activate(model, "b")
    only_b = run(model, batch)
    set_active(model, "a", "b")
    assert not torch.equal(run(model, batch), only_b)


def test_pfeiffer_formula(model):
    """out = LN(x + h + A'(LN(x + h))) with the same pretrained LN, at the FFN site."""
    add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=8, init_std=0.1), "a")
    ffn = model.layers[0].ffn
    x = torch.randn(2, 5, 384)
    h = ffn.ffn_out(ffn.act(ffn.ffn_in(x)))
    a = ffn.deltas["a"]
    u = ffn.norm(x + h)
    expected = ffn.norm(x + h + a.up(torch.relu(a.down(u))))
    assert torch.allclose(ffn(x), expected, atol=TOL)


def test_houlsby_formula(model):
    """out = LN(x + A(h)), A(h) = h + W_up f(W_down h + b_down) + b_up, at the attention site."""
    add_adapter(model, BottleneckConfig(bottleneck=8, activation="gelu", init_std=0.1), "a")
    attn = model.layers[0].attn
    x = torch.randn(2, 5, 384)
    a = attn.deltas["a"]
    # h: the sublayer output before residual + LN
    q, k, v = (attn.split_heads(f(x)) for f in (attn.q, attn.k, attn.v))
    h = attn.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
    expected = attn.norm(x + h + a.up(torch.nn.functional.gelu(a.down(h))))
    assert torch.allclose(attn(x), expected, atol=TOL)


def test_only_adapter_parameters_train(model, batch):
    add_adapter(model, BottleneckConfig(bottleneck=8), "a")
    train_adapter(model, "a")
    before = state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltas.a." in n for n in grads)
    opt.step()
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == grads


def test_train_norms_option(model):
    add_adapter(model, BottleneckConfig(bottleneck=8), "a")
    train_adapter(model, "a", train_norms=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.attn.norm.weight" in trainable and "layers.0.attn.q.weight" not in trainable


def test_save_load_reproduces_bit_for_bit(model, minilm, batch, tmp_path):
    add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=12, activation="gelu", init_std=0.1), "task")
    expected = run(model, batch)
    save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "minipeft_adapter.json").read_text())
    assert meta["method"] == "bottleneck" and meta["backbone"]["hidden_size"] == 384
    fresh = copy.deepcopy(minilm)
    config = load_adapter(fresh, tmp_path)
    assert config.bottleneck == 12 and adapter_names(fresh) == ["task"]
    assert torch.equal(run(fresh, batch), expected)


def test_generic_modules_placement_equals_houlsby_on_transformers_bert(model, batch):
    """The generic form on transformers' BertModel (output of attention.output.dense and output.dense,
    i.e. before residual + LN) equals minipeft's Houlsby placement on the same weights."""
    from transformers import BertModel

    from minipeft.assets import minilm_path

    hf = BertModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    torch.manual_seed(0)
    add_adapter(model, BottleneckConfig(bottleneck=8, init_std=0.1), "a")
    add_adapter(hf, BottleneckConfig(placement="modules", bottleneck=8, targets=[r".*\.output\.dense"]), "a")
    ours = [m for n, m in model.named_modules() if n.endswith("deltas.a")]
    theirs = [m for n, m in hf.named_modules() if n.endswith("output_deltas.a")]
    assert len(ours) == len(theirs) == 12
    for o, t in zip(ours, theirs):
        t.load_state_dict(o.state_dict())
    with torch.no_grad():
        hf_out = hf(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (hf_out - run(model, batch))[real].abs().max() < TOL


# ---- bad input: clear errors, model unchanged -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(bottleneck=0), "bottleneck must be a positive integer"),
    (dict(bottleneck=-3), "bottleneck must be a positive integer"),
    (dict(activation="softmax"), r"unknown activation 'softmax'; allowed: \['gelu'"),
    (dict(placement="middle"), "unknown placement 'middle'; allowed"),
    (dict(init="zeros"), "unknown init"),
    (dict(bottleneck=8, reduction_factor=4), "one of bottleneck .* not both"),
    (dict(placement="modules"), "targets=.* is required")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckConfig(**kwargs)


def test_name_already_used_leaves_model_unchanged(model):
    add_adapter(model, BottleneckConfig(), "a")
    before = state(model)
    with pytest.raises(ValueError, match="an adapter named 'a' already exists"):
        add_adapter(model, BottleneckConfig(placement="pfeiffer"), "a")
    with pytest.raises(ValueError, match="must be a Python identifier"):
        add_adapter(model, BottleneckConfig(), "my.adapter")
    assert state(model).keys() == before.keys()


def test_reduction_factor_that_does_not_divide_rolls_back(model):
    before = state(model)
    with pytest.raises(ValueError, match="does not divide hidden size 384"):
        add_adapter(model, BottleneckConfig(reduction_factor=7), "a")
    assert state(model).keys() == before.keys() and adapter_names(model) == []


def test_load_into_other_hidden_size_fails_cleanly(model, bert_base_sized, tmp_path):
    add_adapter(model, BottleneckConfig(bottleneck=4), "a")
    save_adapter(model, "a", tmp_path)
    before = state(bert_base_sized)
    with pytest.raises(ValueError, match="hidden_size=384.*this model has hidden_size=768"):
        load_adapter(bert_base_sized, tmp_path)
    assert state(bert_base_sized).keys() == before.keys()


def test_load_unknown_method_or_misfit_tensors_fails_cleanly(model, minilm, tmp_path):
    add_adapter(model, BottleneckConfig(bottleneck=4), "a")
    save_adapter(model, "a", tmp_path)
    meta_file = tmp_path / "minipeft_adapter.json"
    meta = json.loads(meta_file.read_text())
    fresh = copy.deepcopy(minilm)
    meta_file.write_text(json.dumps({**meta, "method": "unknown_method"}))
    with pytest.raises(ValueError, match="unknown adapter method 'unknown_method'; registered methods"):
        load_adapter(fresh, tmp_path)
    meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], "placement": "pfeiffer"}}))
    with pytest.raises(ValueError, match="do not fit a bottleneck adapter"):
        load_adapter(fresh, tmp_path)
    assert adapter_names(fresh) == [] and state(fresh).keys() == minilm.state_dict().keys()


def test_delete_adapter(model, batch):
    base = run(model, batch)
    add_adapter(model, BottleneckConfig(init_std=0.1), "a")
    delete_adapter(model, "a")
    assert adapter_names(model) == [] and torch.equal(run(model, batch), base)
    with pytest.raises(KeyError, match="no adapter named 'a'"):
        delete_adapter(model, "a")


def test_generic_placement_refuses_containers():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="target its last layer instead"):
        add_adapter(net, BottleneckConfig(placement="modules", bottleneck=2, targets=[""], hidden_size=4), "a")
    assert adapter_names(net) == [] and len(net) == 3
