"""Lesson 05 checks: attention with a prefix (Li & Liang 2021, §4.2) — concatenation and mask extension.

The learner writes ``prefix_attention(q, k, v, prefix_k, prefix_v, key_mask, num_heads) -> (B, T, d)``:
q, k, v (B, T, d) are the projected queries/keys/values, prefix_k, prefix_v (l, d) the prefix of this layer,
key_mask (B, T) bool (True = a real token) or None. Reference: minipeft's ``Attention.forward`` (the package's
encoder) with the output projection replaced by the identity, read before residual + LayerNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.encoder import Attention, EncoderConfig
from . import call, fail, max_error, passed

TINY = EncoderConfig(vocab_size=100, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                     max_position=24, type_vocab_size=1, attention_dropout=0.0, dropout=0.0, name="tiny")


class _Capture(nn.Module):
    """A site delta that records h (the attention output before residual + LN) and adds nothing."""
    active = True

    def forward(self, x, h, norm):
        self.h = h
        return torch.zeros_like(h)


def reference(x, attn: Attention, prefix, key_mask):
    """The package's attention with prefix on x, before the output projection: (B, T, d)."""
    o, attn.o = attn.o, nn.Identity()
    attn.deltas["capture"] = _Capture()
    try:
        attn(x, key_mask, prefix)
        return attn.deltas["capture"].h
    finally:
        attn.o = o
        del attn.deltas["capture"]


def _attend(q, k, v, mask, H, scale=None, dim=-1):
    """Attention by hand on (B, ·, d) tensors: a bool mask (B, keys) masks (True = attend), a float one is added to
    the scores (as scaled_dot_product_attention does); the softmax runs over ``dim`` (-1: the keys)."""
    split = lambda t: t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)  # noqa: E731  (B, H, ·, d_h)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.mT * (q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, keys)
    if mask is not None:
        m = mask[:, None, None, :]
        scores = scores + m if m.is_floating_point() else scores.masked_fill(~m, float("-inf"))
    return (scores.softmax(dim) @ v).transpose(1, 2).flatten(2)


def wrong_answers(q, k, v, pk, pv, key_mask, H) -> dict[str, torch.Tensor]:
    """Outputs of plausible mistakes, to name the one a learner made (a prefix masked out = no prefix)."""
    B, l = q.shape[0], pk.shape[0]
    K, V = torch.cat([pk.expand(B, -1, -1), k], 1), torch.cat([pv.expand(B, -1, -1), v], 1)
    mask = None if key_mask is None else torch.cat([key_mask.new_ones(B, l), key_mask], 1)
    out = {"no_mask": _attend(q, K, V, None, H), "no_prefix": _attend(q, k, v, key_mask, H),
           "softmax_axis": _attend(q, K, V, mask, H, dim=-2), "no_scale": _attend(q, K, V, mask, H, scale=1.0),
           "scale_d": _attend(q, K, V, mask, H, scale=q.shape[-1] ** -0.5), "one_head": _attend(q, K, V, mask, 1)}
    if key_mask is not None:
        out["mask_at_end"] = _attend(q, K, V, torch.cat([key_mask, key_mask.new_ones(B, l)], 1), H)
        out["float_mask"] = _attend(q, K, V, mask.float(), H)
    return out


HINTS = {
    "no_mask": "the padding positions are attended to: the key mask was dropped. Extend it instead: l ones "
               "(True) for the prefix in front of key_mask, so it has l + T columns.",
    "mask_at_end": "the mask's prefix columns are at the end, but the prefix keys are in front: the padding mask "
                   "no longer lines up with the real keys. Put the l ones in front: cat([ones(B, l), key_mask]).",
    "no_prefix": "the output ignores the prefix: your queries never attend to it. Concatenate prefix_k / prefix_v "
                 "in front of k / v, and mark those l key columns True (attend) in the mask, not False.",
    "softmax_axis": "the softmax runs over the wrong axis: each query's weights over its l + T keys must sum to 1, "
                    "so normalise over the keys, the last axis of the (B, H, T, l + T) scores.",
    "no_scale": "the scores are not scaled: divide them by √d_h, d_h = d / num_heads the width of one head.",
    "scale_d": "the scores are divided by √d: the scale is 1/√d_h, d_h = d / num_heads the width of one head.",
    "one_head": "the heads were not split: attention runs in each head separately, on (B, H, ·, d_h) with "
                "d_h = d / num_heads, and the heads are merged back afterwards.",
    "float_mask": "the mask is a float tensor (ones made as floats turn the whole concatenation into floats), and "
                  "scaled_dot_product_attention adds a float mask to the scores instead of masking: keep the mask "
                  "bool, True = attend.",
}


def _nonfinite_hint(fn, q, k, v, pk, pv, H) -> str:
    """nan/inf in the output: most likely a softmax over a row of -inf scores. Is it the softmax's axis (seen
    without the mask too) or the mask?"""
    B = q.shape[0]
    K, V = torch.cat([pk.expand(B, -1, -1), k], 1), torch.cat([pv.expand(B, -1, -1), v], 1)
    try:
        free = fn(q, k, v, pk, pv, None, H)  # the same inputs without a mask
    except Exception:  # noqa: BLE001
        free = None
    if isinstance(free, torch.Tensor) and free.shape == q.shape and torch.isfinite(free).all():
        if torch.allclose(free, _attend(q, K, V, None, H, dim=-2), atol=1e-5):
            return HINTS["softmax_axis"] + (" (Over the queries, a padded key's column is -inf for every query, "
                                            "and its softmax is nan.)")
        return ("without the mask your output is finite, so the mask causes it: a query whose every key is masked "
                "(-inf) gets a softmax of nan. Is the mask inverted (True must mean attend), or are the prefix's "
                "columns False?")
    return ("a softmax over scores that are all -inf gives nan: check that the softmax runs over the keys (the last "
            "axis of the (B, H, T, l + T) scores) and that the mask is True for every key to attend, prefix included.")


def _cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    attn = Attention(TINY).eval()
    d = TINY.hidden_size
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    cases = []
    for B, T, l, m in ((3, 5, 5, mask), (3, 5, 3, mask), (2, 4, 6, None), (1, 3, 1, None)):
        x = torch.randn(B, T, d, generator=g)
        pk, pv = torch.randn(l, d, generator=g), torch.randn(l, d, generator=g)
        cases.append((x, attn, pk, pv, m))
    return cases


def check_prefix_attention(fn) -> None:
    """``fn(q, k, v, prefix_k, prefix_v, key_mask, num_heads) -> (B, T, d)``: multi-head attention whose keys
    and values have the prefix in front and whose key mask is extended so every query sees the prefix."""
    name = "prefix_attention"
    if not callable(fn):
        fail(name, f"expected a function, got {type(fn).__name__}")
    for x, attn, pk, pv, key_mask in _cases():
        B, T, d = x.shape
        l, H = pk.shape[0], attn.num_heads
        with torch.no_grad():
            q, k, v = attn.q(x), attn.k(x), attn.v(x)  # (B, T, d)
            want = reference(x, attn, (pk, pv), key_mask)
            where = f"B={B}, T={T}, l={l}, d={d}, {H} heads, " + ("with padding" if key_mask is not None else "no mask")
            try:
                got = fn(q, k, v, pk, pv, key_mask, H)
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 -- the learner's code may raise anything
                hint = ("The keys now have l + T positions: does the mask have l + T columns too (ones in front), "
                        "shaped (B, 1, 1, l + T) to broadcast over heads and queries? And is the prefix concatenated "
                        "on the sequence axis (dim 1 of (B, T, d))?")
                fail(name, f"calling it ({where}) raised {type(e).__name__}: {e}. {hint}")
            if not isinstance(got, torch.Tensor):
                fail(name, f"should return a tensor (B, T, d), got {type(got).__name__}")
            if tuple(got.shape) != (B, T, d):
                hint = {(B, T + l, d): "the prefix went into the queries (or the output) too: only keys and values "
                                       "get it; the output keeps the T real positions.",
                        (B, T, 2 * d): "the prefix was concatenated on the feature axis: prepend it along the "
                                       "sequence axis (dim 1 of (B, T, d)), making l + T keys of width d.",
                        (2 * B, T, d): "the prefix was concatenated on the batch axis: expand it to (B, l, d) and "
                                       "prepend it along the sequence axis (dim 1).",
                        (B + 1, T, d): "the prefix was concatenated on the batch axis: prepend it along the "
                                       "sequence axis (dim 1) after expanding it to (B, l, d).",
                        (B, H, T, d // H): "the heads were not merged back: bring the head axis next to d_h again "
                                           "and merge the two into d, giving (B, T, d).",
                        (B, T, H, d // H): "the heads were not merged back: merge the last two axes into d."}
                fail(name, f"returned shape {tuple(got.shape)} ({where}), expected {(B, T, d)}: "
                     + hint.get(tuple(got.shape), "concatenate the prefix along the sequence axis, in front."))
            if not torch.isfinite(got).all():  # everywhere: a nan at a padded position reaches the next layer
                fail(name, f"the output has nan or inf values ({where}): " + _nonfinite_hint(fn, q, k, v, pk, pv, H))
            # compared at real tokens only: what a padded query computes is never read (zeroing it is right too)
            real = torch.ones(B, T, dtype=torch.bool) if key_mask is None else key_mask
            if torch.allclose(got[real], want[real], atol=1e-5):
                continue
            for mistake, out in wrong_answers(q, k, v, pk, pv, key_mask, H).items():
                if (torch.allclose(got[real], out[real], atol=1e-5)
                        and not torch.allclose(out[real], want[real], atol=1e-5)):
                    fail(name, f"wrong output at real tokens ({where}): {HINTS[mistake]}")
            fail(name, f"wrong output at real tokens ({where}): {max_error(got[real], want[real])}. Check the split "
                       "into heads (B, H, T, d_h), "
                       "the scale 1/√d_h, and that prefix_k / prefix_v are concatenated in front of k / v along the "
                       "sequence axis (a wrong axis of the same size runs but mixes features or heads).")
    passed(name, "matches minipeft's Attention with a prefix at every real token, on 4 cases (padding, l = T, "
           "l > T, no mask)")


# ---- He et al.'s gate: the share of attention on the prefix ----------------------------------------------------

def reference_gate(q, k, prefix_k, key_mask, num_heads, scale=None, mask_padding=True) -> torch.Tensor:
    """λ (B, H, T): the softmax mass each query puts on the l prefix keys, the real keys masked at padding
    (He et al. 2022, Eq. 7: λ = Σ_i e^{q·P_k,i} / (Σ_i e^{q·P_k,i} + Σ_j e^{q·K_j}), scores scaled by 1/√d_h)."""
    B, l = q.shape[0], prefix_k.shape[0]
    split = lambda t: t.view(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)  # noqa: E731  (B, H, ·, d_h)
    K = torch.cat([prefix_k.expand(B, -1, -1), k], 1)  # (B, l + T, d)
    qh, Kh = split(q), split(K)
    scores = qh @ Kh.mT * (qh.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, l + T)
    if key_mask is not None and mask_padding:
        m = torch.cat([key_mask.new_ones(B, l), key_mask], 1)[:, None, None, :]
        scores = scores.masked_fill(~m, float("-inf"))
    return scores.softmax(-1)[..., :l].sum(-1)  # (B, H, T)


def check_prefix_gate(fn) -> None:
    """``fn(q, k, prefix_k, key_mask, num_heads) -> (B, H, T)``: λ, the share of each query's attention (per
    head) that goes to the prefix keys; padded keys get none of it."""
    name = "prefix_gate"
    for x, attn, pk, _, key_mask in _cases():
        B, T, d = x.shape
        l, H = pk.shape[0], attn.num_heads
        where = f"B={B}, T={T}, l={l}, {H} heads, " + ("with padding" if key_mask is not None else "no mask")
        with torch.no_grad():
            q, k = attn.q(x), attn.k(x)
            want = reference_gate(q, k, pk, key_mask, H)
            got = call(name, fn, q, k, pk, key_mask, H, hint="q, k are (B, T, d), prefix_k (l, d), key_mask (B, T) "
                       "bool or None; split into heads as (B, H, T, d_h).")
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor (B, H, T), got {type(got).__name__}")
        if tuple(got.shape) != (B, H, T):
            fail(name, f"returned shape {tuple(got.shape)} ({where}), expected (B, H, T) = {(B, H, T)}: one λ per "
                 "query and head" + ("; sum over the prefix keys (the last axis)." if got.dim() == 4 else "."))
        real = torch.ones(B, T, dtype=torch.bool) if key_mask is None else key_mask
        at_real = lambda lam: lam.transpose(1, 2)[real]  # noqa: E731  (λ of the real queries; padded ones unread)
        if torch.allclose(at_real(got), at_real(want), atol=1e-5):
            continue
        mistakes = {"1 − λ: that is the share of the real tokens; λ is the share of the prefix":
                    1 - want,
                    "the padded keys took part of the mass: mask them (-inf) before the softmax, as the attention does":
                    reference_gate(q, k, pk, key_mask, H, mask_padding=False),
                    "the scores are not scaled: divide q·k by √d_h, as the attention does":
                    reference_gate(q, k, pk, key_mask, H, scale=1.0)}
        for hint, wrong in mistakes.items():
            if (torch.allclose(at_real(got), at_real(wrong), atol=1e-5)
                    and not torch.allclose(at_real(wrong), at_real(want), atol=1e-5)):
                fail(name, f"wrong λ ({where}): {hint}.")
        if ((got < -1e-6) | (got > 1 + 1e-6)).any():
            fail(name, f"λ outside [0, 1] ({where}): it is a share of a softmax; is the softmax over the keys (last "
                       "axis) and the sum over the prefix columns only?")
        fail(name, f"wrong λ ({where}): {max_error(at_real(got), at_real(want))}. λ is the softmax mass on the first l key columns "
                   "when the softmax runs over all l + T keys.")
    passed(name, "λ = the prefix's share of each query's attention, per head (padding, l = T, l > T, no mask)")
