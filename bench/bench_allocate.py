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
compilation excluded), as wall time and as process CPU time (on a shared machine wall time also
counts waiting for a core); speedups are wall over wall. Both paths run on the CPU; numba runs
single-threaded. Aims (issue 5, on a 2-core machine): root DP under 50 ms, prefix stage under
20 ms, and at least 50x faster than pure Python.

The prefix stage's pure-Python baseline is the same greedy with heapq (a C heap), so its heap
operations already run at C speed; most of the numba path's remaining time is the heap work itself.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trace_core.allocation import allocate_prefixes, allocate_roots
from trace_core.allocation.naive import allocate_prefixes_reference, allocate_roots_reference

# the root DP rows time method="dp" (the default is the faster "ranked" solver, its own row)
allocate_roots_dp = functools.partial(allocate_roots, method="dp")

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


def best_seconds(fn, args, kwargs, repeats: int) -> tuple[float, float]:
    """(wall, process CPU) seconds, each the best of `repeats` calls after a warm-up call."""
    fn(*args, **kwargs)  # warm-up: numba compilation / cache load is not part of the timing
    wall = cpu = float("inf")
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        fn(*args, **kwargs)
        wall = min(wall, time.perf_counter() - start_wall)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def device() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU, {os.cpu_count()} cores ({model})"


def run(full_reference: bool = False) -> list[tuple]:
    """Rows of (stage, size, numba wall s, numba cpu s, baseline name, baseline wall s or None, aim)."""
    rows = []
    args, kwargs = root_case(**ROOT_FULL)
    dp_wall, dp_cpu = best_seconds(allocate_roots_dp, args, kwargs, 9)
    rows.append(
        (
            "roots dp",
            _size(ROOT_FULL),
            dp_wall,
            dp_cpu,
            "pure Python",
            _once(allocate_roots_reference, args, kwargs) if full_reference else None,
            0.050,
        )
    )
    # method="ranked" is exact too (same optimum); its baseline is the numba DP measured just above.
    rows.append(
        (
            "roots ranked",
            _size(ROOT_FULL),
            *best_seconds(allocate_roots, args, dict(kwargs, method="ranked"), 20),
            "numba dp",
            dp_wall,
            None,
        )
    )
    args, kwargs = root_case(**ROOT_SMALL)
    rows.append(
        (
            "roots dp",
            _size(ROOT_SMALL),
            *best_seconds(allocate_roots_dp, args, kwargs, 20),
            "pure Python",
            best_seconds(allocate_roots_reference, args, kwargs, 2)[0],
            None,
        )
    )
    args, kwargs = prefix_case(**PREFIX)
    rows.append(
        (
            "prefixes",
            _size(PREFIX),
            *best_seconds(allocate_prefixes, args, kwargs, 30),
            "pure Python",
            best_seconds(allocate_prefixes_reference, args, kwargs, 3)[0],
            0.020,
        )
    )
    return rows


def _once(fn, args, kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _size(case: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in case.items())


def print_table(rows) -> None:
    load = ""
    try:
        with open("/proc/loadavg") as f:
            load = "; /proc/loadavg " + " ".join(f.read().split()[:3])
    except OSError:
        pass
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device: {device()}{load}")
    print(
        "numba path: njit, single thread; best of several runs; speedup = baseline wall / numba wall;"
        " aims: time on 2 cores, and >= 50x pure Python"
    )
    print(
        f"{'stage':<13} {'size':<46} {'wall ms':>8} {'cpu ms':>8} {'baseline':>12} {'base ms':>9} {'speedup':>8}  aim"
    )
    for stage, size, wall, cpu, baseline, slow, aim in rows:
        slow_text = f"{slow * 1e3:9.1f}" if slow is not None else f"{'not run':>9}"
        ratio_text = f"{slow / wall:7.0f}x" if slow is not None else f"{'-':>8}"
        aims = []
        if aim is not None:
            aims.append(f"< {aim * 1e3:.0f} ms: {'met' if wall < aim else 'missed'}")
        if baseline == "pure Python" and slow is not None:
            aims.append(f">= 50x: {'met' if slow / wall >= 50 else 'missed'}")
        print(
            f"{stage:<13} {size:<46} {wall * 1e3:8.2f} {cpu * 1e3:8.2f} {baseline:>12} {slow_text} {ratio_text}  {'; '.join(aims)}"
        )


# ---------------------------------------------------------------- pytest-benchmark entry points


def test_roots_numba_full_size(benchmark):
    args, kwargs = root_case(**ROOT_FULL)
    allocate_roots_dp(*args, **kwargs)
    counts = benchmark(allocate_roots_dp, *args, **kwargs)
    assert counts.sum() == ROOT_FULL["budget"]


def test_roots_numba_ranked_full_size(benchmark):
    args, kwargs = root_case(**ROOT_FULL)
    kwargs = dict(kwargs, method="ranked")
    allocate_roots(*args, **kwargs)
    counts = benchmark(allocate_roots, *args, **kwargs)
    assert counts.sum() == ROOT_FULL["budget"]


def test_roots_numba_small(benchmark):
    args, kwargs = root_case(**ROOT_SMALL)
    allocate_roots_dp(*args, **kwargs)
    benchmark(allocate_roots_dp, *args, **kwargs)


def test_roots_python_small(benchmark):
    args, kwargs = root_case(**ROOT_SMALL)
    counts = benchmark.pedantic(allocate_roots_reference, args=args, kwargs=kwargs, rounds=2, iterations=1)
    assert np.array_equal(counts, allocate_roots_dp(*args, **kwargs))


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
