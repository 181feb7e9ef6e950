"""The correctness checks a benchmark runs before it times anything (a wrong kernel is never timed)."""

import importlib.util
import sys
from pathlib import Path

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
