"""Interval code against scipy / numpy references."""

import math

import numpy as np
import pytest
from scipy import stats

from opdgeom.stats import bootstrap_interval, bootstrap_statistic, seed_interval


def test_seed_interval_matches_scipy_t_interval():
    values = [0.31, 0.36, 0.29, 0.40]
    got = seed_interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert (got.lo, got.hi) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert got.n == 4


def test_seed_interval_one_seed_has_no_interval_and_nan_is_dropped():
    one = seed_interval([0.5, float("nan")])
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)
    assert seed_interval([]).n == 0


def test_bootstrap_interval_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(3)
    correct = (rng.random(600) < 0.3).astype(float)
    got = bootstrap_interval(correct, n_resamples=20000, seed=1)
    ref = stats.bootstrap((correct,), np.mean, n_resamples=20000, method="percentile", rng=np.random.default_rng(2))
    assert got.mean == pytest.approx(correct.mean())
    assert got.lo == pytest.approx(ref.confidence_interval.low, abs=3e-3)
    assert got.hi == pytest.approx(ref.confidence_interval.high, abs=3e-3)
    # and the normal approximation of a binomial proportion
    se = math.sqrt(correct.mean() * (1 - correct.mean()) / correct.size)
    assert got.half_width == pytest.approx(1.96 * se, rel=0.05)


def test_bootstrap_over_seeds_resamples_prompts_jointly():
    # Two seeds that disagree on every prompt average to exactly 0.5 per prompt: no prompt variance.
    a = np.array([1, 0] * 50)
    got = bootstrap_interval(np.stack([a, 1 - a]))
    assert got.mean == 0.5 and got.lo == pytest.approx(0.5) and got.hi == pytest.approx(0.5) and got.n == 100


def test_bootstrap_statistic_matches_scipy_paired_bootstrap_of_a_ratio():
    # A token-weighted mean (sum of per-prompt sums / sum of per-prompt token counts), changed between
    # two checkpoints evaluated on the same prompts: the pairs must be resampled together.
    rng = np.random.default_rng(5)
    tokens_a, tokens_b = rng.integers(5, 40, 400), rng.integers(5, 40, 400)
    sums_a = tokens_a * (0.30 + 0.1 * rng.standard_normal(400))
    sums_b = sums_a * tokens_b / tokens_a - tokens_b * 0.02 + tokens_b * 0.05 * rng.standard_normal(400)

    def change(sa, ta, sb, tb, axis=-1):
        return sb.sum(-1) / tb.sum(-1) - sa.sum(-1) / ta.sum(-1)

    got = bootstrap_statistic(change, [sums_a, tokens_a, sums_b, tokens_b], n_resamples=20000, seed=1)
    ref = stats.bootstrap(
        (sums_a, tokens_a, sums_b, tokens_b), change, paired=True, vectorized=True, n_resamples=20000,
        method="percentile", rng=np.random.default_rng(2),
    )  # fmt: skip
    assert got.mean == pytest.approx(change(sums_a, tokens_a, sums_b, tokens_b), rel=1e-12)
    assert got.lo == pytest.approx(ref.confidence_interval.low, abs=1e-3)
    assert got.hi == pytest.approx(ref.confidence_interval.high, abs=1e-3)
    # pairing: a change of exactly 0.01 per token on every prompt has no sampling spread at all
    shifted = bootstrap_statistic(change, [sums_a, tokens_a, sums_a + 0.01 * tokens_a, tokens_a])
    assert (shifted.lo, shifted.mean, shifted.hi) == (pytest.approx(0.01), pytest.approx(0.01), pytest.approx(0.01))


def test_bootstrap_statistic_resamples_seed_rows_jointly_and_names_a_mismatch():
    a = np.array([[1.0, 0.0] * 50, [0.0, 1.0] * 50])  # two seeds that disagree on every prompt
    got = bootstrap_statistic(lambda x: float(x.mean()), [a])
    assert got.mean == 0.5 and got.lo == pytest.approx(0.5) and got.hi == pytest.approx(0.5)
    with pytest.raises(ValueError, match="number of prompts"):
        bootstrap_statistic(lambda x, y: 0.0, [np.zeros(3), np.zeros(4)])
    assert bootstrap_statistic(lambda x: 0.0, [np.zeros(0)]).n == 0


def test_avg_at_k_intervals_match_a_float64_hand_computation():
    """avg@k of 3 seeds x 5 problems x 4 samples: the bootstrap over problems (the same resampled problems
    for every seed) and the t interval over seeds, by hand."""
    outcomes_SPK = np.array(
        [[[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0]],
         [[1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]],
         [[1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]]], dtype=np.float64
    )  # fmt: skip
    share_SP = outcomes_SPK.mean(axis=2)
    got = bootstrap_interval(share_SP, n_resamples=500, seed=7)
    per_problem = [sum(share_SP[s][p] for s in range(3)) / 3 for p in range(5)]
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 5, size=(500, 5))
    means = sorted(sum(per_problem[i] for i in row) / 5 for row in draws)
    assert got.mean == pytest.approx(sum(per_problem) / 5, abs=1e-15) == pytest.approx(outcomes_SPK.mean(), abs=1e-15)
    assert got.lo == pytest.approx(np.quantile(means, 0.025), abs=1e-15)
    assert got.hi == pytest.approx(np.quantile(means, 0.975), abs=1e-15)
    per_seed = [float(outcomes_SPK[s].sum()) / 20 for s in range(3)]  # avg@4 of each seed
    mean = sum(per_seed) / 3
    sd = (sum((x - mean) ** 2 for x in per_seed) / 2) ** 0.5
    t_975_df2 = (2 * 0.975 - 1) / (2 * 0.975 * 0.025) ** 0.5  # Student t quantile, 2 degrees of freedom, closed form
    over_seeds = seed_interval(per_seed)
    assert over_seeds.mean == pytest.approx(mean, abs=1e-15)
    assert over_seeds.hi - over_seeds.mean == pytest.approx(t_975_df2 * sd / 3**0.5, rel=1e-12)
