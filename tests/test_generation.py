"""minipeft.generate on SmolLM2-135M-Instruct: the KV cache changes no token, left padding changes no token, greedy
is the argmax of a full forward, sampling follows its seed and the top-p nucleus, adapters decode as attached.

Tokens are compared exactly: cached and uncached logits differ only by fp32 rounding (≤ 1e-4, ``helpers.TOL``),
so a token can flip only where the top two logits are that close; ``test_greedy_is_argmax_of_a_full_forward``
checks every step's margin and accepts a different token only inside such a tie.
"""
import pytest
import torch
from torch import nn

from minipeft import LoRAConfig, PrefixConfig, add_adapter, delete_adapter, generate, merge_adapter
from minipeft.backbones.decoder import Decoder, load_decoder_tokenizer
from minipeft.generation import sample
from helpers import TOL, assert_unchanged, perturb, structure

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "Hi",
           "Stock markets fell sharply on Monday after"]  # 5, 8, 1, 7 tokens: left padding in every batch
STEPS = 6


@pytest.fixture(scope="module")
def decoder():
    return Decoder.from_pretrained()


@pytest.fixture(scope="module")
def tok():
    return load_decoder_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tok):
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids), "prompts of different lengths, so the batch is padded"
    return ids


@pytest.fixture(scope="module")
def greedy(decoder, prompt_ids):
    """The reference: greedy, cached, the four prompts in one left-padded batch."""
    return generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False).tokens


def test_cached_equals_uncached_and_alone_equals_batched(decoder, tok, prompt_ids, greedy):
    assert generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False, use_cache=False).tokens == greedy
    for ids, expected in zip(prompt_ids, greedy):
        assert generate(decoder, [ids], max_new_tokens=STEPS, stop_at_eos=False).tokens == [expected]
    assert generate(decoder, PROMPTS, tok, max_new_tokens=STEPS, stop_at_eos=False).tokens == greedy  # strings


def test_padding_treated_as_real_tokens_would_be_caught(decoder, prompt_ids, greedy):
    """The comparison above has teeth: four pad tokens read as real ones (a broken mask) change the tokens."""
    pad = decoder.cfg.pad_token_id
    broken = generate(decoder, [[pad] * 4 + ids for ids in prompt_ids], max_new_tokens=STEPS, stop_at_eos=False)
    assert sum(a != b for a, b in zip(broken.tokens, greedy)) >= 2


def test_greedy_is_argmax_of_a_full_forward(decoder, prompt_ids, greedy):
    """Each token is argmax of the logits of one uncached, unpadded forward over the prompt and the tokens so far
    (or ties the maximum within TOL: fp32 rounding may then pick either)."""
    for ids, tokens in zip(prompt_ids[:2], greedy[:2]):
        for t, token in enumerate(tokens):
            with torch.no_grad():
                z = decoder.logits(decoder(torch.tensor([ids + tokens[:t]]))[0, -1])  # (V,)
            assert token == int(z.argmax()) or z.max() - z[token] < TOL, (t, token, int(z.argmax()))


def test_sampling_follows_its_seed_and_top_p(decoder, prompt_ids, greedy):
    def draw(**kw):
        return generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False, do_sample=True, **kw).tokens

    a = draw(seed=0, temperature=1.5)
    assert draw(seed=0, temperature=1.5) == a  # reproducible
    assert draw(seed=0, temperature=1.5, use_cache=False) == a  # the cache changes no draw either
    assert draw(seed=1, temperature=1.5) != a  # 24 draws at τ = 1.5: another seed gives other tokens
    assert draw(seed=2, top_p=1e-6) == greedy  # a nucleus of one token is greedy decoding


def test_top_p_keeps_the_smallest_set_reaching_p():
    """p = (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps {0, 1} (0.5 < 0.7 ≤ 0.8), renormalised to (0.625, 0.375);
    top_p 0.4 keeps {0} (Holtzman et al. 2020, Eq. 2-3)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, 1.0, 0.7, g), minlength=4) / 4000
    assert counts[2:].sum() == 0 and abs(counts[1] - 0.375) < 0.04  # 5 standard deviations (0.0077)
    assert torch.equal(sample(logits, 1.0, 0.4, g), torch.zeros(4000, dtype=torch.long))
    low_temperature = torch.bincount(sample(logits, 0.05, 1.0, g), minlength=4)  # τ → 0: the argmax
    assert low_temperature[0] == 4000


def test_prefix_keys_values_sit_in_the_cache_in_front(decoder, prompt_ids, greedy):
    add_adapter(decoder, PrefixConfig(length=4, reparameterize=False, init="tokens"), "p")  # real words' K/V
    try:
        result = generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False)
        assert generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False, use_cache=False).tokens \
            == result.tokens
        assert result.tokens != greedy  # the prefix steers the continuation
        layer, T = result.cache.layers[7], max(map(len, prompt_ids))
        assert layer.prefix_len == 4 and layer.k.shape == (4, 3, 4 + T + STEPS - 1, 64)  # last token never fed
        p_k, p_v = decoder.prefixes["p"]()[7]  # (l, 192): 3 key/value heads of width 64, as given (no RoPE)
        assert torch.equal(layer.k[:, :, :4], p_k.view(4, 3, 64).transpose(0, 1).expand(4, -1, -1, -1))
        assert torch.equal(layer.v[:, :, :4], p_v.view(4, 3, 64).transpose(0, 1).expand(4, -1, -1, -1))
    finally:
        delete_adapter(decoder, "p")


def test_lora_merged_decodes_the_same_tokens(decoder, prompt_ids, greedy):
    targets = [m.weight for layer in decoder.layers for m in (layer.attn.q, layer.attn.v)]
    saved = [w.detach().clone() for w in targets]  # unmerging leaves fp32 rounding in W: restore it exactly
    add_adapter(decoder, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), "lora")
    perturb(decoder, "lora", scale=0.05)
    try:
        unmerged = generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False).tokens
        assert unmerged != greedy  # the LoRA changes the continuation
        merge_adapter(decoder, "lora")
        assert generate(decoder, prompt_ids, max_new_tokens=STEPS, stop_at_eos=False).tokens == unmerged
    finally:
        delete_adapter(decoder, "lora")
        with torch.no_grad():
            for w, s in zip(targets, saved):
                w.copy_(s)


def test_each_prompt_stops_at_its_eos(decoder, prompt_ids, greedy):
    first = next(t for t in range(2, STEPS) if greedy[0][t] not in greedy[0][:t])  # prompt 0's t-th token, new
    eos = greedy[0][first]
    result = generate(decoder, prompt_ids[:2], max_new_tokens=STEPS, eos_token_id=eos)
    assert result.tokens[0] == greedy[0][:first + 1] and result.stopped_at_eos[0]  # EOS kept, then stopped
    other = greedy[1][:greedy[1].index(eos) + 1] if eos in greedy[1] else greedy[1]
    assert result.tokens[1] == other and result.stopped_at_eos[1] == (eos in greedy[1])  # unaffected
    assert generate(decoder, [prompt_ids[1]], max_new_tokens=2, stop_at_eos=False).stopped_at_eos == [False]


def test_bad_input_is_refused_and_leaves_the_model_unchanged(decoder, tok, prompt_ids):
    decoder.train()  # generate decodes in eval mode; the flags must come back as they were
    before = structure(decoder)
    try:
        assert generate(decoder, prompt_ids[:1], max_new_tokens=1).tokens  # a good call changes nothing either
        bad = [
            (dict(prompts=[""], tokenizer=tok), ValueError, r"prompt 0 is empty \(0 tokens\)"),
            (dict(prompts=[[1, 2], []]), ValueError, r"prompt 1 is empty"),
            (dict(prompts=[]), TypeError, "non-empty list"),
            (dict(prompts="Hi", tokenizer=tok), TypeError, r"one prompt: \[prompt\]"),
            (dict(prompts=["Hi"]), TypeError, "string prompts need a tokenizer"),
            (dict(prompts=[[5] * 8193]), ValueError, r"prompt 0 has 8193 tokens, longer than the context of 8192"),
            (dict(prompts=[[5] * 8170], max_new_tokens=32), ValueError, "8202 positions"),
            (dict(prompts=[[1, 49152]]), ValueError, r"allowed: \[0, 49151\]"),
            (dict(prompts=[[1]], temperature=0.0), ValueError, r"temperature must be a number > 0"),
            (dict(prompts=[[1]], temperature=-1, do_sample=True), ValueError, "got -1"),
            (dict(prompts=[[1]], top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
            (dict(prompts=[[1]], top_p=1.5), ValueError, r"top_p must be in \(0, 1\].*got 1.5"),
            (dict(prompts=[[1]], max_new_tokens=0), ValueError, "max_new_tokens must be an integer >= 1"),
            (dict(prompts=[[1]], eos_token_id=-3), ValueError, r"eos_token_id must be .* \[0, 49151\]"),
        ]
        for kwargs, error, message in bad:
            with pytest.raises(error, match=message):
                generate(decoder, **kwargs)
        with pytest.raises(TypeError, match="needs a decoder backbone"):
            generate(nn.Linear(2, 2), [[1]])
        assert_unchanged(decoder, before)
    finally:
        decoder.eval()
