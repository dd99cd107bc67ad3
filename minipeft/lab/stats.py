"""Is a difference between two methods real? Small, exact statistics for a few seeds and one shared test set.

    mean_interval(accs)                 mean over seeds and the half-width of its 95% Student t interval
    mcnemar_exact(correct_a, correct_b) exact two-sided McNemar test on paired right/wrong outcomes
    paired_bootstrap(correct_a, ...)    accuracy difference and its 95% bootstrap interval, resampling examples
    compare(correct_a, correct_b)       both tests and a verdict: "better" / "within noise" / "worse"

``correct_*`` are 0/1 arrays (S, N): S seeds (seed s of method A is paired with seed s of method B) and N test
examples in the same order for both (``Result.test_predictions`` == the labels, see ``correctness``).

- t interval: mean ± t_{1-α/2, n-1} · s / √n (Student 1908); t quantiles from the closed forms of the t
  distribution for integer degrees of freedom (Abramowitz & Stegun 1964, 26.7.3-26.7.4), inverted by bisection.
- McNemar (1947): only discordant examples carry information. With b = #(A right, B wrong) and c = #(A wrong,
  B right), under "no difference" b ~ Binomial(b + c, 1/2); exact two-sided p = min(1, 2·P(X ≤ min(b, c))).
  Dietterich (1998) recommends it for comparing two classifiers on one test set. Pooled over seeds (b, c summed)
  it treats the S runs on one example as independent, which they are not (an example hard for every seed).
- Paired bootstrap (Efron & Tibshirani 1993; for NLP, Koehn 2004, Berg-Kirkpatrick et al. 2012): resample the
  N test examples with replacement, keeping each example's S seeds together (a cluster bootstrap, so the
  dependence across seeds is kept), and take the 2.5% / 97.5% percentiles of the mean difference.
- Verdict at α = 0.05: "better" / "worse" only when both agree (McNemar p < α and the bootstrap interval excludes
  0 on the same side); otherwise "within noise". Conservative on purpose: a course should not teach noise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
VERDICTS = ("better", "within noise", "worse")


# ---- a mean over seeds --------------------------------------------------------------------------------------

def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with integer ``df`` (Abramowitz & Stegun 1964, 26.7.3 odd, 26.7.4 even)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/π)[θ + sinθ cosθ (1 + (2/3)cos²θ + (2·4)/(3·5)cos⁴θ + ... up to cos^{df-3}θ)]
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + s * math.cos(theta) * total)
    # even: sinθ (1 + (1/2)cos²θ + (1·3)/(2·4)cos⁴θ + ... up to cos^{df-2}θ)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p, for p in (0.5, 1) (e.g. 0.975 for a 95% two-sided interval)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p!r}")
    target, lo, hi = 2 * p - 1, 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):  # bisection to machine precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_interval(xs, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the ``level`` t interval) over seeds; half-width nan with one value (no spread)."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean_interval needs at least one value")
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, t_quantile((1 + level) / 2, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


# ---- paired tests on the same test examples -----------------------------------------------------------------

def correctness(predictions, labels) -> np.ndarray:
    """0/1 array, 1 where a prediction equals its label; ``predictions`` one list per seed (S, N) or one (N,)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape[-1] != y.shape[-1]:
        raise ValueError(f"{p.shape[-1]} predictions for {y.shape[-1]} labels: they must be the same test examples")
    return (p == y).astype(np.int64)


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.int64)), np.atleast_2d(np.asarray(b, dtype=np.int64))
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same shape (seeds, examples), got {a.shape} and {b.shape}")
    if not np.isin(a, (0, 1)).all() or not np.isin(b, (0, 1)).all():
        raise ValueError("outcomes must be 0/1 (wrong/right) per example; use correctness(predictions, labels)")
    return a, b


def mcnemar_exact(correct_a, correct_b) -> tuple[int, int, float]:
    """(b, c, p): b = #(A right, B wrong), c = #(A wrong, B right), summed over seeds; exact two-sided p
    (McNemar 1947): min(1, 2·Σ_{i ≤ min(b,c)} C(n, i) / 2ⁿ), n = b + c; p = 1 when n = 0."""
    a, bb = _paired(correct_a, correct_b)
    b, c = int(((a == 1) & (bb == 0)).sum()), int(((a == 0) & (bb == 1)).sum())
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))  # exact integers: no overflow, no rounding
    return b, c, min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap(correct_a, correct_b, n_boot: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(difference, low, high): accuracy of A − accuracy of B (mean over seeds and examples) and its ``level``
    percentile interval over ``n_boot`` resamples of the examples (each example's seeds stay together)."""
    a, b = _paired(correct_a, correct_b)
    return bootstrap_mean((a - b).mean(axis=0), n_boot, seed, level)  # each example's difference, seed-averaged


def bootstrap_mean(per_example, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``per_example`` (N,) and its ``level`` percentile interval over ``n_boot``
    resamples of the N examples with replacement."""
    per_example = np.asarray(per_example, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, per_example.size, size=(n_boot, per_example.size))
    means = per_example[idx].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(per_example.mean()), float(low), float(high)


@dataclass
class Comparison:
    """A against B on the same test examples: the difference, both tests, and the verdict."""
    difference: float        # accuracy of A − accuracy of B, mean over seeds
    low: float               # bootstrap interval of the difference
    high: float
    b: int                   # examples (× seeds) only A got right
    c: int                   # examples (× seeds) only B got right
    p_mcnemar: float
    verdict: str             # "better" / "within noise" / "worse" (A compared with B)


def verdict_of(p_mcnemar: float, low: float, high: float, alpha: float = ALPHA) -> str:
    """"better" if McNemar p < α and the interval is above 0, "worse" if p < α and it is below 0, else
    "within noise"."""
    if p_mcnemar < alpha and low > 0:
        return "better"
    if p_mcnemar < alpha and high < 0:
        return "worse"
    return "within noise"


def compare(correct_a, correct_b, alpha: float = ALPHA, n_boot: int = 10_000, seed: int = 0) -> Comparison:
    """Paired comparison of A with B: bootstrap interval at level 1 − α, exact McNemar, verdict."""
    diff, low, high = paired_bootstrap(correct_a, correct_b, n_boot=n_boot, seed=seed, level=1 - alpha)
    b, c, p = mcnemar_exact(correct_a, correct_b)
    return Comparison(diff, low, high, b, c, p, verdict_of(p, low, high, alpha))


@dataclass
class ScoreComparison:
    """A against B on per-example scores in [0, 1] (a generation task's ROUGE-L F1), same examples and seeds."""
    difference: float        # mean score of A − mean score of B
    low: float               # bootstrap interval of the difference
    high: float
    p_t: float               # paired t-test over the examples
    verdict: str             # "better" / "within noise" / "worse"


def compare_scores(scores_a, scores_b, alpha: float = ALPHA, n_boot: int = 10_000, seed: int = 0) -> ScoreComparison:
    """Paired comparison of per-example scores (S, N) or (N,): each example's difference d_i, averaged over seeds;
    the bootstrap interval of mean(d) (``bootstrap_mean``) and the paired t-test over the N examples (Student
    1908: t = mean(d) / (sd(d) / √N), N − 1 degrees of freedom); the verdict as ``verdict_of`` with p_t."""
    a, b = np.atleast_2d(np.asarray(scores_a, dtype=np.float64)), np.atleast_2d(np.asarray(scores_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same shape (seeds, examples), got {a.shape} and {b.shape}")
    d = (a - b).mean(axis=0)
    diff, low, high = bootstrap_mean(d, n_boot, seed, 1 - alpha)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if sd == 0.0:
        p = 1.0 if diff == 0 else 0.0
    else:
        p = 1.0 - t_cdf_two_sided(diff / (sd / math.sqrt(d.size)), d.size - 1)
    return ScoreComparison(diff, low, high, p, verdict_of(p, low, high, alpha))


def verdict(correct_a, correct_b, alpha: float = ALPHA, n_boot: int = 10_000, seed: int = 0) -> str:
    """"better" / "within noise" / "worse": is A better than B on these paired outcomes (see ``compare``)?"""
    return compare(correct_a, correct_b, alpha, n_boot, seed).verdict
