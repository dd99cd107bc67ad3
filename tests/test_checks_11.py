"""Lesson 11 checks accept the right answers and reject the plausible wrong ones with a message naming them."""
import pytest
import torch

from minipeft.course.checks.lesson11 import check_nf4_dequantize, check_nf4_quantize
from minipeft.quant import NF4
from checking import assert_passes, assert_rejects, assert_unfilled_stops


def quantize(w, levels=NF4, block=64, high_first=True, by_index=False):
    """NF4 by hand (the solution), with switches that make each named mistake."""
    c = w.abs().view(-1, block).amax(1)  # (n/block,)
    u = (w.view(-1, block) / c[:, None]).view(-1)  # (n,) in [-1, 1]
    if by_index:
        idx = torch.round((u + 1) / 2 * 15).long()
    else:
        idx = (u[:, None] - levels).abs().argmin(1)  # nearest by value; a tie: argmin takes the lower
    idx = idx.to(torch.uint8)
    first, second = (idx[0::2], idx[1::2]) if high_first else (idx[1::2], idx[0::2])
    absmax = c if block == 64 else c.repeat_interleave(block // 64)
    return (first << 4) | second, absmax


def searchsorted(w):
    """Codes from the first level at or above u (a search on the levels, not on their midpoints)."""
    c = w.abs().view(-1, 64).amax(1)
    idx = torch.searchsorted(NF4, (w.view(-1, 64) / c[:, None]).view(-1)).clamp(max=15).to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], c


def dequantize(codes, absmax, levels=NF4, swap=False, scale=True):
    hi, lo = codes >> 4, codes & 15
    idx = torch.stack([lo, hi] if swap else [hi, lo], 1).view(-1).long()
    values = levels[idx]
    return values * absmax.repeat_interleave(64) if scale else values


def test_quantize_accepts(capsys):
    out = assert_passes(capsys, (check_nf4_quantize, quantize))
    assert "equal to minipeft.quant.quantize_nf4" in out


def test_quantize_names_bitsandbytes_when_installed(capsys):
    pytest.importorskip("bitsandbytes.functional")
    assert "bitsandbytes' quantize_4bit(nf4) codes, byte for byte" in assert_passes(capsys, (check_nf4_quantize,
                                                                                            quantize))


@pytest.mark.parametrize("wrong,message", [
    (lambda w: quantize(w, levels=torch.linspace(-1, 1, 16)), "uniform grid"),
    (searchsorted, "rounds up by index, not to the nearest level"),
    (lambda w: quantize(w, block=w.numel()), "one absmax for the whole tensor"),
    (lambda w: quantize(w, high_first=False), "nibbles are swapped"),
    (lambda w: quantize(w, by_index=True), r"nearest level \*index\*"),
    (lambda w: (quantize(w)[0], quantize(w)[1][:1]), "one per block of 64"),
    (lambda w: (quantize(w)[0], w.view(-1, 64).amax(1)), "the absolute value"),
    (lambda w: (quantize(w)[0].long(), quantize(w)[1]), "uint8"),
    (lambda w: quantize(w)[0], "pair of tensors"),
    (lambda w: 1 / 0, "raised ZeroDivisionError")])
def test_quantize_rejects(wrong, message):
    assert_rejects(check_nf4_quantize, wrong, message=message)


def test_dequantize_accepts(capsys):
    assert "✔ nf4_dequantize" in assert_passes(capsys, (check_nf4_dequantize, dequantize))


@pytest.mark.parametrize("wrong,message", [
    (lambda codes, absmax: dequantize(codes, absmax, swap=True), "swapped"),
    (lambda codes, absmax: dequantize(codes, absmax, scale=False), "multiply each by its block's absmax"),
    (lambda codes, absmax: dequantize(codes, absmax, levels=torch.linspace(-1, 1, 16)), "evenly spaced levels"),
    (lambda codes, absmax: dequantize(codes, absmax)[::2], "one value per 4-bit code"),
    (lambda codes, absmax: dequantize(codes, absmax) * 1.01, "w = q_code · c")])
def test_dequantize_rejects(wrong, message):
    assert_rejects(check_nf4_dequantize, wrong, message=message)


def test_unfilled_exercise_raises_not_implemented():
    assert_unfilled_stops(check_nf4_quantize, check_nf4_dequantize)
