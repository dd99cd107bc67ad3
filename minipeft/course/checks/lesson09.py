"""Lesson 09 checks: rotary positions, cached attention with a prefix, and the cache's size, against minipeft's
decoder (SmolLM2-135M-Instruct: d = 576, H = 9 query heads, H_kv = 3 key/value heads of width d_h = 64).

    rope(x, positions, theta)            x (..., T, d_h) rotated at ``positions`` (T,): x ⊙ cos mθ + rot(x) ⊙ sin mθ,
                                         θ_i = theta^(−2i/d_h), rot(x1, x2) = (−x2, x1) (Su et al. 2021, Eq. 34)
    cached_attention(attn, x, cache, prefix, theta)
                                         one attention sublayer on T new tokens x (B, T, d), their keys/values
                                         appended to ``cache`` (a dict: "k", "v" (B, H_kv, l + S + T, d_h), keys
                                         rotated, the prefix first; "prefix_len" l); ``prefix`` (P_k, P_v), each
                                         (l, H_kv·d_h), enters the cache on the first call (Li & Liang 2021, §4.2)
    kv_cache_numbers(L, H_kv, d_h, l, S) numbers a cache holds after S tokens with a prefix of l: 2·L·H_kv·d_h·(l + S)

References: ``Attention.sublayer`` with a ``LayerKV`` (the package's cached attention), ``rotary`` and
``rotate_half``; generation with ``minipeft.generate``; the count is the numel of a real ``KVCache``.

Tolerance: fp32 (u = 2⁻²⁴ ≈ 6e-8). The learner's attention may sum in another order (an explicit softmax instead
of the fused kernel, a loop over heads): each length-64 dot product and the softmax-weighted sum over ≤ 20 keys
then differ by ≈ √64·u·Σ|terms|, about 1e-6 relative (measured here: ≤ 1e-6). The checks allow 1e-4 relative to
the largest reference value, while the nearest mistake named below (dividing by √d instead of √d_h) moves the
output by more than 0.05 relative (``tests/test_checks_09.py`` runs each mistake). Generated tokens are compared
exactly: the prompt is fixed and every step's margin between the top two logits is far above 1e-4 (the smallest
is 0.31, measured).
"""
from __future__ import annotations

import math
import types
from functools import lru_cache

import torch

from ...backbones.decoder import LayerKV, rotary, rotate_half
from ...lab.generation_train import decoder_tokenizer as tokenizer
from . import call, fail, max_error, need_int, passed

TOL = 1e-4  # relative to the largest reference value; see the module docstring
LAYER = 3  # the attention the check uses (any layer would do)
PREFIX_LEN = 4
CALLS = (6, 1, 1, 2)  # new tokens per call: a prompt, two single tokens, a chunk of two
PROMPT = "The prefix sits in front of every token, at no position of its own."


@lru_cache(maxsize=1)
def decoder():
    from ...backbones.decoder import Decoder

    return Decoder.from_pretrained().eval()


# ---- the package's answers ------------------------------------------------------------------------------------

def reference_rope(x, positions, theta):
    cos, sin = rotary(positions[None], x.shape[-1], theta)  # (1, 1, T, d_h)
    return x * cos[0, 0] + rotate_half(x) * sin[0, 0]


def reference_attention(attn, x, kv: LayerKV, prefix, theta):
    """The package's cached attention: ``Attention.sublayer`` at the positions after what ``kv`` holds."""
    past = 0 if kv.k is None else kv.k.shape[2] - kv.prefix_len
    positions = torch.arange(past, past + x.shape[1])[None].expand(x.shape[0], -1)
    rope = rotary(positions, attn.d_h, theta)
    n_prefix = kv.prefix_len if kv.k is not None else (0 if prefix is None else prefix[0].shape[0])
    T, keys = x.shape[1], n_prefix + past + x.shape[1]
    mask = None
    if keys != T:  # query t sees the prefix, the past and the new tokens up to itself
        mask = (torch.arange(keys)[None, :] <= torch.arange(T)[:, None] + n_prefix + past)[None, None]
    return attn.sublayer(x, rope, mask, prefix, kv)


def mistaken_attention(attn, x, cache, prefix, theta, mistake):
    """``cached_attention`` written with one named mistake (to recognise it in a learner's output)."""
    B, T, _ = x.shape
    H, H_kv, d_h = attn.H, attn.H_kv, attn.d_h
    heads = lambda t, n: t.view(B, T, n, d_h).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q(x), H), heads(attn.k(x), H_kv), heads(attn.v(x), H_kv)
    first = "k" not in cache
    l = (0 if prefix is None else prefix[0].shape[0]) if first else cache["prefix_len"]
    past = 0 if first else cache["k"].shape[2] - l
    start = past + (l if mistake == "prefix takes positions" else 0)
    positions = torch.arange(start, start + T)
    q, k = reference_rope(q, positions, theta), reference_rope(k, positions, theta)
    if first:
        cache.update(k=k[:, :, :0], v=v[:, :, :0], prefix_len=l)
        if prefix is not None:
            pk, pv = (p.view(1, l, H_kv, d_h).transpose(1, 2).expand(B, -1, -1, -1) for p in prefix)
            if mistake == "prefix keys rotated":
                pk = reference_rope(pk, torch.arange(l), theta)
            cache.update(k=pk, v=pv)
    if mistake != "cache not updated":
        cache["k"], cache["v"] = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        k, v = cache["k"], cache["v"]
    else:
        k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
    group = H // H_kv
    if mistake == "heads shared wrongly":
        k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    else:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = math.sqrt(attn.H * d_h if mistake == "scaled by sqrt(d)" else d_h)
    scores = q @ k.transpose(-1, -2) / scale  # (B, H, T, keys)
    keys = k.shape[2]
    if mistake != "no causal mask":
        allowed = torch.arange(keys)[None, :] <= torch.arange(T)[:, None] + keys - T
        scores = scores.masked_fill(~allowed, float("-inf"))
    a = scores.softmax(-1) @ v  # (B, H, T, d_h)
    return attn.o(a.transpose(1, 2).reshape(B, T, H * d_h))


MISTAKES = {
    "prefix keys rotated": "the prefix's keys were rotated. The prefix is used as given (Li & Liang 2021, §4.2): it "
                           "has no position, so RoPE never touches it; only the real tokens' keys are rotated.",
    "prefix takes positions": "the real tokens were numbered after the prefix (l, l + 1, ...). The prefix takes no "
                              "position: the first real token is at position 0, as without a prefix.",
    "no causal mask": "a token of the first call attends to the tokens after it. Token t may see the prefix, the "
                      "cache and the new tokens up to itself (keys ≤ l + S + t).",
    "scaled by sqrt(d)": "the scores were divided by √d = √576. Each head's scores are divided by the head's "
                         "width, √d_h = √64.",
    "heads shared wrongly": "key/value head j must serve query heads j·H/H_kv ... (j + 1)·H/H_kv − 1 (contiguous "
                            "groups: repeat_interleave), not every H_kv-th head (repeat).",
    "cache not updated": "the new keys/values were used but not stored in the cache, so the next call cannot see "
                         "these tokens.",
}


def _inputs(B: int = 2):
    """Real hidden states: the embeddings of a real sentence through the layer's RMSNorm, a random prefix of the
    size of real keys/values (seeded), the layer's attention and SmolLM2's RoPE base."""
    model = decoder()
    attn = model.layers[LAYER].attn
    ids = tokenizer()(PROMPT)["input_ids"][:sum(CALLS)]
    with torch.no_grad():
        x = attn.norm(model.embed(torch.tensor([ids] * B)))  # (B, sum(CALLS), d)
        x[1:] = x[1:].flip(1)  # the rows differ
    g = torch.Generator().manual_seed(9)
    width = attn.H_kv * attn.d_h
    prefix = tuple(torch.randn(PREFIX_LEN, width, generator=g) * s for s in (3.0, 0.5))  # like real k, v scales
    return attn, x, prefix, model.cfg.rope_theta


# ---- the checks -------------------------------------------------------------------------------------------

def check_rope(fn) -> None:
    """``fn(x, positions, theta)`` against the package's rotary embedding; also: scores depend on m − n only."""
    name = "rope"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 64, generator=g)
    positions, theta = torch.arange(5, 12), 100000.0
    want = reference_rope(x, positions, theta)
    got = call(name, fn, x.clone(), positions, theta, hint="x is (..., T, d_h), positions (T,), theta a float.")
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        fail(name, f"returned {getattr(got, 'shape', type(got).__name__)}; expected a tensor shaped like x "
                   f"{tuple(x.shape)}.")
    scale = want.abs().max()
    if (got - want).abs().max() <= TOL * scale:
        a = fn(x[..., :1, :], torch.tensor([3]), theta)[..., 0, :]
        b = fn(x[..., 1:2, :], torch.tensor([1]), theta)[..., 0, :]
        a2 = fn(x[..., :1, :], torch.tensor([12]), theta)[..., 0, :]
        b2 = fn(x[..., 1:2, :], torch.tensor([10]), theta)[..., 0, :]
        shift = ((a * b).sum(-1) - (a2 * b2).sum(-1)).abs().max()
        if shift > TOL * (x[..., :2, :] ** 2).sum(-1).max():
            raise RuntimeError("RoPE's relative-position property fails on a correct rope: the check is broken")
        passed(name, "matches the decoder's RoPE; q·k at positions (3, 1) equals q·k at (12, 10): the score depends "
                     "on m − n only")
        return
    x1, x2 = x[..., ::2], x[..., 1::2]  # adjacent pairs, RoFormer's own layout
    inv = theta ** (-torch.arange(0, 64, 2).float() / 64)
    ang = positions[:, None].float() * inv
    adjacent = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)
    cos, sin = rotary(positions[None], 64, theta)
    wrong = {"adjacent": adjacent, "backwards": x * cos[0, 0] - rotate_half(x) * sin[0, 0],
             "exponent": x * torch.cat([(positions[:, None] * theta ** (-torch.arange(32) / 64)).cos()] * 2, -1)
             + rotate_half(x) * torch.cat([(positions[:, None] * theta ** (-torch.arange(32) / 64)).sin()] * 2, -1)}
    says = {"adjacent": "you rotated adjacent pairs (x0, x1), (x2, x3), ... Llama's weights (and transformers, and "
                        "minipeft) pair coordinate i with i + d_h/2: rot(x1, x2) = (−x2, x1) on the two halves.",
            "backwards": "the rotation goes the wrong way: x ⊙ cos mθ + rot(x) ⊙ sin mθ, with rot(x1, x2) = (−x2, x1).",
            "exponent": "the frequencies are θ_i = theta^(−2i/d_h) for i = 0 .. d_h/2 − 1 (the exponent has 2i)."}
    for key, w in wrong.items():
        if (got - w).abs().max() <= TOL * scale:
            fail(name, says[key])
    fail(name, f"differs from the decoder's RoPE: {max_error(got, want)} (allowed {TOL * scale:.2g}). "
               "R_m x = x ⊙ cos(mθ) + rot(x) ⊙ sin(mθ), θ_i = theta^(−2i/d_h), the angles repeated over both halves.")


def check_cached_attention(fn) -> None:
    """``fn(attn, x, cache, prefix, theta)`` call by call (a 6-token prompt, then 1, 1, 2 tokens), with a prefix
    and without, against ``Attention.sublayer`` with a LayerKV: outputs and cache contents."""
    name = "cached_attention"
    attn, x, prefix, theta = _inputs()
    with torch.no_grad():
        for p in (prefix, None):
            kv, cache, start = LayerKV(), {}, 0
            shadows = {m: {} for m in MISTAKES}
            for n, T in enumerate(CALLS):
                chunk = x[:, start:start + T]
                want = reference_attention(attn, chunk, kv, p, theta)
                got = call(name, fn, attn, chunk.clone(), cache, p, theta,
                           hint="attn is the layer's Attention (attn.q/k/v/o, attn.H, attn.H_kv, attn.d_h); x (B, T, d); "
                                "cache a dict (empty on the first call); prefix (P_k, P_v) or None; theta a float.")
                shadow_out = {m: mistaken_attention(attn, chunk, shadows[m], p, theta, m) for m in MISTAKES}
                where = (f"call {n + 1} ({T} new token{'s' * (T > 1)} after {start} cached ones, "
                         f"{'with a prefix of ' + str(PREFIX_LEN) if p is not None else 'no prefix'})")
                if not isinstance(got, torch.Tensor) or got.shape != want.shape:
                    fail(name, f"{where}: returned {getattr(got, 'shape', type(got).__name__)}; expected (B, T, d) "
                               f"= {tuple(want.shape)}.")
                scale = want.abs().max()
                if (got - want).abs().max() > TOL * scale:
                    for m, out in shadow_out.items():
                        if out.shape == got.shape and (got - out).abs().max() <= TOL * scale:
                            fail(name, f"{where}: {MISTAKES[m]}")
                    fail(name, f"{where}: the output differs from the decoder's: {max_error(got, want)} (allowed "
                               f"{TOL * scale:.2g}).")
                for key, ref in (("k", kv.k), ("v", kv.v)):
                    have = cache.get(key)
                    if isinstance(have, torch.Tensor) and have.shape[:2] == ref.shape[:2] \
                            and have.shape[2] == ref.shape[2] - T:
                        fail(name, f"{where}: {MISTAKES['cache not updated']}")
                    if not isinstance(have, torch.Tensor) or have.shape != ref.shape:
                        fail(name, f"{where}: cache['{key}'] is {getattr(have, 'shape', have)}; after this call it "
                                   f"must hold (B, H_kv, l + S + T, d_h) = {tuple(ref.shape)}: the prefix first "
                                   "(once), then every token so far.")
                    if (have - ref).abs().max() > TOL * ref.abs().max():
                        fail(name, f"{where}: cache['{key}'] differs from the decoder's cache: {max_error(have, ref)}"
                                   + (" (the keys are stored rotated, at their own positions)" if key == "k" else ""))
                start += T
    passed(name, f"outputs and cache equal the decoder's over calls of {list(CALLS)} tokens, with a prefix of "
                 f"{PREFIX_LEN} and without")


def check_cached_decoding(fn, new_tokens: int = 8) -> None:
    """SmolLM2 with a prefix of 5 positions (real words' keys/values) decodes a prompt greedily with ``fn`` in
    place of every layer's attention: the same tokens as ``minipeft.generate``."""
    from ...api import add_adapter, delete_adapter
    from ...generation import generate
    from ...methods.prefix import PrefixConfig

    name = "cached_decoding"
    model, tok = decoder(), tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three rivers of Europe."}], tokenize=False,
                                     add_generation_prompt=True)
    add_adapter(model, PrefixConfig(length=5, reparameterize=False, init="tokens"), "check_prefix")
    try:
        want = generate(model, [prompt], tok, max_new_tokens=new_tokens)
        theta = model.cfg.rope_theta

        def learner(self, x, rope, mask=None, prefix=None, kv=None):  # the decoder calls this for every layer
            return fn(self, x, kv.__dict__.setdefault("learner_cache", {}), prefix, theta)

        for layer in model.layers:
            layer.attn.sublayer = types.MethodType(learner, layer.attn)
        try:
            got = call(name, generate, model, [prompt], tok, max_new_tokens=new_tokens)
        finally:
            for layer in model.layers:
                del layer.attn.sublayer  # the class's method again
    finally:
        delete_adapter(model, "check_prefix")
    if got.tokens != want.tokens:
        fail(name, f"your attention writes {got.texts[0]!r}; the decoder writes {want.texts[0]!r}. "
                   "check_cached_attention finds the mistake call by call.")
    passed(name, f"{new_tokens} greedy tokens with a 5-position prefix and your attention in all "
                 f"{len(model.layers)} layers: the decoder's own tokens")


def check_kv_cache_numbers(fn) -> None:
    """``fn(L, H_kv, d_h, l, S) -> int`` against the numel of a real KVCache (one prompt)."""
    from ...api import add_adapter, delete_adapter
    from ...methods.prefix import PrefixConfig

    name = "kv_cache_numbers"
    model = decoder()
    c = model.cfg
    for l, S in ((0, 7), (6, 7)):
        if l:
            add_adapter(model, PrefixConfig(length=l, reparameterize=False), "check_prefix")
        try:
            cache = model.new_cache()
            with torch.no_grad():
                model(torch.arange(100, 100 + S)[None], cache=cache)
        finally:
            if l:
                delete_adapter(model, "check_prefix")
        want = sum(layer.k.numel() + layer.v.numel() for layer in cache.layers)
        got = call(name, fn, c.num_layers, c.num_kv_heads, c.head_dim, l, S,
                   hint="L, H_kv, d_h, l, S are ints: layers, key/value heads, head width, prefix length, tokens.")
        need_int(name, got, f"for L={c.num_layers}, H_kv={c.num_kv_heads}, d_h={c.head_dim}, l={l}, S={S}")
        if got != want:
            hint = {want // 2: "that is the keys only: the values are cached too.",
                    want * c.num_heads // c.num_kv_heads: "that counts H = 9 query heads: only the H_kv = 3 key/value "
                                                          "heads are cached (grouped-query attention)."}
            if l:
                hint[2 * c.num_layers * c.num_kv_heads * c.head_dim * S] = "the prefix's l positions sit in the cache too."
            fail(name, f"gave {got:,} for l={l}, S={S}; the decoder's cache holds {want:,}. "
                       + hint.get(got, "Per layer: keys and values, each H_kv × d_h numbers per position."))
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim
    passed(name, f"2·L·H_kv·d_h·(l + S) matches the decoder's cache: {per_token:,} numbers per position "
                 f"({per_token * 4 / 1024:.0f} KiB in fp32)")

