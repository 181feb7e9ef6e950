"""Benchmark of rollout allocation: numba solvers vs their pure-Python twins, measured in the same run.

    python bench/bench_allocate.py                  # table (pure-Python root DP at a smaller size)
    python bench/bench_allocate.py --full-reference # also time the pure-Python root DP at full size once
    pytest bench/bench_allocate.py                  # the same cases as pytest-benchmark tests

Sizes (issue 5): root stage B = 1024 candidate prompts, budget 8192, m_max = 32; prefix stage
100k anchors in 1024 groups, 16 continuations per group (8 bare rollouts per prompt, N = 2).
The pure-Python root DP is O(B * budget * m_max) interpreted loops (about 240M steps at full size,
tens of seconds), so by default both root solvers are also timed on B = 128, budget 1024,
m_max = 32 and the speed ratio is reported at that size; the full-size row has no Python baseline
unless --full-reference is given. Times are the best of several runs after a warm-up call (numba
compilation excluded). Both paths run on the CPU; numba runs single-threaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trace_core.allocate import allocate_prefixes, allocate_roots  # noqa: E402
from trace_core.allocation.reference import allocate_prefixes_reference, allocate_roots_reference  # noqa: E402

ROOT_FULL = dict(n_prompts=1024, budget=8192, m_max=32)
ROOT_SMALL = dict(n_prompts=128, budget=1024, m_max=32)
PREFIX = dict(n_anchors=100_000, n_groups=1024, per_group=16)


def root_case(n_prompts: int, budget: int, m_max: int, seed: int = 0):
    v = np.random.default_rng(seed).random(n_prompts)
    return (v, budget), dict(m_max=m_max)


def prefix_case(n_anchors: int, n_groups: int, per_group: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    p = rng.random(n_anchors)
    r = rng.integers(0, 2, n_anchors)
    group = rng.integers(0, n_groups, n_anchors)
    return (p, r, group, np.full(n_groups, per_group)), {}


def best_seconds(fn, args, kwargs, repeats: int, clock=time.perf_counter) -> float:
    fn(*args, **kwargs)  # warm-up: numba compilation / cache load is not part of the timing
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn(*args, **kwargs)
        best = min(best, clock() - start)
    return best


def device() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU, {os.cpu_count()} cores ({model})"


def run(full_reference: bool = False) -> list[tuple[str, str, float, str, float | None]]:
    """Rows of (stage, size, numba seconds, baseline name, baseline seconds or None)."""
    rows = []
    args, kwargs = root_case(**ROOT_FULL)
    dp_seconds = best_seconds(allocate_roots, args, kwargs, 7)
    rows.append(("roots dp", _size(ROOT_FULL), dp_seconds, "pure Python",
                 _once(allocate_roots_reference, args, kwargs) if full_reference else None))
    # Process CPU time of the DP too: on a shared machine wall time also counts waiting for a core.
    rows.append(("roots dp cpu", _size(ROOT_FULL), best_seconds(allocate_roots, args, kwargs, 7, time.process_time),
                 "-", None))
    # method="ranked" is exact too (same optimum); its baseline is the numba DP measured just above.
    rows.append(("roots ranked", _size(ROOT_FULL), best_seconds(allocate_roots, args, dict(kwargs, method="ranked"), 20),
                 "numba dp", dp_seconds))
    args, kwargs = root_case(**ROOT_SMALL)
    rows.append(("roots dp", _size(ROOT_SMALL), best_seconds(allocate_roots, args, kwargs, 20), "pure Python",
                 best_seconds(allocate_roots_reference, args, kwargs, 2)))
    args, kwargs = prefix_case(**PREFIX)
    rows.append(("prefixes", _size(PREFIX), best_seconds(allocate_prefixes, args, kwargs, 20), "pure Python",
                 best_seconds(allocate_prefixes_reference, args, kwargs, 3)))
    return rows


def _once(fn, args, kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _size(case: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


def print_table(rows) -> None:
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {device()}{load}; numba path: njit, single thread; wall times except the cpu row (process CPU time), best of several runs")
    print(f"{'stage':<13} {'size':<46} {'numba ms':>9} {'baseline':>12} {'base ms':>9} {'speedup':>8}")
    for stage, size, fast, baseline, slow in rows:
        slow_text = f"{slow * 1e3:9.1f}" if slow is not None else f"{'-' if baseline == '-' else 'not run':>9}"
        ratio_text = f"{slow / fast:7.0f}x" if slow is not None else f"{'-':>8}"
        print(f"{stage:<13} {size:<46} {fast * 1e3:9.2f} {baseline:>12} {slow_text} {ratio_text}")


# ---------------------------------------------------------------- pytest-benchmark entry points

def test_roots_numba_full_size(benchmark):
    args, kwargs = root_case(**ROOT_FULL)
    allocate_roots(*args, **kwargs)
    counts = benchmark(allocate_roots, *args, **kwargs)
    assert counts.sum() == ROOT_FULL["budget"]


def test_roots_numba_ranked_full_size(benchmark):
    args, kwargs = root_case(**ROOT_FULL)
    kwargs = dict(kwargs, method="ranked")
    allocate_roots(*args, **kwargs)
    counts = benchmark(allocate_roots, *args, **kwargs)
    assert counts.sum() == ROOT_FULL["budget"]


def test_roots_numba_small(benchmark):
    args, kwargs = root_case(**ROOT_SMALL)
    allocate_roots(*args, **kwargs)
    benchmark(allocate_roots, *args, **kwargs)


def test_roots_python_small(benchmark):
    args, kwargs = root_case(**ROOT_SMALL)
    counts = benchmark.pedantic(allocate_roots_reference, args=args, kwargs=kwargs, rounds=2, iterations=1)
    assert np.array_equal(counts, allocate_roots(*args, **kwargs))


def test_prefixes_numba(benchmark):
    args, kwargs = prefix_case(**PREFIX)
    allocate_prefixes(*args, **kwargs)
    counts = benchmark(allocate_prefixes, *args, **kwargs)
    assert counts.sum() == PREFIX["n_groups"] * PREFIX["per_group"]


def test_prefixes_python(benchmark):
    args, kwargs = prefix_case(**PREFIX)
    counts = benchmark.pedantic(allocate_prefixes_reference, args=args, kwargs=kwargs, rounds=3, iterations=1)
    assert np.array_equal(counts, allocate_prefixes(*args, **kwargs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-reference", action="store_true", help="time the pure-Python root DP at full size once")
    print_table(run(full_reference=parser.parse_args().full_reference))
