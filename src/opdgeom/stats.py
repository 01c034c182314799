"""Intervals on every number that compares runs: over seeds (Student t) and over prompts (bootstrap).

- ``seed_interval(values)``: mean of one quantity over seeds with a two-sided Student-t interval
  (n - 1 degrees of freedom); one seed has no interval (NaN bounds), never a made-up one.
- ``bootstrap_interval(correct_SN)``: accuracy averaged over seeds (rows) and prompts (columns) with
  a percentile bootstrap over prompts: the same resampled prompts for every seed, since every seed
  is evaluated on the same held-out set.
- ``bootstrap_statistic(statistic, arrays)``: any statistic of per-prompt arrays (a token-weighted
  mean, a paired change between two checkpoints) with the same percentile bootstrap over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

CONFIDENCE = 0.95
N_BOOTSTRAP = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    n: int  # seeds (seed_interval) or prompts (bootstrap_interval)

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def format(self, digits: int = 3) -> str:
        """ "0.412 [0.371, 0.455]" (or "0.412" when there is no interval)."""
        if math.isnan(self.lo):
            return f"{self.mean:.{digits}g}" if abs(self.mean) < 1e-3 and self.mean else f"{self.mean:.{digits}f}"
        fmt = (lambda v: f"{v:.{digits}g}") if 0 < abs(self.mean) < 1e-3 else (lambda v: f"{v:.{digits}f}")
        return f"{fmt(self.mean)} [{fmt(self.lo)}, {fmt(self.hi)}]"


def seed_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds and its t interval: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n). NaNs are dropped."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(_scipy_stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size))


def bootstrap_interval(
    correct_SN, confidence: float = CONFIDENCE, n_resamples: int = N_BOOTSTRAP, seed: int = 0
) -> Interval:
    """Mean of a (seeds x prompts) 0/1 array; percentile bootstrap over prompts (columns)."""
    x = np.atleast_2d(np.asarray(correct_SN, dtype=np.float64))
    n = x.shape[1]
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    per_prompt_N = x.mean(axis=0)
    rng = np.random.default_rng(seed)
    idx_RN = rng.integers(0, n, size=(n_resamples, n))
    means_R = per_prompt_N[idx_RN].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means_R, [alpha, 1 - alpha])
    return Interval(float(per_prompt_N.mean()), float(lo), float(hi), n)


def bootstrap_statistic(
    statistic: Callable[..., float],
    arrays: Sequence,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_BOOTSTRAP,
    seed: int = 0,
) -> Interval:
    """``statistic(*arrays)`` with a percentile bootstrap over prompts: the last axis of every array is
    the same prompts, resampled jointly (so a change between two checkpoints stays paired)."""
    xs = [np.asarray(a, dtype=np.float64) for a in arrays]
    n = xs[0].shape[-1]
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if any(x.shape[-1] != n for x in xs):
        raise ValueError(f"bootstrap_statistic: arrays disagree on the number of prompts: {[x.shape for x in xs]}")
    rng = np.random.default_rng(seed)
    idx_RN = rng.integers(0, n, size=(n_resamples, n))
    values_R = np.array([statistic(*(x[..., idx_N] for x in xs)) for idx_N in idx_RN])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values_R, [alpha, 1 - alpha])
    return Interval(float(statistic(*xs)), float(lo), float(hi), n)
