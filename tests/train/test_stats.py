"""Evaluation intervals against hand-computed values."""

import pytest

from trace_core.train.stats import bootstrap_interval, mean_interval, wilson_interval


def test_wilson_interval_matches_hand_computed_values():
    # p = 5/10, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.3841 = 0.2634
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/10: the upper bound is z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775 (the normal approximation gives 0)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(0, 0)
    assert low != low and high != high  # NaN: no tasks, no interval


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.2]
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values)
    assert low < sum(values) / len(values) < high and low >= 0.1 and high <= 0.8


def test_mean_interval_uses_wilson_for_binary_outcomes_only():
    assert mean_interval([1, 0, 1, 0, 1, 0, 1, 0, 1, 0]) == wilson_interval(5, 10)
    assert mean_interval([0.5, 1.0, 0.0]) == bootstrap_interval([0.5, 1.0, 0.0])
