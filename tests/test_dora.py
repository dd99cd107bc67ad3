"""DoRA (Liu et al. 2024, Eq. 5, §4.3): equal to peft's ``LoraConfig(use_dora=True)`` on the transformers twins of
the encoder and the decoder (both ways, B perturbed so the update is not zero), the formula itself on one Linear
(values and gradients: the norm over each output unit's weights, detached), merge / unmerge, the closed-form count
against numel on MiniLM and SmolLM2, clear errors that change nothing. (The conformance suite runs it on every
backbone.)"""
import pytest
import torch
from helpers import TOL, assert_unchanged, gap, perturb, structure, twin_outputs, twins
from torch import nn

from minipeft import add_adapter, export_peft, import_peft, merge_adapter, parameter_summary, unmerge_adapter
from minipeft.core import adapter_modules
from minipeft.methods.dora import DoRAConfig, DoRALinear, dora_count, dora_qv_count
from minipeft.methods.lora import LoRALinear

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dora_exported_to_peft_gives_peft_the_same_outputs(family, tmp_path):
    from peft import PeftModel

    hf, ours, batch, hf_output, our_output = twins(family)
    base, _ = twin_outputs(hf, ours, batch, hf_output, our_output)
    add_adapter(ours, DoRAConfig(r=4, alpha=8, targets=["q", "v", "ffn_out"]), "a")
    perturb(ours, "a")  # A, B and m off their init
    export_peft(ours, "a", tmp_path)
    theirs = PeftModel.from_pretrained(hf, tmp_path).eval()
    mine, peft_out = twin_outputs(theirs, ours, batch, hf_output, our_output)
    real = batch["attention_mask"]
    print(f"DoRA {family}: ours -> peft max |Δ| = {gap(mine, peft_out, real):.2e}")
    assert gap(mine, peft_out, real) < TOL and gap(mine, base, real) > 100 * TOL
    assert sum(1 for n, _ in theirs.named_parameters() if "lora_magnitude_vector" in n) == 3 * 2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_peft_dora_imported_gives_peft_outputs(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, ours, batch, hf_output, our_output = twins(family)
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS[family]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:  # B = 0 would make the test trivial
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path)
    config = import_peft(ours, tmp_path, "p")
    assert type(config) is DoRAConfig and config.r == 4 and config.scale == 2
    mine, peft_out = twin_outputs(theirs.eval(), ours, batch, hf_output, our_output)
    print(f"DoRA {family}: peft -> ours max |Δ| = {gap(mine, peft_out, batch['attention_mask']):.2e}")
    assert gap(mine, peft_out, batch["attention_mask"]) < TOL


def test_peft_dora_magnitude_starts_at_the_norm_we_start_at():
    """peft's m at creation = ‖W0‖ per output unit, the norm over the input axis: ours, on the same weights."""
    from peft import LoraConfig, get_peft_model

    hf, ours, *_ = twins("llama")
    add_adapter(ours, DoRAConfig(r=4, alpha=8, targets=["v"]), "a")
    theirs = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["v_proj"]))
    peft_m = [p for n, p in theirs.named_parameters() if "lora_magnitude_vector" in n]
    our_m = [m.m for m in adapter_modules(ours, "a").values()]
    assert len(peft_m) == len(our_m) == 2 and all(torch.equal(a, b) for a, b in zip(our_m, peft_m))


# ---- the formula on one Linear: values and gradients ---------------------------------------------------------

def one_layer(seed=0, d_in=7, d_out=5, r=3, alpha=6.0):
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out)
    dora = DoRALinear("a", linear, DoRAConfig(r=r, alpha=alpha))
    with torch.no_grad():
        dora.B.normal_()
        dora.m.mul_(1 + 0.3 * torch.rand_like(dora.m))
    return linear.eval(), dora.eval()


def test_output_is_m_times_the_row_normalised_weight_plus_the_bias():
    linear, dora = one_layer()
    x = torch.randn(4, linear.in_features)
    W = linear.weight + dora.scale * dora.B @ dora.A  # (d_out, d_in)
    expected = x @ (dora.m[:, None] * W / W.norm(dim=1, keepdim=True)).T + linear.bias  # Eq. 5
    assert torch.allclose(linear(x) + dora(x), expected, atol=1e-6)


def test_gradients_treat_the_norm_as_a_constant():
    """§4.3: the gradient of A, B, m is that of m ⊙ (W0 + sBA) x / c with c = ‖W0 + sBA‖_c a constant."""
    linear, dora = one_layer()
    x, probe = torch.randn(4, linear.in_features), torch.randn(4, linear.out_features)
    (probe * (linear(x) + dora(x))).sum().backward()
    A, B, m = (t.detach().clone().requires_grad_() for t in (dora.A, dora.B, dora.m))
    W = linear.weight.detach() + dora.scale * B @ A
    c = W.detach().norm(dim=1)
    (probe * (x @ (m[:, None] * W / c[:, None]).T)).sum().backward()
    for ours, reference in ((dora.A, A), (dora.B, B), (dora.m, m)):
        assert torch.allclose(ours.grad, reference.grad, atol=1e-5)
    W = linear.weight.detach() + dora.scale * B @ A
    undetached = torch.autograd.grad((probe * (x @ (m[:, None] * W / W.norm(dim=1, keepdim=True)).T)).sum(), B)[0]
    assert not torch.allclose(dora.B.grad, undetached, atol=1e-3)  # the detach matters


def test_merge_gives_the_same_outputs_and_unmerge_restores_w0():
    linear, dora = one_layer()
    w0, x = linear.weight.detach().clone(), torch.randn(4, linear.in_features)
    with torch.no_grad():
        before = linear(x) + dora(x)
    dora.merge()
    assert dora(x) is None and torch.allclose(linear(x), before, atol=1e-6)
    with pytest.raises(RuntimeError, match="already merged"):
        dora.merge()
    dora.unmerge()
    assert torch.allclose(linear.weight, w0, atol=1e-6)


def test_merge_adapter_on_a_model(model, batch):
    add_adapter(model, DoRAConfig(r=4), "a")
    perturb(model, "a")
    with torch.no_grad():
        before = model(batch["input_ids"], batch["attention_mask"])
        merge_adapter(model, "a")
        assert gap(model(batch["input_ids"], batch["attention_mask"]), before, batch["attention_mask"]) < TOL
        unmerge_adapter(model, "a")
        assert gap(model(batch["input_ids"], batch["attention_mask"]), before, batch["attention_mask"]) < TOL


# ---- counts: L · |targets| · (r(d_in + d_out) + d_out) -----------------------------------------------------

def test_counts_on_minilm_and_smollm2(model):
    from minipeft.backbones.decoder import Decoder

    smollm2 = Decoder.from_pretrained()
    for backbone, expected in ((model, 6 * (8 * (384 + 384) + 384) * 2),
                               (smollm2, 30 * ((8 * (576 + 576) + 576) + (8 * (576 + 192) + 192)))):
        add_adapter(backbone, DoRAConfig(r=8, alpha=16), "a")
        d, L, w = backbone.hidden_size, backbone.num_layers, backbone.attention.kv_width
        summary = parameter_summary(backbone, "a")
        numel = sum(p.numel() for m in adapter_modules(backbone, "a").values() for p in m.parameters())
        assert numel == summary.adapter == summary.stored == dora_qv_count(d, L, w, 8) == expected
    assert dora_count(8, 384, 384, n_targets=2, num_layers=6) == 6 * 2 * (8 * 768 + 384)


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    (dict(r=0), "r \\(the rank\\) must be a positive integer"), (dict(alpha=-1), "alpha must be a number > 0"),
    (dict(dropout=1.0), "dropout must be in"), (dict(targets=[]), "targets must be a non-empty list")])
def test_bad_config_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        DoRAConfig(**values)


def test_a_target_that_matches_nothing_changes_nothing(model):
    before = structure(model)
    with pytest.raises(ValueError, match="matches target 'nowhere'"):
        add_adapter(model, DoRAConfig(targets=["q", "nowhere"]), "a")
    assert_unchanged(model, before)


def test_dora_is_a_lora_with_a_magnitude():
    linear, dora = one_layer()
    assert isinstance(dora, LoRALinear) and dora.m.shape == (linear.out_features,)
