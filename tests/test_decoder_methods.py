"""The Llama-family decoder's own cases (every method on it: tests/test_conformance.py): grouped-query prefix width,
SmolLM2-sized counts by closed form, an encoder's adapter refused, LoRA equal to peft on the real SmolLM2."""
import pytest
import torch

from minipeft import (BottleneckConfig, CompacterConfig, LoRAConfig, PrefixConfig, ScaledParallelAdapterConfig,
                      add_adapter, eject_prefix, load_adapter, parameter_summary, save_adapter, set_active)
from minipeft.backbones.decoder import Decoder, DecoderConfig, checkpoint_dir
from minipeft.methods.bottleneck import houlsby_count, pfeiffer_count
from minipeft.methods.compacter import compacter_count
from minipeft.methods.lora import lora_count
from minipeft.methods.mam import MAMConfig, mam_stored_count
from minipeft.methods.parallel import parallel_count
from minipeft.methods.prefix import prefix_stored_count, prefix_training_count
from helpers import TOL, gap, padded_tokens, perturb, run

TINY = DecoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                     max_position=64, name="tiny-llama (random)")
LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Decoder(TINY).eval()


@pytest.fixture(scope="module")
def tiny_batch():
    return padded_tokens(TINY, 10, (0, 4, 7))


def test_prefix_width_is_the_key_value_width(tiny, tiny_batch):
    """SmolLM2-style grouped-query attention: a prefix position holds num_kv_heads × head_dim numbers."""
    add_adapter(tiny, PrefixConfig(length=3, reparameterize=False), "p")
    assert tiny.prefixes["p"].prefix.shape == (2, 2, 3, 2 * 16)
    perturb(tiny)
    expected = run(tiny, tiny_batch)
    add_adapter(tiny, PrefixConfig(length=3, hidden=8), "r")
    eject_prefix(tiny, "r")
    set_active(tiny, "p")
    assert torch.equal(run(tiny, tiny_batch), expected)


def test_counts_on_smollm2_by_closed_form():
    """On SmolLM2-135M's shape (built on the meta device): every count equals its closed form."""
    with torch.device("meta"):
        model = Decoder(DecoderConfig())
    d, L, w, f = 576, 30, 192, 1536
    shapes = {"q": (d, d), "k": (d, w), "v": (d, w), "o": (d, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    expected = {
        "houlsby": (BottleneckConfig(bottleneck=64), houlsby_count(d, L, 64)),
        "pfeiffer": (BottleneckConfig(placement="pfeiffer", bottleneck=48), pfeiffer_count(d, L, 48)),
        "lora": (LoRAConfig(r=8, targets=LINEARS), sum(lora_count(8, *s, num_layers=L) for s in shapes.values())),
        "compacter": (CompacterConfig(bottleneck=24, n=4), compacter_count(d, L, 24)),
        "scaled": (ScaledParallelAdapterConfig(r=64), parallel_count(d, L, 64)),
        "prefix": (PrefixConfig(length=30, hidden=512), prefix_training_count(d, L, 30, 512, kv_width=w)),
        "mam": (MAMConfig(), prefix_training_count(d, L, 30, 800, kv_width=w) + parallel_count(d, L, d // 2)),
    }
    for name, (config, count) in expected.items():
        add_adapter(model, config, name)
        assert parameter_summary(model, name).adapter == count, name
    assert parameter_summary(model, "prefix").stored == prefix_stored_count(w, L, 30) == 345_600
    assert parameter_summary(model, "mam").stored == mam_stored_count(d, L, 30, d // 2, kv_width=w)


def test_an_encoder_adapter_does_not_load_into_the_decoder(minilm, tiny, tmp_path):
    import copy

    from helpers import assert_unchanged, structure

    encoder = copy.deepcopy(minilm)
    add_adapter(encoder, LoRAConfig(r=2), "a")
    save_adapter(encoder, "a", tmp_path)
    before = structure(tiny)
    with pytest.raises(ValueError, match="trained on a backbone with family=bert .* this model has family=llama"):
        load_adapter(tiny, tmp_path)
    assert_unchanged(tiny, before)


# ---- the real SmolLM2: minipeft LoRA == peft LoRA on transformers' LlamaForCausalLM ----------------------------

@pytest.fixture(scope="module")
def smollm2():
    return Decoder.from_pretrained()


def test_lora_equals_peft_on_llama(smollm2):
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from minipeft.backbones.decoder import load_decoder_tokenizer

    tok = load_decoder_tokenizer()
    tok.padding_side = "left"
    batch = tok(["Write a headline: markets rose today.", "Hello", "The match ended in a draw after extra time."],
                padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    mine = copy.deepcopy(smollm2)
    add_adapter(mine, LoRAConfig(r=8, alpha=16, targets=LINEARS), "a")
    perturb(mine)
    hf = LlamaForCausalLM.from_pretrained(str(checkpoint_dir()), dtype=torch.float32).eval()
    theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_" in name:  # base_model.model.model.layers.i.self_attn.q_proj.lora_A.default.weight
                linear = mine.our_name(name.split("base_model.model.", 1)[1].split(".lora_")[0])
                ours = mine.get_submodule(linear).output_deltas["a"]
                p.copy_(ours.A if ".lora_A." in name else ours.B)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = mine.logits(mine(ids, mask))
        b = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        base = smollm2.logits(smollm2(ids, mask))
    assert gap(a, b, mask) < TOL
    assert gap(a, base, mask) > 100 * TOL  # the LoRA is not a no-op
