"""The from-scratch Llama decoder equals transformers' LlamaForCausalLM on SmolLM2-135M-Instruct's weights."""
import json
import time

import pytest
import torch
from torch import nn

from minipeft.backbones.decoder import Decoder, DecoderConfig, checkpoint_dir, load_decoder_tokenizer

SMOLLM2_PARAMS = 134_515_008  # tied embeddings counted once


@pytest.fixture(scope="module")
def decoder():
    return Decoder.from_pretrained()  # the first call ever converts the GGUF file (≈ 30-60 s), then cached


@pytest.fixture(scope="module")
def hf_llama(decoder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(checkpoint_dir()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok():
    return load_decoder_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    """Chat prompts of real BBC headlines; prompt i lists the first i + 1 headlines, so lengths all differ."""
    from minipeft.lab.tasks import load_task

    heads = list(load_task("topic", max_test=4)["test"]["text"])
    return [tok.apply_chat_template([{"role": "user", "content": "Which topic: " + "; ".join(heads[:i + 1])}],
                                    tokenize=False, add_generation_prompt=True) for i in range(4)]


def encode(tok, prompts, side):
    tok.padding_side = side
    return tok(prompts, padding=True, return_tensors="pt")


def max_logit_difference(decoder, hf_llama, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens at 0..n-1, as the decoder numbers them
    with torch.no_grad():
        ours = decoder.logits(decoder(ids, mask))
        theirs = hf_llama(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return (ours - theirs)[mask.bool()].abs().max().item()  # padded positions are undefined in both


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_transformers(decoder, hf_llama, tok, prompts, side):
    batch = encode(tok, prompts, side)
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 4, "prompts of different lengths, padded"
    assert max_logit_difference(decoder, hf_llama, batch) < 1e-4


def test_equivalence_test_can_fail(decoder, hf_llama, tok, prompts):
    batch = encode(tok, prompts, "left")
    o = decoder.layers[5].attn.o.weight
    saved = o.detach().clone()
    try:
        with torch.no_grad():
            o.zero_()
        assert max_logit_difference(decoder, hf_llama, batch) > 1e-2
    finally:
        with torch.no_grad():
            o.copy_(saved)


def test_smollm2_facts(decoder):
    c = decoder.cfg
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (30, 576, 9, 3, 1536)
    assert decoder.attention.kv_width == 3 * 64 == 192 and c.tie_embeddings
    assert sum(p.numel() for p in decoder.parameters()) == SMOLLM2_PARAMS == decoder.bare_parameter_count()
    assert list(decoder.layers[0].attn.linears()) == ["q", "k", "v", "o"]
    assert list(decoder.layers[0].ffn.linears()) == ["gate", "up", "down"]
    assert decoder.identity()["kv_width"] == 192


def test_cached_load_is_fast(decoder):
    start = time.perf_counter()
    again = Decoder.from_pretrained()
    assert time.perf_counter() - start < 3.0
    assert torch.equal(again.layers[3].ffn.up.weight, decoder.layers[3].ffn.up.weight)


def test_hf_name_map_round_trip(decoder, hf_llama):
    hf_keys = [k for k in hf_llama.state_dict() if k != "lm_head.weight"]  # tied: it is the embedding
    assert sorted(Decoder.our_name(k) for k in hf_keys) == sorted(decoder.state_dict())
    assert all(Decoder.hf_name(Decoder.our_name(k)) == k for k in hf_keys)
    assert all(Decoder.our_name(Decoder.hf_name(k)) == k for k in decoder.state_dict())
    assert Decoder.hf_name("layers.7.attn.norm.weight") == "model.layers.7.input_layernorm.weight"


# ---- KV cache ------------------------------------------------------------------------------------------------

def incremental_logits(decoder, ids, mask, first):
    """Feed ids[:, :first], then one token at a time through one cache; logits of every fed token."""
    cache, out = decoder.new_cache(), []
    with torch.no_grad():
        out.append(decoder.logits(decoder(ids[:, :first], mask[:, :first], cache=cache)))
        for t in range(first, ids.shape[1]):
            out.append(decoder.logits(decoder(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)))
    assert len(cache) == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_equals_uncached(decoder, tok, prompts, side):
    batch = encode(tok, prompts, side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = decoder.logits(decoder(ids, mask))
    step = incremental_logits(decoder, ids, mask, first=ids.shape[1] - 4)
    real = mask.bool()
    assert (full - step)[real].abs().max() < 1e-4
    assert (full[:, -1] - step[:, -1]).abs().max() < 1e-4  # last token (left padding: real in every row)


def test_cached_greedy_decoding_equals_uncached(decoder, tok, prompts):
    batch = encode(tok, prompts[:2], "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache = decoder.new_cache()
    with torch.no_grad():
        logits = decoder.logits(decoder(ids, mask, cache=cache))[:, -1]
        for _ in range(4):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = decoder.logits(decoder(nxt, torch.ones_like(nxt), cache=cache))[:, -1]
            uncached = decoder.logits(decoder(ids, mask))[:, -1]
            assert (logits - uncached).abs().max() < 1e-4


# ---- prefix (the contract's per-layer extra keys/values) -----------------------------------------------------

class FixedPrefix(nn.Module):
    """A stand-in prefix module: per layer (P_k, P_v), each (l, width)."""

    def __init__(self, num_layers, length, width):
        super().__init__()
        self.active = True
        self.p = nn.Parameter(torch.randn(num_layers, 2, length, width))

    def forward(self):
        return [(p[0], p[1]) for p in self.p]


@pytest.fixture
def with_prefix(decoder):
    torch.manual_seed(0)
    decoder.prefixes["test"] = FixedPrefix(decoder.num_layers, 5, decoder.attention.kv_width)
    yield decoder
    del decoder.prefixes["test"]


def test_prefix_changes_outputs_and_inactive_is_exactly_base(decoder, tok, prompts):
    batch = encode(tok, prompts, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        base = decoder(ids, mask)
        torch.manual_seed(0)
        decoder.prefixes["test"] = FixedPrefix(decoder.num_layers, 5, 192)
        try:
            with_prefix = decoder(ids, mask)
            decoder.prefixes["test"].active = False
            inactive = decoder(ids, mask)
        finally:
            del decoder.prefixes["test"]
    real = mask.bool()
    assert (with_prefix - base)[real].abs().max() > 1e-1
    assert torch.equal(inactive, base)


def test_prefix_with_cache_equals_without(with_prefix, tok, prompts):
    batch = encode(tok, prompts[:3], "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        full = with_prefix.logits(with_prefix(ids, mask))
    step = incremental_logits(with_prefix, ids, mask, first=ids.shape[1] - 3)
    assert (full - step)[mask.bool()].abs().max() < 1e-4


def test_prefix_batched_form_and_wrong_width(decoder):
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.manual_seed(0)
    flat = FixedPrefix(decoder.num_layers, 2, 192)
    batched = FixedPrefix(decoder.num_layers, 2, 192)
    batched.p = nn.Parameter(flat.p.detach()[:, :, None])  # (L, 2, B=1, l, width)
    with torch.no_grad():
        decoder.prefixes["test"] = flat
        try:
            a = decoder(ids)
            decoder.prefixes["test"] = batched
            assert torch.equal(decoder(ids), a)
            decoder.prefixes["test"] = FixedPrefix(decoder.num_layers, 2, decoder.hidden_size)  # d, not kv width
            with pytest.raises(ValueError, match=r"\(l, 192\)"):
                decoder(ids)
        finally:
            del decoder.prefixes["test"]


# ---- bad input -----------------------------------------------------------------------------------------------

def test_other_family_rejected(tmp_path):
    with pytest.raises(ValueError, match="Llama family"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2"}, name="gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'bert' model"):
        Decoder.from_pretrained(tmp_path)


def test_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        Decoder.from_pretrained(tmp_path)


def test_weights_of_another_shape_rejected():
    cfg = DecoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=32, max_position=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    state = {Decoder.hf_name(k): v for k, v in Decoder(cfg).state_dict().items()}
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(32, 16)
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['final_norm.weight'\].*unexpected \['layers.2.ffn.up.weight'\]"):
        Decoder(cfg).load_hf_state_dict(state)


def test_bad_config():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderConfig(num_heads=9, num_kv_heads=2)
    with pytest.raises(ValueError, match="hidden_size"):
        DecoderConfig(hidden_size=100, num_heads=9)
    with pytest.raises(ValueError, match="rope type"):
        DecoderConfig.from_hf_dict({"model_type": "llama", "rope_parameters": {"rope_type": "yarn"}})


def test_bad_inputs(decoder):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="integer tensor of shape"):
        decoder(ids.float())
    with pytest.raises(ValueError, match="integer tensor of shape"):
        decoder(ids[0])
    with pytest.raises(ValueError, match=r"\[0, 49151\]"):
        decoder(torch.tensor([[1, 49152]]))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        decoder(ids, torch.ones(1, 4))
    with pytest.raises(ValueError, match="exceed the context of 8192"):
        decoder(torch.zeros(1, 8193, dtype=torch.long))
    cache = decoder.new_cache()
    with torch.no_grad():
        decoder(ids, cache=cache)
    with pytest.raises(ValueError, match="new cache"):
        decoder(torch.tensor([[1], [2]]), cache=cache)
