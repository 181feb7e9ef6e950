"""Rollout budget allocation (METHOD.md steps 1 and 3): the public API.

- allocate_roots: stage 1, bare rollouts per candidate prompt (exact DP, numba; method="ranked"
  is an equally exact, much faster solver).
- allocate_prefixes: stage 2, continuations per turn prefix within each prompt (exact greedy, numba).
- Allocator, register_allocator, get_allocator, available_allocators: strategies by name:
  "trace" (the two stages above), "uniform" (GRPO / uniform tree), "random_tree" (Tree-GRPO /
  TreePO style random anchors), "pcl" (prompts nearest p = 0.5, fixed count each), and your own.
- Objective helpers: what an allocation is expected to buy, and the effective ratio it implies.

Pure-Python versions of both stages (test oracle, benchmark baseline) are in
trace_core.allocation.naive.
"""
from trace_core.allocation.exact import allocate_prefixes, allocate_roots
from trace_core.allocation.objective import (
    expected_prefix_objective,
    expected_root_objective,
    root_effective_ratio_estimate,
    root_mixed_probability,
    tree_effective_ratio_estimate,
    tree_mixed_probability,
)
from trace_core.allocation.strategies import (
    Allocator,
    PCLAllocator,
    RandomTreeAllocator,
    TraceAllocator,
    UniformAllocator,
    available_allocators,
    get_allocator,
    register_allocator,
)

__all__ = [
    "Allocator",
    "PCLAllocator",
    "RandomTreeAllocator",
    "TraceAllocator",
    "UniformAllocator",
    "allocate_prefixes",
    "allocate_roots",
    "available_allocators",
    "expected_prefix_objective",
    "expected_root_objective",
    "get_allocator",
    "register_allocator",
    "root_effective_ratio_estimate",
    "root_mixed_probability",
    "tree_effective_ratio_estimate",
    "tree_mixed_probability",
]
