"""NF4 and double quantization (Dettmers et al. 2023, QLoRA, §3), equal to bitsandbytes, and a frozen 4-bit Linear.

Block-wise absmax quantization (QLoRA Eq. 1-2): the flat weight is cut into blocks of B = 64 values; each block
keeps its absmax c = max|w| and, per value, the index of the level of a 16-level table nearest to w / c:

    code(w) = argmin_j |q_j − w/c|,        dequant(code, c) = q_code · c                     (Eq. 1-2, 4-bit)

The NF4 levels q_j (§3 "4-bit NormalFloat", Eq. 4 and the appendix) are quantiles of N(0, 1) scaled to [−1, 1],
built asymmetrically so that 0 is a level: 8 positive quantiles, 7 negative ones, and 0.

Double quantization (§3): the absmax constants c (fp32, 4 bytes per 64 values = 0.5 bit per parameter) are
quantized again: their mean is subtracted, then 8-bit block-wise quantization in blocks of 256 with bitsandbytes'
dynamic map (Dettmers 2016), leaving 8/64 + 32/(64·256) ≈ 0.127 bit per parameter.

QLoRA's forward (Eq. 5-6): Y = X · doubleDequant(c₁, c₂, W^NF4)ᵀ + X L₁ L₂, only L₁, L₂ (LoRA) trained.
``Linear4bit`` is the frozen first term (computed in fp32 here, not bf16); LoRA attaches to it unchanged.
Every rounding rule below is bitsandbytes 0.50's CPU rule (tests/test_quant.py checks codes bit for bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.contract import find_backbone

BLOCK, BLOCK2 = 64, 256  # values per absmax (QLoRA's 64); absmax values per 2nd-level constant (QLoRA's 256)
NF4_OFFSET = 0.9677083  # outermost probability of the quantiles: bitsandbytes' create_normal_map default


def nf4_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [−1, 1] (QLoRA §3, Eq. 4; the paper's appendix lists them).

    Asymmetric, so that 0 is exact and all 16 codes are used (§3): quantiles for 2^{k−1} negative and
    2^{k−1} + 1 positive levels, the two sets joined and one of their two zeros dropped. As released (the
    appendix's values, bitsandbytes' ``create_normal_map``), Φ⁻¹ is taken directly at evenly spaced probabilities
    rather than Eq. 4's averages of neighbouring quantiles: q⁺ = Φ⁻¹(p) at 9 p from ``offset`` down to ½, ½
    dropped (8 levels); q⁻ = −Φ⁻¹(p) at 8 p, ½ dropped (7 levels); plus 0; all divided by the largest, so
    q ∈ [−1, 1]. In bitsandbytes' precisions (fp32 probabilities, fp64 Φ⁻¹, fp32 levels): its table, bit for bit."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # (7,)
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # (16,)
    return levels / levels.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016, §3; ``create_dynamic_map()``), sorted, (256,).

    For exponent e = 0..6: 2^e fractions, the midpoints of linspace(0.1, 1, 2^e + 1), times 10^(e−6), with both
    signs (2·127 values), plus 0 and 1. Dense near 0, where the centred absmax constants c − mean(c) lie."""
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1)
        mids = 10.0 ** (e - 6) * (edges[:-1] + edges[1:]) / 2.0  # (2^e,) in fp32, as bitsandbytes
        values += [mids, -mids]
    return torch.cat(values).sort().values


NF4 = nf4_levels()
DYNAMIC = dynamic_map()
NF4_PAIRS = torch.stack([NF4.repeat_interleave(16), NF4.repeat(16)], dim=1)  # (256, 2): byte -> (q_high, q_low)


def block_absmax(flat: torch.Tensor, size: int) -> torch.Tensor:
    """c = max |w| over each block of ``size`` consecutive values of the flat (n,) tensor, (⌈n/size⌉,)."""
    return F.pad(flat.abs(), (0, -flat.numel() % size)).view(-1, size).amax(dim=1)


def per_value(per_block: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """A per-block quantity repeated for each of the block's values, (n,)."""
    return per_block.repeat_interleave(size)[:n]


GRID = 65536  # bitsandbytes' CPU kernel rounds u onto this many points of [−1, 1] before looking up the level


def grid_levels(code: torch.Tensor) -> torch.Tensor:
    """For each grid point g_k = −1 + 2k/(GRID − 1): the index of the ``code`` level nearest to it (a tie goes to
    the lower level), (GRID,) uint8: bitsandbytes 0.50's ``build_quantize_lut``."""
    grid = -1.0 + (2.0 * torch.arange(GRID, dtype=torch.float32)) / (GRID - 1)  # (GRID,) in fp32, as the C code
    return torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid).to(torch.uint8)  # midpoints below g_k


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, size: int = BLOCK2):
    """8-bit block-wise absmax quantization to the sorted 256-level ``code`` (QLoRA Eq. 1 with a non-uniform
    code, as bitsandbytes' ``quantize_blockwise`` on the CPU): (codes (n,) uint8, absmax (n_blocks,) fp32).

    Not the level nearest to u = w/c itself: bitsandbytes 0.50's CPU kernel first rounds u to the nearest of
    GRID points, k = ⌊(u + 1)/2 · (GRID − 1) + ½⌋, then takes the level nearest to that point (``grid_levels``).
    Near a midpoint between two levels (within 1/GRID) this can pick the farther one; we do the same."""
    flat = x.reshape(-1).float()  # (n,)
    absmax = block_absmax(flat, size)  # (n_blocks,)
    c = per_value(absmax, size, flat.numel())  # (n,)
    # u = w · (1/c) ∈ [−1, 1], then its grid point k (fp32 arithmetic, truncated as the C cast does)
    u = (flat * torch.where(c > 0, 1.0 / c, 0.0)).clamp(-1, 1)
    k = ((u + 1) * 0.5 * (GRID - 1) + 0.5).trunc().long()
    codes = grid_levels(code.to(flat.device))[k]
    return torch.where(c == 0, 0, codes).to(torch.uint8), absmax  # an all-zero block: code 0 (bitsandbytes)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, size: int) -> torch.Tensor:
    """w = code[codes] · c of its block (QLoRA Eq. 2), flat (n,) fp32."""
    values = code.to(codes.device)[codes.long()]  # (n,)
    n = values.numel()
    return (F.pad(values, (0, -n % size)).view(-1, size) * absmax[:, None]).view(-1)[:n]


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True, size: int = BLOCK) -> dict[str, torch.Tensor]:
    """NF4 block-wise quantization of ``weight`` (any shape), as ``bitsandbytes.functional.quantize_4bit(w,
    quant_type="nf4", compress_statistics=double_quant)``. Returns the stored tensors:

        codes           (⌈n/2⌉,) uint8: two 4-bit level indices per byte, the first value in the high nibble
        absmax          (n_blocks,) fp32: c₁ per block of ``size``                         (without double_quant)
        absmax_codes    (n_blocks,) uint8, absmax_scale (⌈n_blocks/256⌉,) fp32, absmax_offset () fp32   (with)
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or not weight.numel():
        raise ValueError(f"NF4 quantizes a non-empty floating-point tensor, got {getattr(weight, 'dtype', weight)!r}")
    if not weight.is_meta and not bool(torch.isfinite(weight).all()):  # meta: shapes only (parameter counting)
        raise ValueError("NF4 cannot quantize a tensor with inf or NaN values (the block's absmax would be one)")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"the block size must be a positive integer (QLoRA uses 64), got {size!r}")
    flat = weight.reshape(-1).float()  # (n,)
    absmax = block_absmax(flat, size)  # (n_blocks,)
    # u = w/c ∈ [−1, 1], computed as bitsandbytes' CPU kernel does: w · (1/c) in the full blocks, w / c in a
    # last partial block, c floored at 1e-38 (an all-zero block gives zeros)
    c, full = absmax.clamp(min=1e-38), flat.numel() - flat.numel() % size
    scaled = torch.cat([flat[:full] * per_value(1.0 / c, size, full), flat[full:] / c[-1]]).clamp(-1, 1)
    scaled = F.pad(scaled, (0, scaled.numel() % 2))  # an odd count: a 0 fills the last low nibble
    # nearest level by value: bucket j such that mid_{j-1} < u ≤ mid_j, mid_j = (q_j + q_{j+1}) / 2
    levels = NF4.to(flat.device)
    nibbles = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).to(torch.uint8)  # (n,) in 0..15
    packed = (nibbles[0::2] << 4) | nibbles[1::2]  # (⌈n/2⌉,): even index high, odd index low
    if not double_quant:
        return {"codes": packed, "absmax": absmax}
    # double quantization (§3): c₂ = mean(c₁) is subtracted, c₁ − c₂ quantized to 8 bits in blocks of 256
    offset = absmax.mean()
    absmax_codes, absmax_scale = quantize_blockwise_8bit(absmax - offset, DYNAMIC)
    return {"codes": packed, "absmax_codes": absmax_codes, "absmax_scale": absmax_scale, "absmax_offset": offset}


def dequantize_nf4(state: dict[str, torch.Tensor], shape, size: int = BLOCK) -> torch.Tensor:
    """The fp32 tensor of ``shape`` that ``state`` (from ``quantize_nf4``) holds: doubleDequant (QLoRA Eq. 6)."""
    if "absmax" in state:
        absmax = state["absmax"]
    else:  # c₁ = dequant(c₂ codes) + mean, in fp32 (as bitsandbytes)
        absmax = dequantize_blockwise(state["absmax_codes"], state["absmax_scale"], DYNAMIC, BLOCK2)
        absmax = absmax + state["absmax_offset"]
    n = torch.Size(shape).numel()
    # each byte -> its two levels at once (high nibble first): one gather of n/2 rows instead of unpacking nibbles
    values = NF4_PAIRS.to(absmax.device)[state["codes"].long()].view(-1)[:n]  # (n,) = q_code, in value order
    if n % size == 0:  # whole blocks: w = q_code · c in place, blockwise (the common case: every weight matrix here)
        return values.view(-1, size).mul_(absmax[:, None]).view(shape)
    return (F.pad(values, (0, -n % size)).view(-1, size) * absmax[:, None]).view(-1)[:n].view(shape)


def nf4_nbytes(n: int, double_quant: bool = True, size: int = BLOCK) -> int:
    """Bytes stored for n quantized values: n/2 codes + 4 per block (c₁ fp32), or with double quantization
    1 per block (c₁ in 8 bits) + 4 per 256 blocks (c₂ scales) + 4 (the mean): per parameter
    0.5 + 4/64 = 0.5625 without, 0.5 + 1/64 + 4/(64·256) ≈ 0.5159 with (QLoRA §3: 0.5 vs 0.127 bit of constants)."""
    n_blocks = -(-n // size)
    constants = 4 * n_blocks if not double_quant else n_blocks + 4 * -(-n_blocks // BLOCK2) + 4
    return -(-n // 2) + constants


class DequantizedLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = doubleDequant(...) rebuilt in the backward too (∂L/∂x = ∂L/∂y · W), never saved for it.

    Plain autograd would keep each layer's dequantized fp32 W (4 bytes per weight) alive from forward to backward,
    undoing the 4-bit storage during training; QLoRA's implementation (bitsandbytes' ``MatMul4Bit``) dequantizes
    again instead: only the 4-bit state, stored anyway, is kept. W is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight, bias)  # (..., d_out)

    @staticmethod
    def backward(ctx, grad):  # grad: ∂L/∂y, (..., d_out)
        grad_x = grad @ ctx.layer.weight if ctx.needs_input_grad[0] else None  # (..., d_in)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None  # (d_out,)
        return grad_x, grad_bias, None


class Linear4bit(nn.Linear):
    """A frozen ``nn.Linear`` stored in NF4: y = x · Wᵀ + b, W dequantized on every forward (QLoRA Eq. 5, first
    term), computed in fp32. The weight lives in buffers (``quantize_nf4``'s tensors), not parameters; the bias
    stays the Linear's own fp32 Parameter.

    It subclasses ``nn.Linear`` so the backbone contract (``site.linears()``) and every method's target search
    treat it as the Linear it replaces: LoRA, adapters, prefix attach unchanged. ``weight`` reads the dequantized
    W (LoRA reads its device and shape); writing it is refused, so LoRA cannot merge into it: re-quantizing
    W₀ + ΔW would round ΔW onto the NF4 grid (an error up to half a level gap times c per weight), changing the
    function the adapter was trained with. ``dequantize_linears(model)`` turns the layers back into fp32
    Linears, which merge exactly."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        if not isinstance(linear, nn.Linear) or isinstance(linear, Linear4bit):
            raise TypeError(f"Linear4bit quantizes an fp32 nn.Linear, got {type(linear).__name__}")
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
        nn.Module.__init__(self)  # not nn.Linear.__init__: no fp32 weight Parameter is made
        self.in_features, self.out_features, self.double_quant = linear.in_features, linear.out_features, double_quant
        for name, tensor in quantize_nf4(linear.weight.detach(), double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = linear.bias  # (d_out,) fp32 Parameter or None

    def quant_state(self) -> dict[str, torch.Tensor]:
        """The stored tensors, as ``quantize_nf4`` returns them."""
        return dict(self.named_buffers(recurse=False))

    @property
    def weight(self) -> torch.Tensor:
        """W = doubleDequant(c₁, c₂, W^NF4) (QLoRA Eq. 6), (d_out, d_in) fp32, recomputed at each read."""
        return dequantize_nf4(self.quant_state(), (self.out_features, self.in_features))

    @weight.setter
    def weight(self, value) -> None:
        raise RuntimeError("this Linear's weight is stored in 4 bits (NF4) and is frozen: it cannot be assigned, "
                           "and a LoRA cannot be merged into it (re-quantizing W0 + ΔW would round ΔW onto the "
                           "NF4 grid). Call minipeft.quant.dequantize_linears(model) first: the layers become fp32 "
                           "Linears holding the dequantized W0, which merge exactly. Nothing was changed.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # y = x · doubleDequant(c₁, c₂, W^NF4)ᵀ + b  (QLoRA Eq. 5), in fp32
        if not torch.is_grad_enabled() or not (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return F.linear(x, self.weight, self.bias)  # (..., d_out)
        return DequantizedLinear.apply(x, self.bias, self)

    def quantized_numel(self) -> int:
        """Weights this layer holds in 4 bits: parameters of the backbone, though stored as buffers."""
        return self.in_features * self.out_features

    def nbytes(self) -> int:
        """Bytes of the stored weight (codes and constants; the bias not counted)."""
        return sum(b.nbytes for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4, double_quant={self.double_quant}"


def block_linears(model: nn.Module) -> dict[tuple[nn.Module, str], nn.Linear]:
    """Every named Linear of every block's attention and FFN site (QLoRA's "all linear layers"; not the
    embeddings or the output head): (site, name) -> Linear."""
    backbone = find_backbone(model)
    return {(site, name): linear for kind in ("attn", "ffn") for site in backbone.sites(kind)
            for name, linear in site.linears().items()}


def quantize_linears(model: nn.Module, double_quant: bool = True) -> nn.Module:
    """Replace every linear layer of the backbone's blocks by a ``Linear4bit``, in place; returns ``model``.
    QLoRA's recipe: NF4 with double quantization (§3), then LoRA on all these layers (§4: LoRA on every linear
    layer of the blocks is needed to match full fine-tuning). Adapters attach afterwards: quantizing a model
    that already has some, or twice, is an error that leaves the model as it was."""
    linears = block_linears(model)
    done = [name for (_, name), m in linears.items() if isinstance(m, Linear4bit)]
    if done:
        raise ValueError(f"this model's linears are already quantized (e.g. {done[0]!r}); nothing was changed")
    hooked = [name for (_, name), m in linears.items() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        raise ValueError(f"quantize before adding adapters: linear {hooked[0]!r} already carries one (its hooks "
                         "would be lost with the replaced layer); nothing was changed")
    quantized = {key: Linear4bit(linear, double_quant) for key, linear in linears.items()}  # all, then swap
    for (site, name), layer in quantized.items():
        setattr(site, name, layer)
    return model


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> nn.Module:
    """Turn every ``Linear4bit`` in ``model`` into an fp32 ``nn.Linear`` holding its dequantized weight, in place.

    The module objects stay the same (their class changes), so attached adapters, their hooks and LoRA's
    reference to the layer remain: a QLoRA model becomes LoRA on the dequantized backbone, computing the same
    function, and ``merge_adapter`` then works (on 4 times the memory)."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            weight = module.weight
            for name in list(module.quant_state()):
                delattr(module, name)
            del module.double_quant
            module.__class__ = nn.Linear
            module.weight = nn.Parameter(weight, requires_grad=False)
    return model


def bytes_per_parameter(model: nn.Module) -> float:
    """Stored bytes per weight over every ``Linear4bit`` of ``model`` (fp32 would be 4)."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("this model has no 4-bit linears: call quantize_linears(model) first")
    return sum(m.nbytes() for m in layers) / sum(m.in_features * m.out_features for m in layers)
