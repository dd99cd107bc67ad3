"""Lesson 03 checks: the Kronecker-sum weight, the low-rank B_i, Compacter's parameter count.

References: ``minipeft.methods.phm.kron_sum`` (W = Σ_i A_i ⊗ B_i, Karimi Mahabadi et al. 2021 §2.3 Eq. 4),
B_i = s_i t_iᵀ (§3.2), ``minipeft.methods.compacter.compacter_count`` (§3.3, plus biases).
"""
from __future__ import annotations

import torch

from ..methods.compacter import compacter_count
from ..methods.phm import kron_sum
from . import call, explain, fail, passed


def _inputs(n: int, p: int, q: int, r: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, n, generator=g, dtype=torch.float64)
    if r is None:
        return A, torch.randn(n, p, q, generator=g, dtype=torch.float64)
    return torch.randn(n, p, r, generator=g, dtype=torch.float64), torch.randn(n, q, r, generator=g, dtype=torch.float64)


def _as_tensor(name: str, got, shape: tuple, what: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        fail(name, f"should return a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != shape:
        fail(name, f"returned shape {tuple(got.shape)} for {what}; expected {shape}.")
    return got.to(torch.float64)


def check_kron_sum(fn) -> None:
    """``fn(A, B) -> W``: A (n, n, n), B (n, p, q) -> W = Σ_i A_i ⊗ B_i, shape (n·p, n·q)."""
    name = "kron_sum"
    for n, p, q in ((2, 3, 5), (4, 6, 2), (3, 2, 2)):
        A, B = _inputs(n, p, q, seed=n)
        what = f"A of shape {(n, n, n)} and B of shape {(n, p, q)}"
        got = call(name, fn, A.clone(), B.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, n * p, n * q):
            fail(name, f"returned shape {tuple(got.shape)} for {what}: the n products A_i ⊗ B_i side by side. "
                 "W is their *sum* (shape (n·p, n·q)): add them up.")
        got = _as_tensor(name, got, (n * p, n * q),
                         what + " (each A_i ⊗ B_i is (n·p) x (n·q))")
        want = kron_sum(A, B)
        if torch.allclose(got, want, atol=1e-9):
            continue
        hints = [(sum(torch.kron(B[i], A[i]) for i in range(n)), "that is Σ_i B_i ⊗ A_i: the Kronecker product "
                  "does not commute. A_i ⊗ B_i is the block matrix whose block (a, c) is A_i[a, c]·B_i, i.e. "
                  "torch.kron(A[i], B[i])."),
                 (torch.kron(A[0], B[0]), "that is only A_1 ⊗ B_1: W is the *sum* over i = 1..n of A_i ⊗ B_i."),
                 (torch.kron(A[-1], B[-1]), "that is only the last term A_n ⊗ B_n: did your loop overwrite W "
                  "instead of adding to it (W = W + ...)?"),
                 (want / n, "that is the mean of the n products: W is their sum, not their average."),
                 (sum(torch.kron(A[i], B[i].T).T for i in range(n)) if p == q else None,
                  "B_i looks transposed: use B[i] as it is, shape (p, q).")]
        hint = next((h for w, h in hints if w is not None and w.shape == got.shape and torch.allclose(got, w, atol=1e-9)),
                    "compare with sum(torch.kron(A[i], B[i]) for i in range(n)).")
        fail(name, f"wrong values for {what}: {hint}")
    passed(name, "W = Σ_i A_i ⊗ B_i matches on 3 shapes (n = 2, 3, 4; square and non-square B_i)")


def check_low_rank_B(fn) -> None:
    """``fn(s, t) -> B``: s (n, p, r), t (n, q, r) -> B_i = s_i t_iᵀ stacked, shape (n, p, q)."""
    name = "low_rank_B"
    for n, p, q, r in ((4, 6, 3, 1), (2, 5, 2, 2), (3, 4, 4, 3)):
        s, t = _inputs(n, p, q, r, seed=p + r)
        what = f"s of shape {(n, p, r)} and t of shape {(n, q, r)}"
        got = call(name, fn, s.clone(), t.clone())
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, q, p) and p != q:
            fail(name, f"returned shape {(n, q, p)} for {what}: that is t_i s_iᵀ = B_iᵀ; B_i = s_i t_iᵀ is (p, q).")
        got = _as_tensor(name, got, (n, p, q), what + " (B_i = s_i t_iᵀ is p x q for each of the n products)")
        want = s @ t.mT
        if torch.allclose(got, want, atol=1e-9):
            continue
        hints = [(s[..., :1] @ t[..., :1].mT, "that uses only the first of the r columns: s_i t_iᵀ sums over all "
                  "r rank-1 terms, so multiply the whole (p, r) and (q, r) matrices: s @ t.transpose(-1, -2)."),
                 (s * t.sum(-1, keepdim=True).mT if p == q else None, "that multiplies elementwise: B_i = s_i t_iᵀ "
                  "is a matrix product (an outer product when r = 1)."),
                 (want / r, "that is divided by r: B_i = s_i t_iᵀ has no scaling.")]
        hint = next((h for w, h in hints if w is not None and torch.allclose(got, w, atol=1e-9)),
                    "B_i = s_i t_iᵀ: for each i, the (p, r) matrix s[i] times the transpose of the (q, r) t[i].")
        fail(name, f"wrong values for {what}: {hint}")
    passed(name, "B_i = s_i t_iᵀ matches for rank 1, 2 and 3 (n = 2, 3, 4)")


def check_compacter_count(fn) -> None:
    """``fn(d, L, k, n) -> int``: Compacter (Houlsby placement, rank 1) exactly as minipeft builds it."""
    name = "compacter_parameters"
    for d, L, k, n in ((768, 12, 24, 4), (384, 6, 24, 4), (768, 12, 48, 8), (64, 2, 8, 2)):
        got, want = call(name, fn, d, L, k, n), compacter_count(d, L, k, n)
        if got == want:
            continue
        terms = {"the biases (b_down k + b_up d per adapter: 2L(k + d))": 2 * L * (k + d),
                 "the shared A (n³, stored once)": n ** 3,
                 "one copy of A per PHM layer instead of one shared A (4L·n³ - n³)": 4 * L * n ** 3 - n ** 3,
                 "one of the two adapters per layer (Houlsby: one at the attention, one at the FFN)":
                     3 * L * (k + d)}
        hint = explain(got, want, terms) if isinstance(got, int) else " Return an int."
        if isinstance(got, int) and got == 4 * L * (k * d // n + n ** 3) + 2 * L * (k + d):
            hint = (" That is the PHM-Adapter's count (full B_i, an A per PHM layer): Compacter's B_i = s_i t_iᵀ has "
                    "in/n + out/n parameters per i, and one A shared by all layers.")
        fail(name, f"gave {got!r} for d={d}, L={L}, k={k}, n={n}; expected {want:,}.{hint} "
             "Per PHM layer: n·(in/n + out/n) = in + out for the s_i, t_i; 4 PHM layers per block; + biases; + n³.")
    passed(name, "matches numel for BERT-base (k = 24: 57,088), MiniLM and two more shapes")
