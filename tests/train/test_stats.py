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


def test_t_interval_and_curve_area_match_hand_computed_values():
    from trace_core.train.stats import curve_area, t_interval

    # mean 2, sample sd 1, n 3: 2 -+ 4.303 / sqrt(3)
    assert t_interval([1.0, 2.0, 3.0]) == pytest.approx((2 - 2.48434, 2 + 2.48434), abs=1e-4)
    low, high = t_interval([0.5])
    assert low != low and high != high  # one seed: no interval
    assert curve_area([0, 50, 100], [0.0, 0.5, 1.0]) == pytest.approx(0.5)
    assert curve_area([0, 100, 250], [0.2, 0.2, 0.5]) == pytest.approx((0.2 * 100 + 0.35 * 150) / 250)


def _config(steps: int):
    """The parts of a TrainConfig that write_comparison reads (its header line)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        steps=steps,
        allocation=SimpleNamespace(leaves_per_step=16, roots=8, continuations_per_root=1),
        env=SimpleNamespace(name="gridworld"),
        model=SimpleNamespace(name="tiny"),
    )


def _history(successes, ratio):
    """A run's metrics rows: evaluations at steps 0, 1, 2 and two training steps."""
    rows = [{"step": 0, "leaves_sampled": 0, "eval/success": successes[0]}]
    for step in (1, 2):
        rows.append(
            {
                "step": step,
                "leaves_sampled": 16 * step,
                "effective_ratio": ratio,
                "leaves": 16,
                "generated_tokens": 100,
                "dedup_ratio": 1.5,
                "time/train": 0.1,
                "eval/success": successes[step],
            }
        )
    return rows


def test_comparison_reports_intervals_and_paired_differences(tmp_path):
    import json

    from trace_core.train.report import write_comparison

    cfg = _config(steps=2)
    runs = {
        "uniform": [_history([0.1, 0.2, 0.3], 0.3), _history([0.1, 0.1, 0.2], 0.4), _history([0.2, 0.2, 0.2], 0.2)],
        "trace": [_history([0.1, 0.3, 0.5], 0.5), _history([0.1, 0.2, 0.3], 0.5), _history([0.2, 0.3, 0.4], 0.6)],
    }
    summary = write_comparison(runs, cfg, tmp_path)
    assert summary["trace"]["final_eval_success"] == pytest.approx(0.4)
    assert summary["trace"]["final_eval_success_ci"] == pytest.approx(
        (0.4 - 4.303 * 0.1 / 3**0.5, 0.4 + 4.303 * 0.1 / 3**0.5), abs=1e-3
    )
    assert set(json.loads((tmp_path / "comparison.json").read_text())) == {"uniform", "trace"}
    paired = json.loads((tmp_path / "comparison_paired.json").read_text())["trace"]
    assert paired["final_eval_success"]["per_seed"] == pytest.approx([0.2, 0.1, 0.2])
    assert paired["effective_ratio"]["mean"] == pytest.approx((0.2 + 0.1 + 0.4) / 3)
    text = (tmp_path / "comparison.md").read_text()
    assert "Paired differences to uniform" in text and "Mean over 3 seeds;" in text


def test_moving_average_and_calibration_windows_match_hand_computed_values():
    import math

    from trace_core.train.report import _thirds, smooth

    assert smooth([1, 2, 3, 4, 5], 3).tolist() == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])  # edges: fewer points
    assert smooth([1, float("nan"), 3], 3).tolist() == pytest.approx([1.0, 2.0, 3.0])  # a NaN is skipped
    assert smooth([4, 8], 1).tolist() == [4, 8]
    steps = [{"predictor/auc_mixed": v} for v in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)] + [{}]  # last step: none logged
    assert _thirds(steps, "auc_mixed") == pytest.approx([0.6, 0.85, 1.0])  # windows of 3, 2, 2 steps
    assert all(math.isnan(v) for v in _thirds(steps, "head_auc_mixed"))


def test_a_comparison_reports_the_predictors_calibration_and_the_oracles_extra_tokens(tmp_path):
    from trace_core.train.report import write_comparison

    cfg = _config(steps=3)
    plain = _history([0.1, 0.2, 0.3], 0.3)
    oracle = [
        {
            **row,
            "predictor/auc_mixed": 0.9,
            "predictor/brier": 0.1,
            "predictor/brier_constant": 0.2,
            "oracle_tokens": 500,
        }
        if "leaves" in row
        else row
        for row in _history([0.1, 0.3, 0.5], 0.5)
    ]
    summary = write_comparison({"uniform": [plain], "trace+oracle": [oracle]}, cfg, tmp_path)
    assert (
        summary["trace+oracle"]["oracle_tokens_per_step"] == 500 and summary["uniform"]["oracle_tokens_per_step"] == 0
    )
    text = (tmp_path / "comparison.md").read_text()
    assert "trace+oracle 500 tokens per step" in text
    # two training steps in three windows: the last window is empty
    assert "| trace+oracle | 0.90 / 0.90 / - | 0.50 / 0.50 / - | - / - / - | - / - / - |" in text  # skill 1 - 0.1/0.2
    assert "| uniform | 0.90" not in text and "\n| uniform | - / -" not in text  # no predictions: no row
