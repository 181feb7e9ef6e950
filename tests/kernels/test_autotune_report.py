"""The autotune report benchmarks print: which config each autotuned kernel runs with."""

import importlib

import pytest
import torch
import triton

from trace_kernels import linear_logprob, tree_attention
from trace_kernels.tools.autotune_report import (
    AUTOTUNED_KERNELS,
    _kernel,
    config_label,
    format_tuned_configs,
    tuned_configs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tuner(name):
    return _kernel(*AUTOTUNED_KERNELS[name])


def test_every_autotuned_kernel_is_listed():
    for module in ("tree_attention.triton", "linear_logprob.triton", "tree_decode.triton"):
        mod = importlib.import_module(f"trace_kernels.{module}")
        tuners = {a for a, v in vars(mod).items() if isinstance(v, triton.runtime.Autotuner)}
        assert tuners == {a for m, a in AUTOTUNED_KERNELS.values() if m == module}, module


def test_report_names_the_config_each_launched_kernel_ran():
    T = 40
    end = torch.full((T,), T, dtype=torch.int32, device=DEVICE)  # one chain: every key visible below it
    q, k, v = (torch.randn(T, h, 16, device=DEVICE) for h in (2, 1, 1))
    tree_attention(q, k, v, end)
    hidden, weight = torch.randn(5, 16, device=DEVICE), torch.randn(37, 16, device=DEVICE)
    linear_logprob(hidden, weight, torch.arange(5, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE))
    rows = {row.kernel: row for row in tuned_configs()}
    for name in ("tree_attn_fwd", "ll_row_stats"):
        tuner = _tuner(name)
        used = tuner.cache.values() if tuner.cache else [tuner.best_config]
        assert rows[name].config in {config_label(c) for c in used}
    text = format_tuned_configs()
    assert "tree_attn_fwd" in text and rows["tree_attn_fwd"].config in text


def test_report_lists_the_candidates_of_the_last_tuning(monkeypatch):
    # the autotuner's own state after a multi-config tuning (needs a GPU to produce): set it by hand
    tuner = _tuner("tree_attn_fwd")
    fast = triton.Config({"BLOCK_M": 128, "RUNS": True}, num_warps=8, num_stages=3)
    slow = triton.Config({"BLOCK_M": 128, "RUNS": False}, num_warps=8, num_stages=3)
    monkeypatch.setattr(tuner, "cache", {(128, 4, "torch.bfloat16"): fast})
    monkeypatch.setattr(tuner, "configs_timings", {slow: [0.9, 0.8, 1.0], fast: [0.5, 0.4, 0.6]}, raising=False)
    row = next(r for r in tuned_configs() if r.kernel == "tree_attn_fwd")
    assert row.key == (128, 4, "torch.bfloat16") and row.config == "BLOCK_M=128,RUNS=True w8 s3"
    assert row.timings_ms == (("BLOCK_M=128,RUNS=True w8 s3", 0.5), ("BLOCK_M=128,RUNS=False w8 s3", 0.9))
    text = format_tuned_configs([row])
    assert "128, 4, torch.bfloat16 | BLOCK_M=128,RUNS=True w8 s3" in text
    assert "0.9000 ms  BLOCK_M=128,RUNS=False" in text


@pytest.mark.parametrize("timing, expected", [(0.25, 0.25), ([0.5, 0.4, 0.6], 0.5)])
def test_timings_in_either_autotuner_format(timing, expected, monkeypatch):
    tuner = _tuner("ll_row_stats")
    cfg = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)
    monkeypatch.setattr(tuner, "cache", {(576, 49152): cfg})
    monkeypatch.setattr(tuner, "configs_timings", {cfg: timing}, raising=False)
    row = next(r for r in tuned_configs() if r.kernel == "ll_row_stats")
    assert row.timings_ms == (("BLOCK_M=64 w4 s3", expected),)
