"""Lesson 03 checks: the Kronecker-sum weight, the low-rank B_i, Compacter's parameter count.

References: ``minipeft.methods.phm.kron_sum`` (W = Σ_i A_i ⊗ B_i, Karimi Mahabadi et al. 2021 §2.3 Eq. 4),
B_i = s_i t_iᵀ (§3.2), ``minipeft.methods.compacter.compacter_count`` (§3.3, plus biases).
"""
from __future__ import annotations

import torch

from ...methods.compacter import compacter_count
from ...methods.phm import kron_sum
from . import call, explain, fail, need_int, passed


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
        got = call(name, fn, A.clone(), B.clone(), hint="A_i is the i-th (n, n) matrix of A and B_i the i-th (p, q) "
                   "matrix of B, each used as it is (torch.kron of a transposed matrix fails with 'view size is not "
                   "compatible'); torch.kron of two matrices gives their (n·p, n·q) Kronecker product.")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, n * p, n * q):
            fail(name, f"returned shape {tuple(got.shape)} for {what}: the n products A_i ⊗ B_i side by side. "
                 "W is their *sum* (shape (n·p, n·q)): add them up.")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n * q, n * p) and p != q:
            fail(name, f"returned shape {tuple(got.shape)} for {what}: that is (n·q, n·p), transposed. Is B_i "
                 "(or W) transposed? Use each B_i as it is, shape (p, q).")
        got = _as_tensor(name, got, (n * p, n * q),
                         what + " (each A_i ⊗ B_i is (n·p) x (n·q))")
        want = kron_sum(A, B)
        if torch.allclose(got, want, atol=1e-9):
            continue
        ks = lambda X, Y: sum(torch.kron(X[i].contiguous(), Y[i].contiguous()) for i in range(n))  # noqa: E731
        hints = [(ks(B, A), "that is Σ_i B_i ⊗ A_i: the Kronecker product does not commute. A_i ⊗ B_i is the "
                  "block matrix whose block (a, c) is A_i[a, c]·B_i."),
                 (torch.kron(A[0], B[0]), "that is only A_1 ⊗ B_1: W is the *sum* over i = 1..n of A_i ⊗ B_i."),
                 (torch.kron(A[-1], B[-1]), "that is only the last term A_n ⊗ B_n: did your loop overwrite W "
                  "instead of adding to it (W = W + ...)?"),
                 (want / n, "that is the mean of the n products: W is their sum, not their average."),
                 (ks(A, B.mT) if p == q else None, "B_i looks transposed: use each B_i as it is, shape (p, q)."),
                 (ks(A.mT, B), "A_i looks transposed: use each A_i as it is."),
                 (ks(A.transpose(0, 1), B), "A_i is taken along the wrong axis of A: the n matrices A_i are "
                  "stacked along the first axis, as the B_i are.")]
        hint = next((h for w, h in hints if w is not None and w.shape == got.shape and torch.allclose(got, w, atol=1e-9)),
                    "check the order (A_i ⊗ B_i), which axis holds the i-th matrix (the first, for A and B) and that "
                    "all n products are added up.")
        fail(name, f"wrong values for {what}: {hint}")
    passed(name, "W = Σ_i A_i ⊗ B_i matches on 3 shapes (n = 2, 3, 4; square and non-square B_i)")


def check_low_rank_B(fn) -> None:
    """``fn(s, t) -> B``: s (n, p, r), t (n, q, r) -> B_i = s_i t_iᵀ stacked, shape (n, p, q)."""
    name = "low_rank_B"
    for n, p, q, r in ((4, 6, 3, 1), (2, 5, 2, 2), (3, 4, 4, 3)):
        s, t = _inputs(n, p, q, r, seed=p + r)
        what = f"s of shape {(n, p, r)} and t of shape {(n, q, r)}"
        got = call(name, fn, s.clone(), t.clone(), hint=f"s_i is (p, r) and t_i is (q, r) (here r={r}): B_i = s_i t_iᵀ "
                   "is a matrix product that sums over the r columns, done for each i (an elementwise outer "
                   "product only fits r = 1).")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == (n, q, p) and p != q:
            fail(name, f"returned shape {(n, q, p)} for {what}: that is t_i s_iᵀ = B_iᵀ; B_i = s_i t_iᵀ is (p, q).")
        got = _as_tensor(name, got, (n, p, q), what + " (B_i = s_i t_iᵀ is p x q for each of the n products)")
        want = s @ t.mT
        if torch.allclose(got, want, atol=1e-9):
            continue
        hints = [(s[..., :1] @ t[..., :1].mT, "that uses only the first of the r columns: s_i t_iᵀ sums over all "
                  "r rank-1 terms, so multiply the whole (p, r) and (q, r) matrices."),
                 (want.mT if p == q else None, "that is t_i s_iᵀ = B_iᵀ: B_i = s_i t_iᵀ, s_i first."),
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
        need_int(name, got, f"for d={d}, L={L}, k={k}, n={n}")
        if got == want:
            continue
        terms = {"the biases (b_down k + b_up d per adapter: 2L(k + d))": 2 * L * (k + d),
                 "the shared A (n³, stored once)": n ** 3,
                 "one copy of A per PHM layer instead of one shared A (4L·n³ - n³)": 4 * L * n ** 3 - n ** 3,
                 "one of the two adapters per layer (Houlsby: one at the attention, one at the FFN)":
                     3 * L * (k + d)}
        hint = explain(got, want, terms)
        if got == 4 * L * (k * d // n + n ** 3) + 2 * L * (k + d):
            hint = (" That is the PHM-Adapter's count (full B_i, an A per PHM layer): Compacter's B_i = s_i t_iᵀ has "
                    "in/n + out/n parameters per i, and one A shared by all layers.")
        fail(name, f"gave {got:,} for d={d}, L={L}, k={k}, n={n}; expected {want:,}.{hint} Count the s_i and t_i "
             "of one PHM layer (n of each, in/n and out/n long), then PHM layers per adapter and adapters per layer, "
             "then the biases and the one shared A.")
    passed(name, "matches numel for BERT-base (k = 24: 57,088), MiniLM and two more shapes")


# ---- a derivation: the n that makes a PHM layer smallest ------------------------------------------------------

# (1536, 12): the common divisor nearest to the continuous minimum (dk/3)^(1/4) ≈ 8.85 is 6, the best is 12;
# (384, 8): nearest on a log scale to ≈ 6.5 is 8, the best is 4. Rounding down fails on (384, 24), up on (768, 24).
BEST_N_CASES = ((384, 24), (768, 48), (384, 32), (768, 24), (10, 6), (1536, 12), (384, 8))


def phm_weights(d_in: int, d_out: int, n: int) -> int:
    """Weights of one PHM layer with its own A (no bias): n³ for the A_i + n·(d_in/n)(d_out/n) for the B_i."""
    return n ** 3 + d_in * d_out // n


def reference_best_n(d: int, k: int) -> int:
    """The n dividing both d and k that minimises a PHM layer's weights d·k/n + n³ (ties: the smaller n)."""
    divisors = [n for n in range(1, min(d, k) + 1) if d % n == 0 and k % n == 0]
    return min(divisors, key=lambda n: (phm_weights(d, k, n), n))


def check_best_n(fn) -> None:
    """``fn(d, k) -> int``: the number of Kronecker terms n that makes a d→k PHM layer (own A_i, full B_i, no
    bias) smallest, among the n that divide both d and k."""
    name = "best_n"
    for d, k in BEST_N_CASES:
        got = call(name, fn, d, k)
        need_int(name, got, f"for d={d}, k={k}")
        want = reference_best_n(d, k)
        if got == want:
            continue
        where = (f"for d={d}, k={k}: gave n={got}, expected n={want} ({phm_weights(d, k, want):,} weights"
                 + (f" vs {phm_weights(d, k, got):,} at n={got}" if got >= 1 and d % got == 0 and k % got == 0
                    else "") + ").")
        divisors = [n for n in range(1, min(d, k) + 1) if d % n == 0 and k % n == 0]
        smooth = (d * k / 3) ** 0.25  # where d·k/n + n³ would be smallest if n could be any real number
        around = {max(n for n in divisors if n <= smooth), min([n for n in divisors if n >= smooth] or [k])}
        if got < 1 or d % got or k % got:
            hint = (f" n={got} does not divide both d={d} and k={k}: the B_i are (d/n)×(k/n) tiles, so only "
                    "common divisors are possible. Search among them.")
        elif {got, want} == around:
            hint = (f" The count d·k/n + n³ is smallest near n ≈ (dk/3)^(1/4) ≈ {smooth:.2f}, but it is not "
                    f"symmetric around that point: n={got} is on one side of it and n={want} on the other. Rounding "
                    "to a nearby divisor is not enough: compare the counts of the divisors themselves.")
        elif got == max(n for n in range(1, min(d, k) + 1) if d % n == 0 and k % n == 0):
            hint = (" The largest n makes the B_i smallest but the A_i cost n³, which grows fast: minimise the "
                    "sum of both parts.")
        elif got == 1:
            hint = " n = 1 is the dense matrix; the A_i cost only n³, so a larger n pays for itself at first."
        else:
            hint = " Write the weights as a function of n (both parts), then compare every allowed n."
        fail(name, where + hint)
    passed(name, f"the n that minimises d·k/n + n³ among the common divisors, on {len(BEST_N_CASES)} shapes")
