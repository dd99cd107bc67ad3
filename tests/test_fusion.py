"""AdapterFusion (Pfeiffer et al. 2021) on the real MiniLM encoder: the formula against a from-scratch reference,
the count, what trains, the regulariser (and train()'s use of it), save/load, and bad input leaving the model as it
was. Tolerance: helpers.TOL (1e-4, fp32 rounding over ~15 GEMMs, see helpers.py); the reference computes K z_n and
V z_n per adapter, the module the cheaper (q W_K)·z_n and V Σ s_n z_n: same function, other rounding."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import TOL, gap, run

from minipeft import (BottleneckConfig, FusionConfig, LoRAConfig, add_adapter, delete_adapter, freeze_adapters,
                      fusion_attention, fusion_regularization, load_adapter, parameter_summary, save_adapter,
                      set_active, train_adapter)
from minipeft.core import adapter_configs, adapter_modules, regularizers
from minipeft.methods.bottleneck import Bottleneck
from minipeft.methods.fusion import PAPER_LR, fusion_count, fusion_layers
from minipeft.lab.train import Budget, SequenceClassifier, run_epochs

SOURCES = ["s0", "s1", "s2"]


def add_sources(model, names=SOURCES, seed=0):
    """Pfeiffer adapters m=16 with weights large enough to matter (std 0.1 instead of 0.01), frozen."""
    torch.manual_seed(seed)
    for name in names:
        add_adapter(model, BottleneckConfig(placement="pfeiffer", bottleneck=16, init_std=0.1), name)
    freeze_adapters(model, *names)
    return model


@pytest.fixture
def fused(model):
    """MiniLM + three frozen sources + fusion "f" (eval mode: no dropout)."""
    add_sources(model)
    torch.manual_seed(1)
    add_adapter(model, FusionConfig(adapters=SOURCES), "f")
    return model


def reference(encoder, batch, names=SOURCES, fusion="f"):
    """The paper's formula, layer by layer: u = LN(x + h), z_n = W_up ReLU(W_down u + b) + b,
    s = softmax_n((uQ + b_Q)·(z_n K + b_K)), out = LN(x + h + Σ_n s_n z_n V)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    x = encoder.embed(ids, mask.long(), torch.zeros_like(ids))
    key_mask = None if bool(mask.all()) else mask.bool()
    for layer in encoder.layers:
        a = layer.attn(x, key_mask, None)  # (B, T, d): no adapter at the attention site
        ffn = layer.ffn
        h = ffn.sublayer(a)
        u = ffn.norm(a + h)
        z = [ffn.deltas[n].up(F.relu(ffn.deltas[n].down(u))) for n in names]
        f = ffn.deltas[fusion]
        q = f.query(u)
        s = torch.softmax(torch.stack([(q * f.key(zn)).sum(-1) for zn in z], -1), dim=-1)  # (B, T, N)
        o = sum(s[..., i:i + 1] * f.value(zn) for i, zn in enumerate(z))
        x = ffn.norm(a + h + o)
    return x


def test_fusion_equals_the_paper_formula_at_real_tokens(fused, batch):
    with torch.no_grad():
        expected = reference(fused, batch)
    assert gap(run(fused, batch), expected, batch["attention_mask"]) < TOL


def test_both_ways_of_forming_q_w_k_equal_the_paper_formula(fused, batch):
    """Below d = 384 tokens the layer computes q, then q W_K; from d tokens on it forms W_Qᵀ W_K once (d³ multiply-adds
    instead of (B·T)·d²): the same function either way."""
    doubled = {key: value.repeat(2, 1) for key, value in batch.items()}
    assert batch["input_ids"].numel() < 384 <= doubled["input_ids"].numel()
    with torch.no_grad():
        expected = reference(fused, doubled)
    assert gap(run(fused, doubled), expected, doubled["attention_mask"]) < TOL
    assert gap(run(fused, doubled)[:len(batch["input_ids"])], run(fused, batch), batch["attention_mask"]) < TOL


def test_uniform_attention_averages_the_adapters(fused, batch):
    """Q = 0: every score is 0, s_n = 1/N; with V = I exactly, o = mean of the adapters' outputs."""
    with torch.no_grad():
        for layer in fusion_layers(fused, "f"):
            layer.query.weight.zero_(), layer.query.bias.zero_()
            layer.value.weight.copy_(torch.eye(384))
    out = run(fused, batch)
    attention = fusion_attention(fused, "f", batch["attention_mask"])
    assert attention.shape == (6, 3) and torch.allclose(attention, torch.full((6, 3), 1 / 3))
    # the reference's own softmax is then 1/N as well: LN(x + h + mean_n z_n)
    with torch.no_grad():
        expected = reference(fused, batch)
    assert gap(out, expected, batch["attention_mask"]) < TOL
    assert gap(out, run_without_fusion(fused, batch), batch["attention_mask"]) > 1e-2  # the adapters matter


def run_without_fusion(model, batch):
    set_active(model)
    try:
        return run(model, batch)
    finally:
        set_active(model, "f")


def test_one_hot_attention_equals_that_adapter_alone(fused, batch):
    """q = c·e (Q = 0, b_Q = e), K = I and a large b_up along e on adapter s1 only: s1's score exceeds the others'
    by ≈ 100, softmax is one-hot to fp32, and with V = I the fused model is the model with s1 alone."""
    e = torch.zeros(384)
    e[7] = 1.0
    with torch.no_grad():
        for layer in fused.layers:
            layer.ffn.deltas["s1"].up.bias.add_(100 * e)
            f = layer.ffn.deltas["f"]
            f.query.weight.zero_(), f.query.bias.copy_(e)
            f.key.weight.copy_(torch.eye(384)), f.key.bias.zero_()
            f.value.weight.copy_(torch.eye(384))
    out = run(fused, batch)
    assert torch.allclose(fusion_attention(fused, "f", batch["attention_mask"]), torch.tensor([[0.0, 1.0, 0.0]] * 6))
    per_example = fusion_attention(fused, "f", batch["attention_mask"], per_example=True)
    assert per_example.shape == (len(batch["input_ids"]), 6, 3)
    set_active(fused, "s1")
    assert gap(out, run(fused, batch), batch["attention_mask"]) < TOL


def test_count_is_L_times_3d2_plus_2d(fused):
    summary = parameter_summary(fused, "f")
    assert summary.adapter == fusion_count(384, 6) == 6 * (3 * 384 ** 2 + 2 * 384) == 2_658_816
    assert summary.per_layer == {f"layer {i}": 3 * 384 ** 2 + 2 * 384 for i in range(6)}
    assert fusion_count(768, 12) == 21_252_096  # BERT-base: 19.4% of 109,482,240 (docs/references.md)


def test_only_fusion_and_head_train(model):
    clf = SequenceClassifier(add_sources(model), num_labels=2)
    add_adapter(clf, FusionConfig(adapters=SOURCES), "f")
    train_adapter(clf, "f")
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all(".deltas.f." in n or n.startswith("head.") for n in trainable)
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) == fusion_count(384, 6) + 384 * 2 + 2
    assert {m.adapter_name for m in adapter_modules(clf).values() if m.active} == {"f"}
    assert PAPER_LR == 5e-5


def test_regulariser_zero_at_identity_and_positive_after_perturbing(model):
    add_sources(model)
    add_adapter(model, FusionConfig(adapters=SOURCES, value_offdiag=0.0), "exact")
    assert fusion_regularization(model, "exact").item() == 0.0
    add_adapter(model, FusionConfig(adapters=SOURCES), "f")  # AdapterHub's V: 1e-6 off the diagonal
    assert fusion_regularization(model, "f").item() == pytest.approx(0.01 * 6 * (384 ** 2 - 384) * 1e-12, rel=1e-3)
    with torch.no_grad():
        fusion_layers(model, "exact")[0].value.weight[0, 1] += 0.1
    assert fusion_regularization(model, "exact").item() == pytest.approx(0.01 * 0.1 ** 2, rel=1e-4)


def test_train_loop_adds_the_regulariser(model, batch):
    """One SGD step (lr 1, no clipping): with λ = 0.01 V moves by an extra −2λ(V − I) compared with λ = 0."""
    data = [{"input_ids": batch["input_ids"][:2, :16], "attention_mask": batch["attention_mask"][:2, :16],
             "labels": torch.tensor([0, 1])}]
    budget = Budget(epochs=1, grad_clip=1e9)
    after = {}
    for lam in (0.0, 0.01):
        clf = SequenceClassifier(add_sources(copy.deepcopy(model)), num_labels=2)
        torch.manual_seed(2)
        add_adapter(clf, FusionConfig(adapters=SOURCES, regularization=lam), "f")
        train_adapter(clf, "f")
        clf.eval()  # no dropout: the two runs see the same forward
        v = fusion_layers(clf, "f")[0].value.weight
        with torch.no_grad():
            v.add_(0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)))
        before = v.detach().clone()
        assert len(regularizers(clf)) == 6
        params = [p for p in clf.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        run_epochs(clf, params, opt, sched, data, lambda: 0.0, budget, "cpu", quiet=True)
        after[lam] = v.detach().clone()
    expected = -2 * 0.01 * (before - torch.eye(384))
    assert torch.allclose(after[0.01] - after[0.0], expected, atol=1e-6)


def test_save_load_round_trip(fused, batch, minilm, tmp_path):
    with torch.no_grad():
        for layer in fusion_layers(fused, "f"):
            layer.value.weight.add_(0.01 * torch.randn(384, 384))
    out = run(fused, batch)
    for name in SOURCES + ["f"]:
        save_adapter(fused, name, tmp_path / name)
    fresh = copy.deepcopy(minilm)
    for name in SOURCES:
        load_adapter(fresh, tmp_path / name)
    with pytest.raises(ValueError, match=r"trainable parameters.*freeze_adapters\(model, 's0', 's1', 's2'\)"):
        load_adapter(fresh, tmp_path / "f")
    freeze_adapters(fresh, *SOURCES)
    load_adapter(fresh, tmp_path / "f")
    assert adapter_configs(fresh)["f"] == FusionConfig(adapters=SOURCES)
    assert gap(run(fresh, batch), out) == 0.0


def test_delete_restores_the_sources(model, batch):
    add_sources(model)
    before = run(model, batch)  # the three sources, stacked (each active)
    add_adapter(model, FusionConfig(adapters=SOURCES), "f")
    assert not any(m.active for n in SOURCES for m in adapter_modules(model, n).values())
    delete_adapter(model, "f")
    assert gap(run(model, batch), before) == 0.0


def test_an_active_source_beside_the_fusion_is_an_error(fused, batch):
    set_active(fused, "f", "s0")
    with pytest.raises(RuntimeError, match=r"'s0' is active alongside fusion 'f'.*set_active\(model, 'f'\)"):
        run(fused, batch)


# ---- bad input: a clear error, and the model exactly as it was ----------------------------------------------------

def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m).__name__, getattr(m, "active", None)) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
            dict(adapter_configs(model)))


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def test_fewer_than_two_adapters():
    for adapters in (["s0"], [], "s0"):
        with pytest.raises(ValueError, match="at least 2 adapters|list of adapter names"):
            FusionConfig(adapters=adapters)
    with pytest.raises(ValueError, match="distinct"):
        FusionConfig(adapters=["s0", "s0"])


def corrupt_width(model):  # an adapter of another hidden size at layer 2
    torch.manual_seed(0)
    model.layers[2].ffn.deltas["s1"] = Bottleneck("s1", 32, 4, BottleneckConfig()).requires_grad_(False)


def drop_layer(model):  # an adapter missing in one layer
    del model.layers[3].ffn.deltas["s2"]


def add_lora(model):
    add_adapter(model, LoRAConfig(targets=["q"]), "lora")
    freeze_adapters(model, "lora")


@pytest.mark.parametrize("prepare, adapters, message", [
    (None, ["s0", "nope"], r"no adapter named \['nope'\] in this model; existing adapters: \['s0', 's1', 's2'\]"),
    (lambda m: m.layers[0].ffn.deltas["s1"].requires_grad_(True), SOURCES,
     r"adapters \['s1'\] still have trainable parameters.*freeze_adapters\(model, 's1'\)"),
    (corrupt_width, SOURCES, r"'s1' reads/writes width 32/32 at layer 2, but this backbone .* needs 384"),
    (drop_layer, SOURCES, r"'s2' is not on every FFN site .*missing at layers \[3\]"),
    (add_lora, ["s0", "lora"], r"'lora' is a lora adapter; AdapterFusion fuses bottleneck adapters at the FFN site"),
    (lambda m: add_adapter(m, BottleneckConfig(placement="houlsby"), "h"), ["s0", "h"], r"'h' is a bottleneck/houlsby"),
])
def test_bad_sources_leave_the_model_as_it_was(model, prepare, adapters, message):
    add_sources(model)
    if prepare is not None:
        prepare(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        add_adapter(model, FusionConfig(adapters=adapters), "f")
    assert_same(snapshot(model), before)
