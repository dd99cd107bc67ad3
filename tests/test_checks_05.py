"""Lesson 05's check accepts prefix attention done right and rejects the plausible mistakes with a useful message."""
import pytest
import torch
import torch.nn.functional as F

from minipeft.course.checks.lesson05 import check_prefix_attention, check_prefix_gate, reference_gate
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def split(t, H):  # (B, T, d) -> (B, H, T, d_h)
    return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)


def make(cat_dim=1, mask="front", prefix_in_queries=False, merge_heads=True):
    """A prefix attention with one deliberate mistake (the defaults are the right answer)."""
    def fn(q, k, v, prefix_k, prefix_v, key_mask, num_heads):
        B, l = q.shape[0], prefix_k.shape[0]
        pk, pv = prefix_k.expand(B, -1, -1), prefix_v.expand(B, -1, -1)  # (B, l, d)
        k, v = torch.cat([pk, k], dim=cat_dim), torch.cat([pv, v], dim=cat_dim)  # (B, l + T, d)
        if prefix_in_queries:
            q = torch.cat([pk, q], dim=1)
        m = None
        if key_mask is not None and mask is not None:
            ones = key_mask.new_ones(B, l)
            m = {"front": lambda: torch.cat([ones, key_mask], 1), "end": lambda: torch.cat([key_mask, ones], 1),
                 "zeros": lambda: torch.cat([~ones, key_mask], 1), "unchanged": lambda: key_mask,
                 "float": lambda: torch.cat([torch.ones(B, l), key_mask], 1)}[mask]()  # cat promotes to float
            m = m[:, None, None, :]
        a = F.scaled_dot_product_attention(split(q, num_heads), split(k, num_heads), split(v, num_heads), attn_mask=m)
        return a.transpose(1, 2).flatten(2) if merge_heads else a  # (B, T, d)
    return fn


def manual(softmax_dim=-1, scale="d_h", inverted=False):
    """Attention with a hand-written softmax, with one deliberate mistake (the defaults are the right answer)."""
    def fn(q, k, v, prefix_k, prefix_v, key_mask, num_heads):
        B, l = q.shape[0], prefix_k.shape[0]
        K = split(torch.cat([prefix_k.expand(B, -1, -1), k], 1), num_heads)
        V = split(torch.cat([prefix_v.expand(B, -1, -1), v], 1), num_heads)
        s = split(q, num_heads) @ K.transpose(-1, -2) / {"d_h": K.shape[-1] ** 0.5, "d": q.shape[-1] ** 0.5,
                                                          None: 1.0}[scale]  # (B, H, T, l + T)
        if key_mask is not None:
            m = torch.cat([key_mask.new_ones(B, l), key_mask], 1)[:, None, None, :]
            s = s.masked_fill(m if inverted else ~m, float("-inf"))
        return (s.softmax(softmax_dim) @ V).transpose(1, 2).flatten(2)
    return fn


def test_right_answer_passes(capsys):
    assert "✔ prefix_attention" in assert_passes(capsys, (check_prefix_attention, make()))


def test_manual_softmax_answer_passes(capsys):
    assert_passes(capsys, (check_prefix_attention, manual()))


def zero_padded_queries(answer):
    """``answer`` with the rows of padded queries set to 0: the same at every real token, so right too."""
    def fn(q, k, v, prefix_k, prefix_v, key_mask, num_heads):
        out = answer(q, k, v, prefix_k, prefix_v, key_mask, num_heads)
        return out if key_mask is None else out * key_mask[..., None]
    return fn


def test_zeroing_padded_queries_passes(capsys):
    """Only real tokens are compared: what a padded query computes is never read (it used to be rejected with a
    misleading "heads / scale / axis" message)."""
    assert_passes(capsys, (check_prefix_attention, zero_padded_queries(make())),
                  (check_prefix_gate,
                   lambda q, k, p, m, H: right_gate(q, k, p, m, H) * (1 if m is None else m[:, None])))


@pytest.mark.parametrize("wrong, message", [
    (zero_padded_queries(make(mask=None)), "the key mask was dropped"),  # still wrong where it matters
    (zero_padded_queries(manual(scale="d")), "divided by √d"),
    (lambda q, k, v, pk, pv, m, H: zero_padded_queries(make())(q, k, v, pk, pv, m, H) * float("nan"), "nan or inf"),
])
def test_zeroed_padding_does_not_hide_a_mistake(wrong, message):
    assert_rejects(check_prefix_attention, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (make(mask=None), "the key mask was dropped. Extend it"),
    (make(mask="end"), "prefix columns are at the end"),
    (make(mask="zeros"), "never attend to it.*True \\(attend\\)"),
    (make(mask="unchanged"), "does the mask have l \\+ T columns"),
    (make(cat_dim=2), "sequence axis \\(dim 1 of \\(B, T, d\\)\\)"),
    (make(cat_dim=0), "sequence axis"),
    (make(prefix_in_queries=True), "only keys and values"),
    (lambda q, k, v, pk, pv, m, H: make()(q, k, v, pk[:0], pv[:0], m, H), "ignores the prefix"),
    (lambda q, k, v, pk, pv, m, H: 2 * make()(q, k, v, pk, pv, m, H), "max error"),
    (make(mask="float"), "the mask is a float tensor"),
    (make(merge_heads=False), "heads were not merged back"),
    (lambda q, k, v, pk, pv, m, H: make()(q, k, v, pk, pv, m, 1), "heads were not split"),
    (manual(scale=None), "scores are not scaled"),
    (manual(scale="d"), "divided by √d: the scale is 1/√d_h"),
])
def test_rejects_plausible_mistakes(wrong, message):
    assert_rejects(check_prefix_attention, wrong, message=message)


@pytest.mark.parametrize("wrong, message", [
    (manual(softmax_dim=-2), "the softmax runs over the wrong axis.*last axis of the \\(B, H, T, l \\+ T\\) scores"),
    (manual(inverted=True), "without the mask your output is finite, so the mask causes it.*inverted"),
    (lambda q, k, v, pk, pv, m, H: make()(q, k, v, pk, pv, m, H) * float("nan"), "softmax over scores that are all"),
])
def test_nan_output_names_the_likely_mistake(wrong, message):
    assert "max error nan" not in assert_rejects(check_prefix_attention, wrong, message=message)


def test_wrong_axis_of_equal_size_is_rejected():
    """Concatenating on the feature axis after the head split runs when l·d_h fits, but is wrong."""
    def feature_axis(q, k, v, prefix_k, prefix_v, key_mask, num_heads):
        B, l = q.shape[0], prefix_k.shape[0]
        pk, pv = prefix_k.expand(B, -1, -1), prefix_v.expand(B, -1, -1)
        K = split(k + pk.sum(1, keepdim=True), num_heads)  # mixes the prefix into every key instead
        V = split(v + pv.sum(1, keepdim=True), num_heads)
        m = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(split(q, num_heads), K, V, attn_mask=m).transpose(1, 2).flatten(2)
    assert_rejects(check_prefix_attention, feature_axis, message="wrong output")


def test_unfilled_and_not_a_function():
    assert_unfilled_stops(check_prefix_attention, check_prefix_gate)
    assert_rejects(check_prefix_attention, torch.zeros(2), message="expected a function")
    assert_rejects(check_prefix_attention, lambda *a: 0, message="should return a tensor")


# ---- prefix_gate ---------------------------------------------------------------------------------------------

def right_gate(q, k, prefix_k, key_mask, num_heads):
    # He et al. 2022, Eq. 7 via logsumexp: λ = sigmoid(lse(prefix scores) − lse(real scores))
    B, l = q.shape[0], prefix_k.shape[0]
    qh, kh, ph = split(q, num_heads), split(k, num_heads), split(prefix_k.expand(B, -1, -1), num_heads)
    s_pre = qh @ ph.mT / qh.shape[-1] ** 0.5
    s_real = qh @ kh.mT / qh.shape[-1] ** 0.5
    if key_mask is not None:
        s_real = s_real.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.sigmoid(torch.logsumexp(s_pre, -1) - torch.logsumexp(s_real, -1))


def test_prefix_gate_accepts_the_answer(capsys):
    assert "✔ prefix_gate" in assert_passes(capsys, (check_prefix_gate, right_gate))


@pytest.mark.parametrize("wrong, message", [
    (lambda q, k, p, m, H: 1 - right_gate(q, k, p, m, H), "1 − λ"),
    (lambda q, k, p, m, H: reference_gate(q, k, p, m, H, mask_padding=False), "padded keys"),
    (lambda q, k, p, m, H: reference_gate(q, k, p, m, H, scale=1.0), "not scaled"),
    (lambda q, k, p, m, H: right_gate(q, k, p, m, H).transpose(1, 2), "returned shape"),
    (lambda q, k, p, m, H: 2 * right_gate(q, k, p, m, H), "outside \\[0, 1\\]"),
    (lambda q, k, p, m, H: right_gate(q, k, p, m, H).tolist(), "should return a tensor"),
])
def test_prefix_gate_rejects(wrong, message):
    assert_rejects(check_prefix_gate, wrong, message=message)
