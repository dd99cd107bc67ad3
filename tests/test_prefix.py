"""Prefix tuning (Li & Liang 2021): counts, attention with a prefix, padding, Eq. 7 of He et al. 2022,
ejection, training, save/load, bad input."""
import copy
import json
import math

import pytest
import torch

from minipeft import (add_adapter, adapter_names, deactivate, delete_adapter, load_adapter, parameter_summary,
                      save_adapter, train_adapter)
from minipeft.methods.prefix import (Prefix, PrefixConfig, eject_prefix, prefix_stored_count,
                                     prefix_training_count)
from minipeft.api import adapter_config
from helpers import TOL


def run(model, input_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids, attention_mask)


def prefix_params(model, name="p"):
    return {n: p for n, p in model.named_parameters() if n.startswith(f"prefixes.{name}.")}


def randomise(module, scale=0.1):
    """Move a fresh prefix away from its init so that the tests see a non-trivial P."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# ---- counts: closed form vs numel on a BERT-base-sized encoder ------------------------------------------------

def test_counts_bert_base_reparameterised_and_ejected(bert_base_sized):
    add_adapter(bert_base_sized, PrefixConfig(length=30, hidden=512), "p")
    numel = sum(p.numel() for p in prefix_params(bert_base_sized).values())
    s = parameter_summary(bert_base_sized, "p")
    assert prefix_training_count(768, 12, 30, 512) == 9_872_384 == numel == s.adapter
    assert prefix_stored_count(768, 12, 30) == 552_960 == s.stored
    eject_prefix(bert_base_sized, "p")
    numel = sum(p.numel() for p in prefix_params(bert_base_sized).values())
    s = parameter_summary(bert_base_sized, "p")
    assert numel == s.adapter == s.stored == 552_960


@pytest.mark.parametrize("l, expected", [(10, 184_320), (30, 552_960), (200, 3_686_400)])
def test_counts_bert_base_flat(bert_base_sized, l, expected):
    add_adapter(bert_base_sized, PrefixConfig(length=l, reparameterize=False), "p")
    numel = sum(p.numel() for p in prefix_params(bert_base_sized).values())
    assert prefix_training_count(768, 12, l, reparameterize=False) == expected == numel
    assert parameter_summary(bert_base_sized, "p").stored == expected


def test_forward_shapes_and_no_batch_dimension(model):
    add_adapter(model, PrefixConfig(length=7, hidden=16), "p")
    kv = model.prefixes["p"]()
    assert len(kv) == 6 and all(pk.shape == pv.shape == (7, 384) for pk, pv in kv)
    assert all(p.shape[0] != 8 for p in prefix_params(model).values())


# ---- the attention with a prefix ----------------------------------------------------------------------------

def test_prefix_changes_output_and_deactivating_restores_base(model, batch):
    base = run(model, batch["input_ids"], batch["attention_mask"])
    add_adapter(model, PrefixConfig(length=5, hidden=32), "p")
    assert not torch.allclose(run(model, batch["input_ids"], batch["attention_mask"]), base, atol=1e-3)
    deactivate(model, "p")
    assert torch.equal(run(model, batch["input_ids"], batch["attention_mask"]), base)
    delete_adapter(model, "p")
    assert list(model.prefixes) == []


@pytest.mark.parametrize("reparameterize", [True, False])
def test_padded_and_unpadded_agree_at_real_tokens(model, batch, reparameterize):
    add_adapter(model, PrefixConfig(length=6, hidden=32, reparameterize=reparameterize), "p")
    randomise(model.prefixes["p"])
    padded = run(model, batch["input_ids"], batch["attention_mask"])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # padding is exercised
    for i, n in enumerate(lengths.tolist()):
        alone = run(model, batch["input_ids"][i:i + 1, :n])  # no padding, no mask
        assert (padded[i, :n] - alone[0]).abs().max() < TOL


def test_batch_size_independent(model, batch):
    add_adapter(model, PrefixConfig(length=4, hidden=32), "p")
    randomise(model.prefixes["p"])
    full = run(model, batch["input_ids"], batch["attention_mask"])
    for size in (1, 3):
        part = run(model, batch["input_ids"][:size], batch["attention_mask"][:size])
        real = batch["attention_mask"][:size].bool()
        assert (part - full[:size])[real].abs().max() < TOL


def test_two_prefixes_concatenate_along_the_prefix_axis(model):
    add_adapter(model, PrefixConfig(length=3, hidden=8), "a")
    add_adapter(model, PrefixConfig(length=2, reparameterize=False), "b")
    pk, pv = model.layer_prefixes()[0]
    assert pk.shape == pv.shape == (5, 384)
    assert torch.equal(pk[3:], model.prefixes["b"]()[0][0])


def test_unified_view_eq7_per_head(model):
    """He et al. 2022, Eq. 7: with a prefix, each head's attention is
    (1 − λ(x))·softmax(q Kᵀ)V + λ(x)·softmax(q P_kᵀ)P_v, λ = the softmax mass on the prefix."""
    add_adapter(model, PrefixConfig(length=5, hidden=32), "p")
    randomise(model.prefixes["p"], scale=0.1)
    attn = model.layers[2].attn
    pk, pv = model.prefixes["p"]()[2]  # (l, d)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 384)  # (B, T, d)
    H, dh = attn.num_heads, 384 // attn.num_heads
    with torch.no_grad():
        q, k, v = (attn.split_heads(f(x)) for f in (attn.q, attn.k, attn.v))  # (B, H, T, d_h)
        Pk, Pv = (attn.split_heads(p.expand(2, -1, -1)) for p in (pk, pv))  # (B, H, l, d_h)
        s_real = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, H, T, T)
        s_pre = q @ Pk.transpose(-1, -2) / math.sqrt(dh)  # (B, H, T, l)
        # λ = Σ_prefix exp(s) / (Σ_prefix exp(s) + Σ_real exp(s)), per query and head
        lam = torch.sigmoid(torch.logsumexp(s_pre, -1) - torch.logsumexp(s_real, -1))[..., None]  # (B, H, T, 1)
        attn_x = s_real.softmax(-1) @ v  # Attn(x)
        attn_prefix = s_pre.softmax(-1) @ Pv  # Attn_prefix(x) = softmax(q P_kᵀ) P_v
        eq7 = (1 - lam) * attn_x + lam * attn_prefix  # (B, H, T, d_h)
        joint = torch.cat([s_pre, s_real], -1).softmax(-1) @ torch.cat([Pv, v], -2)  # the concatenation
        assert (eq7 - joint).abs().max() < TOL
        assert 0 < lam.min() and lam.max() < 1 and lam.std(dim=1).mean() > 1e-2  # λ differs per head
        expected = attn.norm(x + attn.o(eq7.transpose(1, 2).flatten(2)))  # the module's output, via Eq. 7
        assert (attn(x, None, (pk, pv)) - expected).abs().max() < TOL


def test_init_tokens_uses_real_activations(model):
    ids = [2023, 3185, 2001]
    add_adapter(model, PrefixConfig(length=3, reparameterize=False, init="tokens", init_tokens=ids), "p")
    with torch.no_grad():
        x = model.embed(torch.tensor([ids]), torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
        pk, pv = model.prefixes["p"]()[0]
        assert torch.allclose(pk, model.layers[0].attn.k(x)[0]) and torch.allclose(pv, model.layers[0].attn.v(x)[0])


# ---- ejection -------------------------------------------------------------------------------------------------

def test_eject_keeps_outputs_and_drops_the_mlp(model, batch):
    add_adapter(model, PrefixConfig(length=8, hidden=64), "p")
    randomise(model.prefixes["p"], scale=0.1)
    train_adapter(model, "p")
    before = run(model, batch["input_ids"], batch["attention_mask"])
    eject_prefix(model, "p")
    module = model.prefixes["p"]
    assert list(prefix_params(model)) == ["prefixes.p.prefix"] and module.prefix.shape == (6, 2, 8, 384)
    assert module.prefix.requires_grad and adapter_config(model, "p").ejected and not module.reparameterized
    after = run(model, batch["input_ids"], batch["attention_mask"])
    assert (after - before).abs().max() < TOL
    module.eject()  # a second time: nothing to do
    assert torch.equal(run(model, batch["input_ids"], batch["attention_mask"]), after)


# ---- training -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reparameterize", [True, False])
def test_only_prefix_parameters_train(model, batch, reparameterize):
    add_adapter(model, PrefixConfig(length=4, hidden=16, reparameterize=reparameterize), "p")
    train_adapter(model, "p")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(prefix_params(model))
    opt.step()
    changed = {n for n, v in model.state_dict().items() if not torch.equal(v, before[n])}
    assert changed == grads


# ---- save / load ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eject", [False, True])
def test_save_load_bit_for_bit(model, minilm, batch, tmp_path, eject):
    add_adapter(model, PrefixConfig(length=6, hidden=24), "task")
    randomise(model.prefixes["task"], scale=0.1)
    if eject:
        eject_prefix(model, "task")
    expected = run(model, batch["input_ids"], batch["attention_mask"])
    save_adapter(model, "task", tmp_path)
    meta = json.loads((tmp_path / "minipeft_adapter.json").read_text())
    assert meta["method"] == "prefix" and meta["config"]["ejected"] is eject
    fresh = copy.deepcopy(minilm)
    config = load_adapter(fresh, tmp_path)
    assert config.length == 6 and adapter_names(fresh) == ["task"]
    assert fresh.prefixes["task"].reparameterized is (not eject)
    n_saved = sum(p.numel() for p in prefix_params(fresh, "task").values())
    assert n_saved == (2 * 6 * 384 * 6 if eject else prefix_training_count(384, 6, 6, 24))
    assert torch.equal(run(fresh, batch["input_ids"], batch["attention_mask"]), expected)


def test_load_into_other_depth_fails_cleanly(model, bert_base_sized, tmp_path):
    add_adapter(model, PrefixConfig(length=2, hidden=8), "p")
    save_adapter(model, "p", tmp_path)
    with pytest.raises(ValueError, match="hidden_size=384.*this model has hidden_size=768"):
        load_adapter(bert_base_sized, tmp_path)
    assert adapter_names(bert_base_sized) == [] and len(bert_base_sized.prefixes) == 0


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(length=0), "prefix length must be a positive integer, got 0"),
    (dict(length=-3), "prefix length must be a positive integer"),
    (dict(length=2.5), "prefix length must be a positive integer"),
    (dict(length=True), "prefix length must be a positive integer"),
    (dict(hidden=0), "prefix hidden must be a positive integer"),
    (dict(hidden=-1), "prefix hidden must be a positive integer"),
    (dict(reparameterize="yes"), "reparameterize must be True or False"),
    (dict(init="zeros"), r"unknown prefix init 'zeros'; allowed: \('normal', 'tokens'\)"),
    (dict(init="tokens"), "needs reparameterize=False"),
    (dict(reparameterize=False, ejected=True), "nothing to eject"),
    (dict(init_std=0), "init_std must be > 0"),
    (dict(length=2, reparameterize=False, init="tokens", init_tokens=[1]), "exactly length=2 token ids"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**kwargs)


def test_bad_attach_leaves_model_unchanged(model):
    before = set(model.state_dict())
    with pytest.raises(TypeError, match="attaches to a minipeft backbone"):
        add_adapter(torch.nn.Linear(3, 3), PrefixConfig(), "p")
    with pytest.raises(ValueError, match=r"init_tokens must be token ids in \[0, 30521\]"):
        add_adapter(model, PrefixConfig(length=1, reparameterize=False, init="tokens", init_tokens=[99999]), "p")
    assert set(model.state_dict()) == before and adapter_names(model) == []
    with pytest.raises(KeyError, match="no prefix adapter named 'q'"):
        eject_prefix(model, "q")


def test_module_is_an_adapter_module(model):
    add_adapter(model, PrefixConfig(length=2, hidden=4), "p")
    assert isinstance(model.prefixes["p"], Prefix) and model.prefixes["p"].adapter_name == "p"
