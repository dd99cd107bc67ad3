"""PHM layers, PHM-Adapter, Compacter and Compacter++ (Karimi Mahabadi et al. 2021)."""
import copy
import json

import pytest
import torch
from torch import nn

from minipeft import (Encoder, add_adapter, adapter_names, delete_adapter, load_adapter, parameter_summary,
                      save_adapter, train_adapter)
from minipeft.methods.bottleneck import houlsby_count, pfeiffer_count
from minipeft.methods.compacter import (CompacterConfig, CompacterPPConfig, PHMAdapterConfig, compacter_count,
                                        paper_compacter_count, paper_phm_adapter_count, phm_adapter_count)
from minipeft.methods.phm import PHMLinear, kron_sum, kron_sum_reference, phm_apply_factored, phm_layer_count
from helpers import TOL, run

CONFIGS = {"phm_adapter": PHMAdapterConfig, "compacter": CompacterConfig, "compacter_pp": CompacterPPConfig}


def phm_layers(model, name):
    return [m for n, m in model.named_modules() if isinstance(m, PHMLinear) and f".deltas.{name}." in n + "."]


# ---- the PHM layer against the definition -------------------------------------------------------------------

@pytest.mark.parametrize("n,p,q", [(2, 3, 5), (4, 6, 96), (4, 96, 6), (3, 1, 1), (1, 4, 7)])
def test_kron_sum_equals_explicit_torch_kron(n, p, q):
    torch.manual_seed(n + p + q)
    A, B = torch.randn(n, n, n, dtype=torch.float64), torch.randn(n, p, q, dtype=torch.float64)
    assert torch.allclose(kron_sum(A, B), kron_sum_reference(A, B), atol=1e-12, rtol=0)
    assert kron_sum(A, B).shape == (n * p, n * q)


@pytest.mark.parametrize("rank", [None, 1, 3])
def test_phm_linear_equals_reference(rank):
    torch.manual_seed(0)
    layer = PHMLinear(384, 24, n=4, rank=rank).double()
    with torch.no_grad():
        layer.bias.normal_()
    B = layer.B if rank is None else torch.stack([layer.s[i] @ layer.t[i].T for i in range(4)])
    W = sum(torch.kron(layer.A[i], B[i]) for i in range(4))  # (384, 24)
    x = torch.randn(2, 5, 384, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ W + layer.bias, atol=1e-12)
    # the factored form (bench option (b)) computes the same map without forming W
    factored = phm_apply_factored(x, layer.A, layer.B) if rank is None else phm_apply_factored(x, layer.A, layer.s, layer.t)
    assert torch.allclose(factored + layer.bias, x @ W + layer.bias, atol=1e-12)


def test_phm_linear_parameter_count_and_shared_A():
    A = nn.Parameter(torch.zeros(4, 4, 4))
    full, low, shared = PHMLinear(768, 24, 4), PHMLinear(768, 24, 4, rank=1), PHMLinear(24, 768, 4, rank=1, A=A)
    assert sum(p.numel() for p in full.parameters()) == 768 * 24 // 4 + 64 + 24 == phm_layer_count(768, 24, 4)
    assert sum(p.numel() for p in low.parameters()) == (768 + 24) + 64 + 24 == phm_layer_count(768, 24, 4, 1)
    assert shared.A is A


def test_sum_of_kronecker_products_is_needed():
    """One Kronecker product has rank rank(A)·rank(B) <= n·min(p, q); the sum of n of them reaches full rank."""
    torch.manual_seed(0)
    A, B = torch.randn(4, 4, 4, dtype=torch.float64), torch.randn(4, 6, 6, dtype=torch.float64)
    assert torch.linalg.matrix_rank(torch.kron(A[0], B[0])) == 24 == torch.linalg.matrix_rank(kron_sum(A, B))
    low = torch.randn(4, 6, 1, dtype=torch.float64) @ torch.randn(4, 1, 6, dtype=torch.float64)  # rank-1 B_i
    assert torch.linalg.matrix_rank(torch.kron(A[0], low[0])) == 4
    assert torch.linalg.matrix_rank(kron_sum(A, low)) == 16  # n products of rank n each


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_features=384, out_features=24, n=5), "n=5 must divide both dimensions.*in_features=384"),
    (dict(in_features=384, out_features=18, n=4), "out_features=18 is not divisible by 4"),
    (dict(in_features=8, out_features=8, n=0), "positive integer"),
    (dict(in_features=8, out_features=8, n=2, rank=0), "rank must be None"),
    (dict(in_features=8, out_features=8, n=2, A=nn.Parameter(torch.zeros(4, 4, 4))), r"shape \(n, n, n\)")])
def test_phm_linear_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PHMLinear(**kwargs)


# ---- counts: the paper's closed forms, ours, numel on a BERT-base-sized encoder -----------------------------

@pytest.mark.parametrize("k", [24, 48])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_counts_bert_base(bert_base_sized, method, k):
    config = CONFIGS[method](bottleneck=k, n=4)
    add_adapter(bert_base_sized, config, "a")
    numel = sum(p.numel() for n, p in bert_base_sized.named_parameters() if ".deltas.a." in n)
    assert parameter_summary(bert_base_sized, "a").adapter == numel == config.parameter_count(768, 12)
    sites = 1 if method == "compacter_pp" else 2
    biases = sites * 12 * (k + 768)
    if method == "phm_adapter":
        assert numel == phm_adapter_count(768, 12, k, 4) == paper_phm_adapter_count(768, 12, k, 4) + biases
    else:
        assert numel == compacter_count(768, 12, k, 4, sites=sites)
        assert compacter_count(768, 12, k, 4) == paper_compacter_count(768, 12, k, 4) + 2 * 12 * (k + 768)
        assert phm_adapter_count(768, 12, k, 4, 1, True, bias=False) == paper_compacter_count(768, 12, k, 4)


def test_known_numbers_bert_base():
    """BERT-base, k = 24 (AdapterHub's reduction factor 32), n = 4: AdapterHub reports 57,088 / 28,576."""
    assert compacter_count(768, 12, 24, 4) == 57_088 and compacter_count(768, 12, 24, 4, sites=1) == 28_576
    assert paper_compacter_count(768, 12, 24, 4) == 38_080 and paper_phm_adapter_count(768, 12, 24, 4) == 224_256


@pytest.mark.parametrize("k", [24, 48])
def test_target_one_tenth_of_the_bottleneck_adapter(k):
    """Issue target: Compacter <= 1/10 of Houlsby, Compacter++ <= 1/10 of Pfeiffer (biases included)."""
    assert 10 * compacter_count(768, 12, k, 4) <= houlsby_count(768, 12, k)
    assert 10 * compacter_count(768, 12, k, 4, sites=1) <= pfeiffer_count(768, 12, k)
    assert 10 * compacter_count(384, 6, k, 4) <= houlsby_count(384, 6, k)  # MiniLM too


def test_shared_A_is_one_tensor_counted_and_saved_once(model):
    add_adapter(model, CompacterConfig(bottleneck=24), "c")
    layers = phm_layers(model, "c")
    assert len(layers) == 6 * 2 * 2 and all(m.A is layers[0].A for m in layers)
    s = parameter_summary(model, "c")
    assert s.per_layer["layer 0"] == s.per_layer["layer 1"] + 4 ** 3  # A is counted where first met
    a_keys = [k for k in model.state_dict() if k.endswith(".A")]
    assert len(a_keys) == 24 and len({model.state_dict()[k].data_ptr() for k in a_keys}) == 1


# ---- behaviour ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(CONFIGS))
def test_identity_init_is_exactly_the_base_model(model, batch, method):
    base = run(model, batch)
    add_adapter(model, CONFIGS[method](init="identity"), "a")
    assert torch.equal(run(model, batch), base)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_near_identity_init_is_close_but_not_equal(model, batch, method):
    base = run(model, batch)
    add_adapter(model, CONFIGS[method](), "a")
    assert 0 < (run(model, batch) - base).abs().max() < 0.1


def test_compacter_pp_formula_and_placement(model):
    """Compacter++: only at the FFN site, out = LN(x + h + U f(D LN(x + h))) with the pretrained LN."""
    add_adapter(model, CompacterPPConfig(bottleneck=8, init_std=0.5), "a")
    assert all("a" not in layer.attn.deltas and "a" in layer.ffn.deltas for layer in model.layers)
    ffn, x = model.layers[0].ffn, torch.randn(2, 5, 384)
    a = ffn.deltas["a"]
    h = ffn.ffn_out(ffn.act(ffn.ffn_in(x)))
    u = ffn.norm(x + h)
    expected = ffn.norm(x + h + a.up(torch.nn.functional.gelu(a.down(u))))
    assert torch.allclose(ffn(x), expected, atol=TOL)
    assert not torch.allclose(ffn(x), ffn.norm(x + h), atol=1e-3)  # the adapter does something


def test_compacter_houlsby_placement(model):
    add_adapter(model, CompacterConfig(), "a")
    assert all("a" in layer.attn.deltas and "a" in layer.ffn.deltas for layer in model.layers)


def test_only_adapter_parameters_train_and_A_gets_gradient_from_all_layers(model, batch):
    add_adapter(model, CompacterConfig(bottleneck=12, init_std=0.1), "a")
    train_adapter(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltas.a." in n for n in grads)
    A = phm_layers(model, "a")[0].A
    opt.step()
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert {n for n in changed if n.endswith(".A")} == {n for n in model.state_dict() if ".deltas.a." in n and n.endswith(".A")}
    assert not torch.equal(A, before["layers.0.attn.deltas.a.down.A"])


def test_shared_A_gradient_sums_every_use():
    torch.manual_seed(0)
    A = nn.Parameter(torch.randn(2, 2, 2))
    f, g = PHMLinear(4, 6, 2, rank=1, A=A), PHMLinear(6, 4, 2, rank=1, A=A)
    x = torch.randn(3, 4)
    g(f(x)).sum().backward()
    shared = A.grad.clone()
    A2f, A2g = (nn.Parameter(A.detach().clone()) for _ in range(2))
    f.A, g.A = A2f, A2g
    g(f(x)).sum().backward()
    assert torch.allclose(shared, A2f.grad + A2g.grad, atol=1e-6)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_save_load_reproduces_bit_for_bit(model, minilm, batch, tmp_path, method):
    torch.manual_seed(1)
    add_adapter(model, CONFIGS[method](bottleneck=12, n=2, init_std=0.1), "task")
    with torch.no_grad():  # move every tensor away from its init, as training would
        for name, p in model.named_parameters():  # a shared A is listed once
            if ".deltas.task." in name:
                p.add_(0.01 * torch.randn_like(p))
    expected = run(model, batch)
    save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "minipeft_adapter.json").read_text())
    assert meta["method"] == method and meta["config"]["n"] == 2
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "minipeft_adapter.safetensors"))
    assert sum(k.endswith(".A") for k in saved) == (1 if method != "phm_adapter" else len(phm_layers(model, "task")))
    assert sum(t.numel() for t in saved.values()) == parameter_summary(model, "task").adapter
    fresh = copy.deepcopy(minilm)
    config = load_adapter(fresh, tmp_path)
    assert type(config) is CONFIGS[method] and adapter_names(fresh) == ["task"]
    assert torch.equal(run(fresh, batch), expected)
    layers = phm_layers(fresh, "task")
    assert (len({id(m.A) for m in layers}) == 1) == (method != "phm_adapter")  # still shared after loading


def test_two_compacters_have_their_own_A_and_delete_removes_everything(model, batch):
    base = run(model, batch)
    add_adapter(model, CompacterConfig(init_std=0.1), "a")
    add_adapter(model, CompacterPPConfig(init_std=0.1), "b")
    assert phm_layers(model, "a")[0].A is not phm_layers(model, "b")[0].A
    delete_adapter(model, "a")
    assert adapter_names(model) == ["b"] and not phm_layers(model, "a")
    delete_adapter(model, "b")
    assert torch.equal(run(model, batch), base)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Encoder.from_pretrained().parameters())


def test_deepcopy_keeps_A_shared(model):
    add_adapter(model, CompacterConfig(), "a")
    clone = copy.deepcopy(model)
    layers = phm_layers(clone, "a")
    assert all(m.A is layers[0].A for m in layers) and layers[0].A is not phm_layers(model, "a")[0].A


def test_generic_modules_placement():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
    x = torch.randn(3, 8)
    base = net(x)
    add_adapter(net, CompacterConfig(placement="modules", targets=["2"], bottleneck=4, init_std=0.5), "a")
    delta = net[2].output_deltas["a"]
    assert torch.allclose(net(x), base + delta.up(torch.nn.functional.gelu(delta.down(base))), atol=TOL)


# ---- bad input: clear errors, model unchanged ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(n=0), "n .* must be a positive integer, got 0"),
    (dict(n=5), r"n=5 must divide the bottleneck 24; allowed n: \[1, 2, 3, 4, 6, 8, 12, 24\]"),
    (dict(rank=0), "rank must be None .* or a positive integer"),
    (dict(shared_A="yes"), "shared_A must be True or False"),
    (dict(activation="softmax"), "unknown activation 'softmax'"),
    (dict(placement="middle"), "unknown placement 'middle'")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompacterConfig(**kwargs)


def test_default_and_reduction_factor():
    assert CompacterConfig().bottleneck == 24 and CompacterConfig(reduction_factor=16).size(384) == 24
    with pytest.raises(ValueError, match="not both"):
        CompacterConfig(bottleneck=24, reduction_factor=16)


def test_n_that_does_not_divide_the_hidden_size_rolls_back(model):
    before = model.state_dict().keys()
    with pytest.raises(ValueError, match="n=5 must divide both dimensions.*in_features=384"):
        add_adapter(model, CompacterConfig(reduction_factor=24, n=5), "a")  # k = 16, d = 384
    with pytest.raises(ValueError, match="does not divide hidden size 384"):
        add_adapter(model, PHMAdapterConfig(reduction_factor=7), "a")
    assert model.state_dict().keys() == before and adapter_names(model) == []


# ---- registration: compare and the explorer ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_compare_registration_trains_adapter_and_head_only(method):
    from minipeft.core import RECIPES
    from minipeft.lab.compare import build_model

    assert RECIPES[method].lesson == "03"
    model = build_model(method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == compacter_count(384, 6, 24, 4, sites=2 if method == "compacter" else 1) + 2 * 384 + 2


@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
@pytest.mark.parametrize("backbone", ["MiniLM-L6", "BERT-base"])
def test_explorer_entries_match_numel(method, backbone):
    from minipeft.course.widgets import BACKBONES, breakdown

    cfg = BACKBONES[backbone]
    with torch.device("meta"):
        enc = Encoder(cfg)
    for k in (8, 48):
        b = breakdown(method, k, backbone)
        name = f"a{k}"
        add_adapter(enc, CONFIGS[method](bottleneck=k, n=4), name)
        assert b["total"] == parameter_summary(enc, name).adapter + cfg.hidden_size * 2 + 2
