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


# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: the normal quantile is within 2%)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean over a few independent runs (seeds); NaN with fewer than two."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    df = x.size - 1
    t = _T975[df - 1] if df <= len(_T975) else Z95
    half = t * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def curve_area(steps: Sequence[float], values: Sequence[float]) -> float:
    """Mean of a curve over its x range (trapezoid area / width): the success curve's area, comparable
    across runs of the same length, rewarding early learning as well as the end point."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan
    if x.size == 1 or x[-1] == x[0]:
        return float(y.mean())
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))
