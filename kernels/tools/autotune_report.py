"""What Triton's autotuner chose for each kernel, so a benchmark can print it beside its times.

Which tile and loop shape wins (the tree-attention kernels' run-scanning loop vs the branching one,
tile sizes, pipeline depth) depends on the GPU and the tree, and the autotuner decides it at the
first launch of each tuning key. `format_tuned_configs()` lists, per kernel and key, the config in
use and, for the last key tuned, every candidate's time:

    print(format_tuned_configs())   # after the timed calls
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# name -> (module of trace_kernels, attribute): every autotuned kernel of the package
AUTOTUNED_KERNELS = {
    "tree_attn_fwd": ("tree_attention.triton", "_tree_attn_fwd_kernel"),
    "tree_attn_bwd_dq": ("tree_attention.triton", "_tree_attn_bwd_dq_kernel"),
    "tree_attn_bwd_dkdv": ("tree_attention.triton", "_tree_attn_bwd_dkdv_kernel"),
    "ll_row_stats": ("linear_logprob.triton", "_row_stats_kernel"),
    "ll_logit_grad": ("linear_logprob.triton", "_logit_grad_kernel"),
    "tree_decode_partial": ("tree_decode.triton", "_segment_partial_kernel"),
}


@dataclass(frozen=True)
class TunedConfig:
    kernel: str
    key: tuple | None  # the autotuner's tuning key (None: a single candidate, nothing was tuned)
    config: str
    timings_ms: tuple[tuple[str, float], ...] = ()  # every candidate's time, when this key was the last tuned


def config_label(config) -> str:
    """`BLOCK_M=128,BLOCK_N=64,RUNS=True w8 s3` for a triton.Config."""
    meta = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}"


def _kernel(module: str, attribute: str):
    return getattr(importlib.import_module(f"trace_kernels.{module}"), attribute)


def tuned_configs() -> list[TunedConfig]:
    """The configs the package's autotuned kernels run with, for every key launched so far."""
    rows = []
    for name, (module, attribute) in AUTOTUNED_KERNELS.items():
        tuner = _kernel(module, attribute)
        cache = dict(getattr(tuner, "cache", {}))
        last = getattr(tuner, "configs_timings", None) or {}
        for key, config in cache.items():
            timings = ()
            if last and config in last:  # configs_timings belongs to the last key tuned
                timings = tuple(sorted(((config_label(c), _ms(t)) for c, t in last.items()), key=lambda x: x[1]))
            rows.append(TunedConfig(name, key, config_label(config), timings))
        best = getattr(tuner, "best_config", None)
        if not cache and best is not None:  # one candidate (e.g. the interpreter's): run without tuning
            rows.append(TunedConfig(name, None, config_label(best)))
    return rows


def _ms(timing) -> float:
    """The autotuner stores do_bench's result: a float, or [median, p20, p80] with quantiles."""
    return float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def format_tuned_configs(rows: list[TunedConfig] | None = None) -> str:
    rows = tuned_configs() if rows is None else rows
    if not rows:
        return "autotuned configs: none launched yet"
    lines = ["autotuned configs (kernel | tuning key | config in use):"]
    for row in rows:
        key = "single candidate, not tuned" if row.key is None else ", ".join(map(str, row.key))
        lines.append(f"  {row.kernel} | {key} | {row.config}")
        for label, ms in row.timings_ms:
            lines.append(f"      {ms:9.4f} ms  {label}")
    return "\n".join(lines)
