"""minipeft.lab.stats on small cases computed by hand (t quantiles from tables, McNemar from binomial sums)."""
import math

import numpy as np
import pytest

from minipeft.lab.stats import (compare, correctness, mcnemar_exact, mean_interval, paired_bootstrap, t_quantile,
                            verdict, verdict_of)


@pytest.mark.parametrize("df, table", [(1, 12.706205), (2, 4.302653), (3, 3.182446), (4, 2.776445), (5, 2.570582),
                                       (10, 2.228139), (30, 2.042272)])
def test_t_quantile_matches_the_table(df, table):
    """Two-sided 95% critical values of Student's t (any statistics table)."""
    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-6)


def test_t_quantile_for_many_degrees_of_freedom_tends_to_the_normal():
    assert t_quantile(0.975, 100) == pytest.approx(1.983972, abs=1e-6)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962339, abs=1e-6)
    assert 1.959964 < t_quantile(0.975, 5000) < 1.9605


def test_mean_interval_by_hand():
    """0.76, 0.78, 0.80: mean 0.78, s = 0.02, half-width t_{0.975,2}·0.02/√3 = 4.302653·0.011547 = 0.049683."""
    m, half = mean_interval([0.76, 0.78, 0.80])
    assert m == pytest.approx(0.78)
    assert half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert mean_interval([0.7, 0.7, 0.7]) == (pytest.approx(0.7), 0.0)
    m, half = mean_interval([0.75])
    assert m == 0.75 and math.isnan(half)
    with pytest.raises(ValueError):
        mean_interval([])


def test_mcnemar_exact_by_hand():
    """b = 6 (A right, B wrong), c = 2: p = 2·(C(8,0) + C(8,1) + C(8,2)) / 2⁸ = 2·37/256 = 0.2890625."""
    a = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0]
    b = [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert mcnemar_exact(a, b) == (6, 2, 0.2890625)
    assert mcnemar_exact(b, a) == (2, 6, 0.2890625)  # symmetric


def test_mcnemar_small_cases():
    assert mcnemar_exact([1] * 7, [0] * 7) == (7, 0, 2 / 128)  # all discordant one way: 2·(1/2)⁷
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)  # no discordant pair: no evidence at all
    assert mcnemar_exact([1, 0], [0, 1]) == (1, 1, 1.0)  # capped at 1


def test_mcnemar_pools_seeds():
    a = np.array([[1, 1, 0], [1, 0, 0]])
    b = np.array([[0, 1, 0], [0, 0, 1]])
    assert mcnemar_exact(a, b)[:2] == (2, 1)


def test_identical_inputs_are_within_noise():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(3, 500))
    c = compare(a, a.copy())
    assert (c.difference, c.low, c.high, c.b, c.c, c.p_mcnemar) == (0.0, 0.0, 0.0, 0, 0, 1.0)
    assert c.verdict == verdict(a, a) == "within noise"


def test_a_clear_difference_is_better_and_worse_the_other_way():
    rng = np.random.default_rng(2)
    b = rng.random((3, 500)) < 0.70
    a = b | (rng.random((3, 500)) < 0.3)  # A right wherever B is, and on ~30% of B's mistakes
    assert verdict(a, b) == "better"
    assert verdict(b, a) == "worse"


def test_a_small_difference_is_within_noise():
    """One example of 500 flipped: Δ = 0.2 points, p = 1."""
    b = np.zeros((1, 500), dtype=int)
    a = b.copy()
    a[0, 0] = 1
    c = compare(a, b)
    assert c.difference == pytest.approx(1 / 500) and c.p_mcnemar == 1.0 and c.verdict == "within noise"


def test_bootstrap_is_seeded_and_brackets_the_difference():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, size=(3, 200)), rng.integers(0, 2, size=(3, 200))
    first, again = paired_bootstrap(a, b, n_boot=2000, seed=7), paired_bootstrap(a, b, n_boot=2000, seed=7)
    assert first == again
    diff, low, high = first
    assert diff == pytest.approx((a.mean() - b.mean()))
    assert low < diff < high


def test_bootstrap_keeps_seeds_of_one_example_together():
    """Two seeds that always agree on an example: the cluster bootstrap sees N examples, not 2N independent ones,
    so its interval equals the one from a single seed."""
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 2, size=(1, 300)), rng.integers(0, 2, size=(1, 300))
    one = paired_bootstrap(a, b, n_boot=3000, seed=0)
    two = paired_bootstrap(np.repeat(a, 2, 0), np.repeat(b, 2, 0), n_boot=3000, seed=0)
    assert one == pytest.approx(two)


def test_verdict_needs_both_tests():
    assert verdict_of(0.01, 0.01, 0.05) == "better"
    assert verdict_of(0.01, -0.05, -0.01) == "worse"
    assert verdict_of(0.2, 0.01, 0.05) == "within noise"  # interval alone is not enough
    assert verdict_of(0.01, -0.01, 0.05) == "within noise"  # nor is the p-value alone


def test_correctness_and_input_errors():
    assert correctness([[1, 0, 1], [0, 0, 1]], [1, 1, 1]).tolist() == [[1, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="same test examples"):
        correctness([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="same shape"):
        mcnemar_exact([[1, 0]], [[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([2, 0], [1, 0])
