"""Intervals for evaluation numbers: a success rate over eval tasks, or a mean over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (well behaved at 0/n and n/n, unlike the
    normal approximation)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (fixed seed: the same values give the same interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    means = np.random.default_rng(seed).choice(x, size=(resamples, x.size), replace=True).mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% interval of the mean of per-task outcomes: Wilson when every value is 0 or 1, else bootstrap."""
    x = np.asarray(values, dtype=np.float64)
    if x.size and np.isin(x, (0.0, 1.0)).all():
        return wilson_interval(int(x.sum()), int(x.size))
    return bootstrap_interval(x)
