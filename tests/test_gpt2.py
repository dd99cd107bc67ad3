"""GPT-2, the third backbone, in one file: equal to transformers' GPT2LMHeadModel on random weights (no download),
and every registered method attaches to it through the backbone contract (tests/test_conformance.py covers each
one)."""
import pytest
import torch
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel, GPT2Model

from minipeft import LoRAConfig, add_adapter
from minipeft.backbones import REGISTRY
from minipeft.backbones.gpt2 import GPT2, GPT2Config
from helpers import TOL, gap




def hf_tiny():
    torch.manual_seed(0)
    return GPT2LMHeadModel(HFGPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64,
                                        bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module")
def hf():
    return hf_tiny()


@pytest.fixture
def tiny(hf):
    return REGISTRY["gpt2"].cls.from_hf(hf)


@pytest.fixture(scope="module")
def batch():
    """Random tokens, right-padded to different lengths."""
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def test_logits_equal_transformers_gpt2(hf, tiny, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours, theirs = tiny.logits(tiny(ids, mask)), hf(input_ids=ids, attention_mask=mask).logits
    assert gap(ours, theirs, mask) < TOL
    assert gap(ours[:, :, :1], theirs[:, :, 1:2], mask) > 100 * TOL  # the tolerance separates different logits


def test_left_padding_equals_transformers_with_its_generation_positions(hf, tiny, batch):
    """Left padding: real tokens at positions 0..n-1, as transformers' generate passes them (position_ids)."""
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    with torch.no_grad():
        ours = tiny.logits(tiny(ids, mask))
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    assert gap(ours, theirs, mask) < TOL


def test_gpt2model_without_head_and_kv_cache(hf, tiny, batch):
    """A GPT2Model (no lm_head, names without ``transformer.``) converts too; feeding the tokens one at a time
    through the KV cache gives the hidden states of the whole sequence."""
    body = GPT2Model(hf.config).eval()
    body.load_state_dict(hf.transformer.state_dict())
    ids = batch["input_ids"][:1]
    converted = GPT2.from_hf(body)
    with torch.no_grad():
        whole = converted(ids)
        assert gap(whole, body(input_ids=ids).last_hidden_state) < TOL
        cache = converted.new_cache()
        steps = torch.cat([converted(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    assert gap(steps, whole) < TOL


def test_conversion_transposes_and_splits(hf, tiny):
    """c_attn (d, 3d) in Conv1D layout is [W_q; W_k; W_v]ᵀ: our q, k, v are its transposed thirds."""
    c_attn = hf.transformer.h[1].attn.c_attn
    assert torch.equal(tiny.layers[1].attn.k.weight, c_attn.weight[:, 64:128].t())
    assert torch.equal(tiny.layers[1].attn.v.bias, c_attn.bias[128:])
    assert torch.equal(tiny.layers[0].ffn.ffn_in.weight, hf.transformer.h[0].mlp.c_fc.weight.t())


def test_unsupported_configs_are_refused_by_name():
    base = HFGPT2Config(n_layer=2, n_embd=64, n_head=4).to_dict()
    for key, value in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True)):
        with pytest.raises(ValueError, match=f"{key}=True not supported"):
            GPT2Config.from_hf_dict({**base, key: value})
    with pytest.raises(ValueError, match="is a 'llama' model"):
        GPT2Config.from_hf_dict({**base, "model_type": "llama"})


def test_wrong_weights_rejected_and_model_untouched(hf):
    model = GPT2(GPT2Config.from_hf_dict(hf.config.to_dict()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(hf.state_dict())
    del state["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match=r"does not fit a GPT-2 decoder: missing \['final_norm.bias'\]"):
        model.load_hf_state_dict(state)
    state = {**hf.state_dict(), "transformer.wpe.weight": torch.zeros(32, 64)}
    with pytest.raises(ValueError, match=r"position.weight: \(32, 64\) where the config says \(64, 64\)"):
        model.load_hf_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_files_are_refused_on_gpt2(tiny, tmp_path):
    """transformers' GPT-2 fuses q|k|v in c_attn: peft's files cannot describe a LoRA on our q, v. Both ways are
    refused with the reason, the model left as it was."""
    from helpers import assert_unchanged, structure

    from minipeft import export_peft, import_peft

    from peft import LoraConfig, get_peft_model

    get_peft_model(hf_tiny(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(
        tmp_path / "peft")
    add_adapter(tiny, LoRAConfig(r=4), "task")
    before = structure(tiny)
    for call in (lambda: export_peft(tiny, "task", tmp_path / "out"),
                 lambda: import_peft(tiny, tmp_path / "peft", "other")):
        with pytest.raises(ValueError, match="fuses W_q, W_k, W_v"):
            call()
        assert_unchanged(tiny, before)
    assert not (tmp_path / "out").exists()
