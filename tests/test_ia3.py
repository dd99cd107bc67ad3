"""IA³ (Liu et al. 2022, §3.3): equal to peft's ``IA3Config`` on the transformers twins of the encoder and the decoder
(both ways: ours exported to peft, peft's saved adapter imported into ours), its closed-form count against numel on
MiniLM, SmolLM2 and a BERT-base-sized encoder, the fold into the weights, and clear errors that change nothing.
(The conformance suite, tests/test_conformance.py, runs its examples on every backbone.)"""
import copy

import pytest
import torch
from helpers import HF_TWINS, TOL, assert_unchanged, gap, perturb, structure, tiny_batch, twin_outputs, twins
from torch import nn

from minipeft import add_adapter, export_peft, for_inference, import_peft, parameter_summary
from minipeft.backbones import REGISTRY
from minipeft.core import adapter_modules
from minipeft.methods.ia3 import IA3Config, IA3Vector, ia3_count

# peft's default IA3Config targets per family (peft.utils.constants: TRANSFORMERS_MODELS_TO_IA3_*), and the same
# placement in minipeft's roles: on BERT "output.dense" also matches the attention output (role "o")
PEFT_DEFAULT_AS_OURS = {"bert": IA3Config(targets=["k", "v", "o", "ffn_out"], feedforward=["o", "ffn_out"]),
                        "llama": IA3Config()}
# the paper's placement (l_k, l_v, l_ff) stated to peft on BERT, where its default adds the attention output
PAPER_IN_PEFT = {"bert": dict(target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                              feedforward_modules=r".*layer\.\d+\.output\.dense"),
                 "llama": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["peft default", "paper"])
def test_ia3_exported_to_peft_gives_peft_the_same_outputs(family, placement, tmp_path):
    from peft import PeftModel

    hf, ours, batch, hf_output, our_output = twins(family)
    base, _ = twin_outputs(hf, ours, batch, hf_output, our_output)
    add_adapter(ours, PEFT_DEFAULT_AS_OURS[family] if placement == "peft default" else IA3Config(), "a")
    perturb(ours, "a", scale=0.3)
    export_peft(ours, "a", tmp_path)
    theirs = PeftModel.from_pretrained(hf, tmp_path).eval()
    mine, peft_out = twin_outputs(theirs, ours, batch, hf_output, our_output)
    real = batch["attention_mask"]
    print(f"IA³ {placement} {family}: ours -> peft max |Δ| = {gap(mine, peft_out, real):.2e}")
    assert gap(mine, peft_out, real) < TOL
    assert gap(mine, base, real) > 100 * TOL  # not a no-op
    n_vectors = len(adapter_modules(ours, "a"))
    assert sum(1 for n, _ in theirs.named_parameters() if "ia3_l" in n) == n_vectors


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("placement", ["peft default", "paper"])
def test_peft_ia3_imported_gives_peft_outputs(family, placement, tmp_path):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    hf, ours, batch, hf_output, our_output = twins(family)
    theirs = get_peft_model(hf, PeftIA3Config(**({} if placement == "peft default" else PAPER_IN_PEFT[family])))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.add_(0.3 * torch.randn_like(p))  # off the ones init, so the test is not trivial
    theirs.save_pretrained(tmp_path)
    config = import_peft(ours, tmp_path, "p")
    expected = PEFT_DEFAULT_AS_OURS[family] if placement == "peft default" else IA3Config()
    assert {p: s for p, (_, s) in config.placements(ours).items()} == \
        {p: s for p, (_, s) in expected.placements(ours).items()}
    mine, peft_out = twin_outputs(theirs.eval(), ours, batch, hf_output, our_output)
    print(f"IA³ {placement} {family}: peft -> ours max |Δ| = {gap(mine, peft_out, batch['attention_mask']):.2e}")
    assert gap(mine, peft_out, batch["attention_mask"]) < TOL


def test_peft_default_on_bert_also_rescales_the_attention_output_input():
    """peft's "output.dense" ends both BERT's FFN output and its attention output (``attention.output.dense``):
    its default IA³ rescales the input of both, one d-wide vector per layer more than the paper's l_k, l_v, l_ff."""
    _, ours, *_ = twins("bert")
    placed = {p.split(".", 2)[2]: s for p, (_, s) in PEFT_DEFAULT_AS_OURS["bert"].placements(ours).items()
              if p.startswith("layers.0.")}
    assert placed == {"attn.k": "output", "attn.v": "output", "attn.o": "input", "ffn.ffn_out": "input"}


# ---- counts: L (w_k + w_v + d_ff) -------------------------------------------------------------------------------

def default_count(backbone) -> int:
    cfg = backbone.cfg
    return ia3_count(backbone.attention.kv_width, backbone.attention.kv_width, cfg.intermediate_size,
                     backbone.num_layers)


def numel(model, name):
    return sum(p.numel() for m in adapter_modules(model, name).values() for p in m.parameters())


@pytest.mark.parametrize("family", list(REGISTRY))
def test_default_count_on_every_tiny_backbone(family):
    torch.manual_seed(0)
    model = REGISTRY[family].cls(REGISTRY[family].tiny())
    add_adapter(model, IA3Config(), "a")
    summary = parameter_summary(model, "a")
    assert numel(model, "a") == summary.adapter == summary.stored == default_count(model)


def test_counts_on_minilm_smollm2_and_bert_base(model, bert_base_sized):
    from minipeft.backbones.decoder import Decoder

    smollm2 = Decoder.from_pretrained()  # memory-mapped: cheap
    for backbone, expected in ((model, 6 * (384 + 384 + 1536)), (smollm2, 30 * (192 + 192 + 1536)),
                               (bert_base_sized, 55_296)):
        add_adapter(backbone, IA3Config(), "a")
        assert numel(backbone, "a") == default_count(backbone) == expected
    # 55,296 on BERT-base: the adapters library's IA³ has the same count (L(d + d + d_ff), docs/references.md)


# ---- the fold: W diag(l) for an input vector, diag(l) W and l ⊙ b for an output one -----------------------------

def test_fold_scales_rows_and_bias_for_outputs_columns_for_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    for side in ("output", "input"):
        linear = nn.Linear(5, 3)
        linear.load_state_dict(layer.state_dict())
        vector = IA3Vector("a", linear, side)
        with torch.no_grad():
            vector.l.copy_(torch.randn_like(vector.l))
        l = vector.l.detach()
        expected = l * layer(x) if side == "output" else layer(l * x)
        vector.fold()
        assert torch.allclose(linear(x), expected, atol=1e-6)
        if side == "output":
            assert torch.equal(linear.bias, layer.bias * l)
        else:
            assert torch.equal(linear.bias, layer.bias)


def test_for_inference_folds_the_vectors_into_plain_linears(model, batch):
    add_adapter(model, IA3Config(), "a")
    perturb(model, "a")
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    for_inference(model)
    assert not adapter_modules(model)  # plain Linears again: no hook, no container
    assert not any(hasattr(m, "input_deltas") or hasattr(m, "output_deltas") or m._forward_pre_hooks
                   for m in model.modules())
    with torch.no_grad():
        assert gap(model(batch["input_ids"], batch["attention_mask"]), expected, batch["attention_mask"]) < TOL


def test_a_vector_sharing_its_linear_with_another_adapter_is_not_folded(model, batch):
    from minipeft import LoRAConfig

    add_adapter(model, LoRAConfig(r=2, targets=["v"]), "lora")
    add_adapter(model, IA3Config(targets=["v"], feedforward=[]), "a")
    perturb(model)
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    IA3Config().deploy(model, "a")
    assert len(adapter_modules(model, "a")) == 6  # left as Δh: folding would reorder it with the LoRA
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]), expected)


# ---- bad input: a clear error, the model unchanged ----------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    (dict(targets=[]), "targets must be a non-empty list"),
    (dict(targets=["k", 3]), "targets must be"),
    (dict(feedforward=[""]), "feedforward must be a list"),
])
def test_bad_config_values_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        IA3Config(**values)


@pytest.mark.parametrize("config,message", [
    (IA3Config(targets=["k", "v"], feedforward=["ffn_out"]), "feedforward modules must also be targets"),
    (IA3Config(targets=["k", "nowhere"]), "matches target 'nowhere'"),
])
def test_a_config_that_does_not_fit_the_model_changes_nothing(model, config, message):
    before = structure(model)
    with pytest.raises(ValueError, match=message):
        add_adapter(model, config, "a")
    assert_unchanged(model, before)


# ---- the input site (core.add_input_delta) and IA³ on a model minipeft did not write ------------------------------

def test_input_site_reads_x_plus_delta_by_position_or_keyword_and_goes_with_its_last_delta():
    from minipeft.core import add_input_delta, remove_input_delta

    torch.manual_seed(0)
    linear, x = nn.Linear(4, 3), torch.randn(2, 4)
    expected = linear(x)
    vector = IA3Vector("a", linear, "input")
    with torch.no_grad():
        vector.l.copy_(torch.tensor([0.5, 2.0, 1.0, -1.0]))
    add_input_delta(linear, "a", vector)
    scaled = nn.functional.linear(vector.l.detach() * x, linear.weight, linear.bias)
    assert torch.allclose(linear(x), scaled) and torch.allclose(linear(input=x), scaled)
    vector.active = False
    assert torch.equal(linear(x), expected)
    remove_input_delta(linear, "a")
    assert not hasattr(linear, "input_deltas") and not linear._forward_pre_hooks
    with pytest.raises(TypeError, match="first layer instead"):
        add_input_delta(nn.Sequential(linear), "a", vector)


def test_ia3_by_name_on_a_transformers_bert_equals_peft_default(tmp_path):
    """IA³ attached by module name to transformers' BertModel itself (no minipeft backbone) = peft's default."""
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model

    make, hf_output, _ = HF_TWINS["bert"]
    torch.manual_seed(0)
    hf, batch = make().eval(), tiny_batch(twins("bert")[1])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = copy.deepcopy(hf)
    theirs = get_peft_model(hf, PeftIA3Config())
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.add_(0.3 * torch.randn_like(p))
    add_adapter(ours, IA3Config(targets=["key", "value", "output.dense"], feedforward=["output.dense"]), "a")
    vectors = {n.replace("base_model.model.", "").replace(".ia3_l.default", ""): p for n, p in
               theirs.named_parameters() if "ia3_l" in n}
    with torch.no_grad():
        for path, vector in adapter_modules(ours, "a").items():
            vector.l.copy_(vectors[path.rsplit("_deltas.", 1)[0].rsplit(".", 1)[0]].reshape(-1))
        mine, peft_out = (hf_output(m(input_ids=ids, attention_mask=mask)) for m in (ours, theirs.eval()))
    assert len(vectors) == len(adapter_modules(ours, "a")) == 8
    assert gap(mine, peft_out, mask) < TOL
