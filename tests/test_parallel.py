"""Parallel and scaled parallel adapters (He et al. 2022): counts, formula, init, training, save/load, errors."""
import copy
import json

import pytest
import torch
from torch import nn

from minipeft import add_adapter, adapter_names, load_adapter, parameter_summary, save_adapter, train_adapter
from minipeft.api import METHODS
from minipeft.methods.bottleneck import pfeiffer_count
from minipeft.methods.parallel import (FusedParallelFFN, ParallelAdapterConfig, ScaledParallelAdapterConfig,
                                       fuse_parallel_ffn, parallel_count, rank_for_budget)
from helpers import TOL, gap, run, state


def randomise(model, name):
    """Give an adapter non-zero weights (it starts at Δh = 0) so that formulas are actually exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"deltas.{name}." in n and not n.endswith("scale"):
                p.normal_(0, 0.05)


# ---- counts: closed form vs numel on a BERT-base-sized encoder ------------------------------------------------

@pytest.mark.parametrize("placement,r,scale,expected", [
    ("ffn", 512, 4.0, 9_452_544), ("ffn", 16, 1.0, 304_320), ("attn", 16, 1.0, 304_320),
    ("both", 16, 1.0, 608_640), ("ffn", 16, "learned", 304_320 + 12), ("both", 8, "learned", 2 * (12 * 13_064 + 12))])
def test_counts_bert_base(bert_base_sized, placement, r, scale, expected):
    add_adapter(bert_base_sized, ParallelAdapterConfig(r=r, placement=placement, scale=scale), "a")
    numel = sum(p.numel() for n, p in bert_base_sized.named_parameters() if ".deltas.a." in n)
    sites = 2 if placement == "both" else 1
    formula = parallel_count(768, 12, r, sites=sites, learned=scale == "learned")
    assert formula == expected == numel == parameter_summary(bert_base_sized, "a").adapter


def test_same_count_as_pfeiffer_at_equal_size():
    """A parallel adapter at r has exactly the parameters of a Pfeiffer adapter at m = r: the fair comparison."""
    assert parallel_count(384, 6, 64) == pfeiffer_count(384, 6, 64) == 297_600


def test_rank_for_budget_two_percent():
    budget = int(0.02 * 22_713_216)
    r = rank_for_budget(384, 6, budget)
    assert parallel_count(384, 6, r) <= budget < parallel_count(384, 6, r + 1)
    with pytest.raises(ValueError, match="does not fit even r=1"):
        rank_for_budget(384, 6, 100)


# ---- behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [ParallelAdapterConfig(placement="both"), ScaledParallelAdapterConfig(),
                                    ParallelAdapterConfig(scale="learned")])
def test_identity_at_init(model, batch, config):
    base = run(model, batch)
    add_adapter(model, config, "a")
    assert torch.equal(run(model, batch), base)
    a = model.layers[0].ffn.deltas["a"]
    assert torch.count_nonzero(a.up.weight) == 0 and torch.count_nonzero(a.down.weight) > 0
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0


def test_init_is_kaiming_uniform():
    torch.manual_seed(0)
    a = ParallelAdapterConfig(r=512, scale=4.0)
    model_d = 768
    from minipeft.methods.parallel import ParallelAdapter

    w = ParallelAdapter("a", model_d, 512, a).down.weight
    bound = 1 / model_d ** 0.5  # kaiming_uniform(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, "learned"])
def test_ffn_formula(model, scale):
    """out = LN(x + h + s·(W_up relu(W_down x + b_down) + b_up)), x the FFN input, h its output."""
    add_adapter(model, ParallelAdapterConfig(r=8, scale=scale, scale_init=1.5), "a")
    randomise(model, "a")
    ffn, a = model.layers[0].ffn, model.layers[0].ffn.deltas["a"]
    s = 1.5 if scale == "learned" else scale
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        h = ffn.ffn_out(ffn.act(ffn.ffn_in(x)))
        expected = ffn.norm(x + h + s * (a.up(torch.relu(a.down(x)))))
        assert torch.allclose(ffn(x), expected, atol=TOL)


def test_attention_site_reads_the_attention_input(model):
    add_adapter(model, ParallelAdapterConfig(r=8, placement="attn", scale=2.0), "a")
    randomise(model, "a")
    attn, a = model.layers[0].attn, model.layers[0].attn.deltas["a"]
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        q, k, v = (attn.split_heads(f(x)) for f in (attn.q, attn.k, attn.v))
        h = attn.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        expected = attn.norm(x + h + 2.0 * a.up(torch.relu(a.down(x))))
        assert torch.allclose(attn(x), expected, atol=TOL)


def test_reads_x_not_h(model):
    """Changing h with x fixed leaves Δh unchanged (a sequential adapter's Δh would change)."""
    add_adapter(model, ScaledParallelAdapterConfig(r=8), "a")
    randomise(model, "a")
    a, norm = model.layers[0].ffn.deltas["a"], model.layers[0].ffn.norm
    x, h1, h2 = torch.randn(3, 2, 5, 384).unbind(0)
    with torch.no_grad():
        assert torch.equal(a(x, h1, norm), a(x, h2, norm))
        assert not torch.allclose(a(x, h1, norm), a(h1, h1, norm))


def test_scale_is_linear(model, batch):
    """s = 4 gives four times the Δh of s = 1 (same weights)."""
    add_adapter(model, ParallelAdapterConfig(r=8, scale=1.0), "one")
    add_adapter(model, ScaledParallelAdapterConfig(r=8), "four")
    randomise(model, "one")
    a1, a4 = model.layers[2].ffn.deltas["one"], model.layers[2].ffn.deltas["four"]
    a4.load_state_dict(a1.state_dict())
    x = torch.randn(1, 3, 384)
    with torch.no_grad():
        assert torch.allclose(a4(x, None, None), 4 * a1(x, None, None), atol=TOL)
    assert float(a4.scale) == 4.0 and "scale" not in a4.state_dict()  # a fixed s is not a parameter


@pytest.mark.parametrize("scale", [4.0, "learned"])
def test_only_adapter_parameters_train(model, batch, scale):
    add_adapter(model, ParallelAdapterConfig(r=8, scale=scale), "a")
    train_adapter(model, "a")
    before = state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # step 1 moves W_up away from 0; then every adapter tensor (and a learned s) gets a gradient
        model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
        opt.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltas.a." in n for n in grads)
    assert ("layers.0.ffn.deltas.a.scale" in grads) == (scale == "learned")
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == grads


@pytest.mark.parametrize("config", [ScaledParallelAdapterConfig(r=12, placement="both"),
                                    ParallelAdapterConfig(r=12, scale="learned", activation="gelu")])
def test_save_load_reproduces_bit_for_bit(model, minilm, batch, tmp_path, config):
    add_adapter(model, config, "task")
    randomise(model, "task")
    if config.learned:
        with torch.no_grad():
            model.layers[1].ffn.deltas["task"].scale.fill_(2.5)
    expected = run(model, batch)
    save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "minipeft_adapter.json").read_text())
    assert meta["method"] == config.method and meta["config"]["scale"] == config.scale
    fresh = copy.deepcopy(minilm)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded == config and adapter_names(fresh) == ["task"]
    assert torch.equal(run(fresh, batch), expected)


def test_registered_methods():
    assert METHODS["parallel"] is ParallelAdapterConfig and METHODS["scaled_parallel"] is ScaledParallelAdapterConfig
    assert ScaledParallelAdapterConfig().scale == 4.0 and ParallelAdapterConfig().scale == 1.0


@pytest.mark.parametrize("scale", [4.0, "learned"])
def test_fused_ffn_equals_the_adapted_model(model, batch, scale):
    """Folding the adapter into the FFN's GEMMs (width f + r) changes nothing but the speed."""
    add_adapter(model, ParallelAdapterConfig(r=16, scale=scale, scale_init=2.0), "a")
    randomise(model, "a")
    expected = run(model, batch)
    fuse_parallel_ffn(model, "a")
    assert all(isinstance(layer.ffn, FusedParallelFFN) for layer in model.layers)
    assert model.layers[0].ffn.w_in.shape == (1536 + 16, 384)
    assert gap(run(model, batch), expected, batch["attention_mask"]) < TOL
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()(batch["input_ids"])


def test_fuse_refuses_what_it_cannot_fuse(model):
    with pytest.raises(ValueError, match="no parallel adapter named 'a'"):
        fuse_parallel_ffn(model, "a")
    add_adapter(model, ParallelAdapterConfig(r=4), "a")
    add_adapter(model, ParallelAdapterConfig(r=4), "b")
    with pytest.raises(ValueError, match=r"also has active modules \['b'\]"):
        fuse_parallel_ffn(model, "a")


# ---- generic placement on any module ---------------------------------------------------------------------------

def test_generic_modules_on_an_mlp_block():
    """On a module whose input is x and output h (an FFN block, e.g. Llama's ``mlp``): out = h + s·A(x)."""
    class MLP(nn.Module):  # not an nn.Sequential: a hook's ModuleDict would become one of its layers
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 16)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp, self.proj = MLP(), nn.Linear(16, 6)

        def forward(self, x):
            return self.proj(self.mlp(x))

    torch.manual_seed(0)
    net = Net()
    add_adapter(net, ParallelAdapterConfig(r=4, scale=4.0, placement="modules", targets=["mlp", "proj"]), "a")
    mlp_a, proj_a = net.mlp.output_deltas["a"], net.proj.output_deltas["a"]
    assert (mlp_a.down.in_features, mlp_a.up.out_features) == (16, 16)
    assert (proj_a.down.in_features, proj_a.up.out_features) == (16, 6)
    assert parameter_summary(net, "a").adapter == (2 * 4 * 16 + 4 + 16) + (4 * 16 + 4 + 4 * 6 + 6)
    with torch.no_grad():
        for p in (mlp_a.up.weight, proj_a.up.weight):
            p.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        h = net.mlp.fc2(nn.functional.gelu(net.mlp.fc1(x))) + 4.0 * mlp_a.up(torch.relu(mlp_a.down(x)))
        expected = nn.functional.linear(h, net.proj.weight, net.proj.bias) + 4.0 * proj_a.up(torch.relu(proj_a.down(h)))
        assert torch.allclose(net(x), expected, atol=TOL)


# ---- bad input: clear errors, model unchanged -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), "r .* must be a positive integer, got 0"),
    (dict(r=2.5), "r .* must be a positive integer"),
    (dict(scale=0), "scale must be a positive number or 'learned', got 0"),
    (dict(scale=-4.0), "scale must be a positive number or 'learned'"),
    (dict(scale="learnable"), "scale must be a positive number or 'learned', got 'learnable'"),
    (dict(scale=float("nan")), "scale must be a positive number"),
    (dict(scale=True), "scale must be a positive number"),
    (dict(scale_init=0.0), "scale_init must be a positive number"),
    (dict(activation="softmax"), r"unknown activation 'softmax'; allowed: \['gelu'"),
    (dict(placement="middle"), r"unknown placement 'middle'; allowed: \('ffn', 'attn', 'both', 'modules'\)"),
    (dict(placement="modules"), "targets=.* is required"),
    (dict(targets=["ffn_in"]), "only allowed there")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelAdapterConfig(**kwargs)


def test_failed_attach_leaves_model_unchanged(model):
    before = state(model)
    with pytest.raises(ValueError, match="no Module in the model matches target"):
        add_adapter(model, ParallelAdapterConfig(placement="modules", targets=["nowhere"]), "a")
    with pytest.raises(ValueError, match="cannot infer the input/output width of LayerNorm"):
        add_adapter(model, ParallelAdapterConfig(placement="modules", targets=[r"layers\.0\.ffn\.norm"]), "a")
    with pytest.raises(TypeError, match="attaches to a minipeft backbone"):
        add_adapter(nn.Sequential(nn.Linear(4, 4)), ParallelAdapterConfig(), "a")
    assert adapter_names(model) == [] and state(model).keys() == before.keys()


def test_load_into_other_hidden_size_fails_cleanly(model, bert_base_sized, tmp_path):
    add_adapter(model, ScaledParallelAdapterConfig(r=4), "a")
    save_adapter(model, "a", tmp_path)
    before = state(bert_base_sized)
    with pytest.raises(ValueError, match="hidden_size=384.*this model has hidden_size=768"):
        load_adapter(bert_base_sized, tmp_path)
    assert adapter_names(bert_base_sized) == [] and state(bert_base_sized).keys() == before.keys()
