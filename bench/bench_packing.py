"""Benchmark: pack a TRACE-shaped rollout forest (~1M tokens, ~50k turn nodes).

Compares the numba packer (`trace_core.packing.forest.pack`) with the plain-Python packer
(`pack_reference`, same algorithm) in the same run and checks they agree. Both include forest
validation. Aim (2-core machine): under 1 s and at least 20x faster than plain Python.

    python bench/bench_packing.py [--prompts 512] [--repeats 5]
    pytest bench/bench_packing.py            # pytest-benchmark version (smaller forest)
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from trace_core.packing.forest import pack, pack_reference
from trace_core.synthetic_forest import synthetic_forest


def make_forest(num_prompts: int, seed: int = 0):
    # 8 bare rollouts of 6 turns + 16 continuations per prompt ~= 105 nodes and ~2k tokens per prompt
    return synthetic_forest(
        np.random.default_rng(seed),
        num_prompts=num_prompts,
        rollouts=8,
        turns=6,
        continuations=16,
        prompt_tokens=(32, 96),
        model_tokens=(2, 24),
        observation_tokens=(0, 16),
    )


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def device() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=512, help="trees in the forest (default 512: ~1M tokens)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the numba packer (best is kept)")
    args = parser.parse_args()

    forest = make_forest(args.prompts)
    print(
        f"forest: {forest.roots.size} prompts, {forest.num_nodes} nodes, {forest.leaves.size} leaves, "
        f"{forest.num_tokens} tokens; device: {device()}; path: numba (no kernels involved)"
    )

    start = time.perf_counter()
    packed = pack(forest)  # first call: numba loads or compiles its cached machine code
    first_call = time.perf_counter() - start
    fast = best_of(lambda: pack(forest), args.repeats)
    slow = best_of(lambda: pack_reference(forest), 1)
    assert packed.equals(pack_reference(forest)), "numba and plain-Python packers disagree"

    rows = [
        ("plain Python (pack_reference)", slow, 1.0),
        (f"numba (pack), best of {args.repeats}", fast, slow / fast),
    ]
    print(f"\n{'packer':<34}{'time [s]':>10}{'speed-up':>10}")
    for name, seconds, ratio in rows:
        print(f"{name:<34}{seconds:>10.3f}{ratio:>9.1f}x")
    print(f"(numba first call incl. compile/cache load: {first_call:.2f} s)")
    dedup = packed.num_leaf_path_tokens / packed.num_tokens
    print(
        f"packed tokens {packed.num_tokens} vs leaf-path tokens {packed.num_leaf_path_tokens} "
        f"(a per-leaf trainer would run {dedup:.2f}x as many)"
    )
    target = fast < 1.0 and slow / fast >= 20
    print(f"target (< 1 s and >= 20x): {'met' if target else 'NOT met'}")


# ---------------------------------------------------------------------- pytest-benchmark
def test_bench_pack_numba(benchmark):
    forest = make_forest(64)
    pack(forest)
    benchmark(pack, forest)


def test_bench_pack_plain_python(benchmark):
    forest = make_forest(64)
    benchmark.pedantic(pack_reference, args=(forest,), rounds=2, iterations=1)


if __name__ == "__main__":
    main()
