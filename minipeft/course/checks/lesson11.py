"""Lesson 11 checks: NF4 block-wise quantization and dequantization by hand (Dettmers et al. 2023, QLoRA §3).

References: ``minipeft.quant.quantize_nf4(w, double_quant=False)`` and ``dequantize_nf4`` (bit for bit equal to
bitsandbytes 0.50's ``quantize_4bit(w, quant_type="nf4", compress_statistics=False)``, tests/test_quant.py); the
codes are also compared with bitsandbytes itself when it is installed.
"""
from __future__ import annotations

import torch

from ...quant import BLOCK, NF4, dequantize_nf4, quantize_nf4
from . import call, fail, max_error, passed

SIZES = (64, 64 * 5, 64 * 12)  # whole blocks of 64


def _weights(n: int, seed: int) -> torch.Tensor:
    """Weight-like values: N(0, 0.02²) with a few outliers (where one absmax per tensor hurts most)."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(n, generator=g)
    w[torch.randint(0, n, (max(1, n // 200),), generator=g)] *= 8
    return w


def _nearest(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the level nearest to each u by value (ties to the lower), as the package does."""
    return torch.bucketize(u, (levels[:-1] + levels[1:]) / 2)


def _pack(nibbles: torch.Tensor, high_first: bool = True) -> torch.Tensor:
    nibbles = nibbles.to(torch.uint8)
    a, b = (nibbles[0::2], nibbles[1::2]) if high_first else (nibbles[1::2], nibbles[0::2])
    return (a << 4) | b


def _mistakes(w: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    """Codes the plausible mistakes give for ``w``, each with what to say."""
    c = w.abs().view(-1, BLOCK).amax(1)
    u = (w.view(-1, BLOCK) / c[:, None]).view(-1)
    uniform = torch.linspace(-1, 1, 16)
    return [
        (_pack(_nearest(u, uniform)), "these are the codes of 16 evenly spaced levels: a uniform grid "
         "(torch.linspace(-1, 1, 16)) instead of NF4's levels, or rounding to the nearest level *index* "
         "(round((u + 1)/2 · 15)), which treats the levels as evenly spaced. NF4's levels are quantiles of "
         "N(0, 1), dense near 0 where most weights are: take the NF4 level nearest in *value*, argmin_j |q_j − u|."),
        (_pack(torch.searchsorted(NF4, u).clamp(max=15)), "these codes take the first level at or above u "
         "(searchsorted on the levels): that rounds up by index, not to the nearest level. Take the level "
         "nearest in *value*, argmin_j |q_j − u| (or search the midpoints between neighbouring levels)."),
        (_pack(_nearest(w / w.abs().max(), NF4)), "these are the codes with one absmax for the whole tensor: NF4 "
         "scales each block of 64 values by its own absmax c = max|w| over the block (an outlier then only "
         "coarsens its own block)."),
        (_pack(_nearest(u, NF4), high_first=False), "the nibbles are swapped: the first value of each pair goes in "
         "the HIGH 4 bits of the byte (code = first << 4 | second), as bitsandbytes packs them."),
    ]


def _bnb_codes(w: torch.Tensor) -> torch.Tensor | None:
    """bitsandbytes' packed NF4 codes for ``w`` (None where it is not installed); its notes about optional GPU
    kernels it cannot fetch offline are kept out of the learner's output."""
    import contextlib
    import io
    import logging

    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes.functional as bnb

            packed, _ = bnb.quantize_4bit(w.view(-1, 1).clone(), quant_type="nf4", compress_statistics=False)
    except ImportError:
        return None
    finally:
        logging.disable(logging.NOTSET)
    return packed.view(-1)


def check_nf4_quantize(fn) -> None:
    """``fn(w) -> (codes, absmax)``: w (n,) fp32, n a multiple of 64 -> codes (n/2,) uint8, two 4-bit level indices
    per byte (first value high), absmax (n/64,) fp32."""
    name = "nf4_quantize"
    bnb_equal = None
    for i, n in enumerate(SIZES):
        w = _weights(n, seed=i)
        got = call(name, fn, w.clone(), hint="w is a flat (n,) float tensor; cut it into blocks of 64 with "
                   "w.view(-1, 64).")
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            fail(name, f"should return a pair of tensors (codes, absmax), got {type(got).__name__}")
        codes, absmax = got
        want = quantize_nf4(w, double_quant=False)
        if tuple(absmax.shape) != (n // BLOCK,):
            fail(name, f"absmax has shape {tuple(absmax.shape)} for n = {n}; expected ({n // BLOCK},): one per block "
                 "of 64 values" + (" (a single absmax for the whole tensor is the mistake NF4's blocks avoid)"
                                   if absmax.numel() == 1 else "."))
        if n > BLOCK and torch.allclose(absmax.float(), w.abs().max().expand(n // BLOCK)):
            fail(name, f"every absmax is max|w| of the whole tensor ({float(w.abs().max()):.4f}) for n = {n}: that is "
                 "one absmax for the whole tensor. NF4 scales each block of 64 values by its own absmax c = max|w| "
                 "over the block (an outlier then only coarsens its own block).")
        if not torch.allclose(absmax.float(), want["absmax"]):
            fail(name, f"absmax is wrong for n = {n} ({max_error(absmax.float(), want['absmax'])}): it is max|w| over "
                 "each block of 64 consecutive values (the absolute value: a block's largest weight may be negative).")
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (n // 2,):
            fail(name, f"codes should be a uint8 tensor of shape ({n // 2},) (two 4-bit codes per byte), got "
                 f"{codes.dtype} of shape {tuple(codes.shape)}")
        if torch.equal(codes, want["codes"]):
            bnb = _bnb_codes(w)
            if bnb is not None:
                bnb_equal = torch.equal(codes, bnb) if bnb_equal is None else bnb_equal and torch.equal(codes, bnb)
            continue
        wrong = int((codes != want["codes"]).sum())
        hint = next((say for codes_mistake, say in _mistakes(w) if torch.equal(codes, codes_mistake)),
                    "compare u = w / c (c the block's absmax) with the 16 NF4 levels: the code is the index of the "
                    "nearest level; two codes per byte, the first in the high 4 bits.")
        fail(name, f"{wrong} of {n // 2} bytes of codes differ for n = {n}: {hint}")
    also = {None: " (bitsandbytes is not installed: not compared with it)",
            True: " and to bitsandbytes' quantize_4bit(nf4) codes, byte for byte"}.get(bnb_equal)
    if bnb_equal is False:
        fail(name, "equal to minipeft.quant but not to bitsandbytes' codes: report this, it should not happen")
    passed(name, f"codes and absmax equal to minipeft.quant.quantize_nf4 on {len(SIZES)} tensors{also}")


def check_nf4_dequantize(fn) -> None:
    """``fn(codes, absmax) -> w``: the (n,) fp32 values q_code · c the codes stand for."""
    name = "nf4_dequantize"
    for i, n in enumerate(SIZES):
        w = _weights(n, seed=10 + i)
        state = quantize_nf4(w, double_quant=False)
        got = call(name, fn, state["codes"].clone(), state["absmax"].clone(),
                   hint="codes is (n/2,) uint8, absmax (n/64,) fp32.")
        if not isinstance(got, torch.Tensor):
            fail(name, f"should return a tensor, got {type(got).__name__}")
        if tuple(got.shape) != (n,):
            fail(name, f"returned shape {tuple(got.shape)}; expected ({n},): one value per 4-bit code, two per byte")
        want = dequantize_nf4(state, (n,))
        if torch.allclose(got.float(), want, rtol=0, atol=1e-7):
            continue
        codes, c = state["codes"], state["absmax"].repeat_interleave(BLOCK)
        swapped = NF4[torch.stack([codes & 15, codes >> 4], 1).view(-1).long()] * c
        unscaled = NF4[torch.stack([codes >> 4, codes & 15], 1).view(-1).long()]
        uniform = torch.linspace(-1, 1, 16)[torch.stack([codes >> 4, codes & 15], 1).view(-1).long()] * c
        hints = [(swapped, "the two values of each byte come out swapped: the high 4 bits (code >> 4) hold the "
                  "first value, the low 4 bits (code & 15) the second."),
                 (unscaled, "these are the levels q_code alone: multiply each by its block's absmax c."),
                 (uniform, "these use evenly spaced levels: look the codes up in the 16 NF4 levels (quantiles).")]
        hint = next((h for v, h in hints if torch.allclose(got.float(), v, atol=1e-7)),
                    "w = q_code · c: split each byte into its two codes (high first), look each up in the NF4 levels, "
                    "scale by the absmax of its block of 64.")
        fail(name, f"wrong values for n = {n} ({max_error(got.float(), want)}): {hint}")
    passed(name, f"values equal to minipeft.quant.dequantize_nf4 on {len(SIZES)} tensors")
