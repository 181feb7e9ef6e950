"""The correctness checks a benchmark runs before it times anything (a wrong kernel is never timed)."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trace_kernels import linear_logprob_reference

BENCH = Path(__file__).parents[1] / "bench"


def load_bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_linear_logprob_bench_refuses_a_wrong_op(monkeypatch):
    bench = load_bench("bench_linear_logprob")
    hidden, weight, labels = bench.make_inputs(32, 300, 20, "cpu", torch.float32)
    fused_err, eager_err = bench.check_fused(hidden, weight, labels, backend="cpu")
    assert fused_err < 1e-4 and eager_err < 1e-4
    # a kernel that gathers the wrong label: off by O(1), so the bench stops before timing it
    monkeypatch.setattr(
        bench,
        "linear_logprob",
        lambda h, w, rows, lab, **kw: linear_logprob_reference(h, w, rows, (lab + 1) % w.shape[0]),
    )
    with pytest.raises(AssertionError, match="linear_logprob is wrong"):
        bench.check_fused(hidden, weight, labels)


def test_predictor_bench_replays_the_trainers_own_predictions(tmp_path):
    """Replaying a recorded run with the run's own predictor config gives, step by step, the Brier scores the
    trainer logged: the bench scores variants on exactly the trainer's protocol (predict, then learn)."""
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    from run_helpers import TOY

    bench = load_bench("bench_predictor")
    steps, hidden_size, rows = bench.record([*TOY, "predictor.warmup_nodes=0"], seed=0, steps=5, with_metrics=True)
    logged = [row["predictor/brier"] for row in rows if "predictor/brier" in row]
    assert len(steps) == len(logged) == 5
    config = bench.load_config(bench.TrainConfig, overrides=[*TOY, "predictor.warmup_nodes=0"]).predictor
    scores = bench.replay(steps, bench.MLPHeadPredictor(hidden_size, config))
    np.testing.assert_allclose(scores[:, 0], logged, rtol=1e-6)
    other = bench.replay(steps, bench.MLPHeadPredictor(hidden_size, dataclasses.replace(config, ngram_buckets=0)))
    assert not np.allclose(other[:, 0], logged)  # a different head scores differently on the same nodes
    np.testing.assert_allclose(other[:, 1], scores[:, 1])  # against the same constant
