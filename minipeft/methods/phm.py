"""The parameterized hypercomplex multiplication (PHM) layer of Compacter (Karimi Mahabadi et al. 2021).

    y = x W + b,   W = Σ_{i=1..n} A_i ⊗ B_i                                    §2.3, Eq. 3-4
    A_i ∈ R^{n×n} ("slow" weights, may be shared by every PHM layer of an adapter, §3.1)
    B_i ∈ R^{(in/n)×(out/n)} full (PHM), or B_i = s_i t_iᵀ with s_i ∈ R^{(in/n)×r}, t_i ∈ R^{(out/n)×r}
    (LPHM, rank r = 1 in the paper, §3.2)

W ∈ R^{in×out} as in the paper's row-vector convention (nn.Linear stores Wᵀ). Parameters of one layer:
A n³ (unless shared), B n·(in/n)·(out/n) = in·out/n (PHM) or r·(in + out) (LPHM), bias out.

Computing it (``bench/compacter_speed.py`` measures the options side by side): the layer builds W once per
forward with one einsum (W[a·p+b, c·q+e] = Σ_i A_i[a,c] B_i[b,e]) and then does one matmul over all tokens,
never a per-token Kronecker product. The factored form ``phm_apply_factored`` (x reshaped to (n, in/n),
y = Σ_i A_iᵀ X B_i) needs fewer flops for LPHM but runs several small kernels over all tokens; measured on CPU
(MiniLM shapes, 2,048 tokens, forward + backward) it was no faster for LPHM and 1.5-6x slower for full B_i, so it
is kept for the comparison and the tests only. Building W with a ``torch.kron`` loop was 1.2-1.4x slower for the
d -> k projections and faster for the k -> d LPHM one (sub-millisecond either way; a whole Compacter training
step is within ~7% of the frozen-backbone floor in CPU time).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W = Σ_i A_i ⊗ B_i (Eq. 4). A: (n, n, n), B: (n, p, q) -> W: (n·p, n·q); equals the torch.kron loop."""
    n, p, q = B.shape
    # (A_i ⊗ B_i)[a·p + b, c·q + e] = A_i[a, c] · B_i[b, e], summed over i
    return torch.einsum("iac,ibe->abce", A, B).reshape(n * p, n * q)  # (in, out)


def kron_sum_reference(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The definition, literally: a sum of n explicit ``torch.kron`` products (for tests and teaching)."""
    return sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))


def phm_apply_factored(x: torch.Tensor, A: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None):
    """x W without forming W: with X = x viewed as (n, in/n), x (A_i ⊗ B_i) = vec(A_iᵀ X B_i).
    ``t`` given: B_i = s_i t_iᵀ (LPHM; s (n, p, r), t (n, q, r)); else ``s`` is the full B (n, p, q)."""
    n, p = s.shape[0], s.shape[1]
    X = x.reshape(*x.shape[:-1], n, p)  # (..., n, p)
    if t is None:
        Z = torch.einsum("...ab,ibe->...iae", X, s)  # X B_i: (..., n, n, q)
        return torch.einsum("...iae,iac->...ce", Z, A).flatten(-2)  # Σ_i A_iᵀ (X B_i): (..., out)
    u = torch.einsum("...ab,ibr->...iar", X, s)  # X s_i: (..., n, n, r)
    v = torch.einsum("...iar,iac->...icr", u, A)  # A_iᵀ X s_i: (..., n, n, r)
    return torch.einsum("...icr,ier->...ce", v, t).flatten(-2)  # Σ_i (A_iᵀ X s_i) t_iᵀ: (..., out)


def new_phm_rule(n: int, std: float) -> nn.Parameter:
    """The slow weights A_1..A_n, stacked (n, n, n), drawn from N(0, std²) as in the reference code."""
    return nn.Parameter(torch.randn(n, n, n) * std)


def _glorot(*shape: int) -> nn.Parameter:
    """Each of the n matrices (last two dims) Glorot-uniform (the paper's code initialises B, s, t so)."""
    bound = math.sqrt(6.0 / (shape[-2] + shape[-1]))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class PHMLinear(nn.Module):
    """y = x (Σ_i A_i ⊗ B_i) + b. ``rank=None``: full B_i (PHM); ``rank=r``: B_i = s_i t_iᵀ (LPHM).
    ``A``: an existing (n, n, n) Parameter to share (Compacter), or None for this layer's own A."""

    def __init__(self, in_features: int, out_features: int, n: int, rank: int | None = None,
                 A: nn.Parameter | None = None, bias: bool = True, init_std: float = 1e-2):
        super().__init__()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of Kronecker products) must be a positive integer, got {n!r}")
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % n:
                raise ValueError(f"n={n} must divide both dimensions of a PHM layer: {what}={size} is not "
                                 f"divisible by {n}; choose n among the common divisors of {in_features} and "
                                 f"{out_features}")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be None (full B_i) or a positive integer, got {rank!r}")
        if A is not None and tuple(A.shape) != (n, n, n):
            raise ValueError(f"a shared A must have shape (n, n, n) = {(n, n, n)}, got {tuple(A.shape)}")
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        p, q = in_features // n, out_features // n
        self.A = A if A is not None else new_phm_rule(n, init_std)  # (n, n, n), shared or own
        if rank is None:
            self.B = _glorot(n, p, q)  # (n, in/n, out/n)
        else:
            self.s, self.t = _glorot(n, p, rank), _glorot(n, q, rank)  # (n, in/n, r), (n, out/n, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def B_matrices(self) -> torch.Tensor:
        """B_i, stacked (n, in/n, out/n): the parameter itself, or s_i t_iᵀ (§3.2)."""
        return self.B if self.rank is None else self.s @ self.t.mT

    def weight(self) -> torch.Tensor:
        """W = Σ_i A_i ⊗ B_i, (in, out)."""
        return kron_sum(self.A, self.B_matrices())

    def forward(self, x):
        return F.linear(x, self.weight().mT, self.bias)  # x W + b: (..., out)

    def extra_repr(self) -> str:
        kind = "PHM" if self.rank is None else f"LPHM rank {self.rank}"
        return f"{self.in_features} -> {self.out_features}, n={self.n}, {kind}, bias={self.bias is not None}"


def phm_layer_count(in_features: int, out_features: int, n: int, rank: int | None = None,
                    with_A: bool = True, bias: bool = True) -> int:
    """One PHM layer: A n³ (if owned) + B in·out/n (PHM) or r·(in + out) (LPHM) + bias out (§3.3)."""
    b = in_features * out_features // n if rank is None else rank * (in_features + out_features)
    return b + (n ** 3 if with_A else 0) + (out_features if bias else 0)
