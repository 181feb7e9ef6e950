"""Rollout budget allocation (docs/method.md steps 1 and 3): the public API.

- allocate_roots: stage 1, bare rollouts per candidate prompt (exact, numba: the fast "ranked"
  solver by default, method="dp" for the method's DP, its test oracle).
- allocate_prefixes: stage 2, continuations per turn prefix within each prompt (exact greedy, numba).
- Allocation, build_allocation: a mode is a pair of strategies (Stage 1 root strategy, Stage 2 prefix
  strategy) from two registries (register_root_strategy, register_prefix_strategy, register_mode):
  "trace" = active/active, "uniform" = uniform/none (GRPO), "random_tree" = uniform/random (Tree-GRPO /
  TreePO style random anchors), "pcl" = pcl/none (prompts nearest p = 0.5, fixed count each), and your own.
  See trace_core.allocation.modes.
- Allocator, register_allocator, get_allocator, available_allocators: the older one-object API (an
  allocator answers both stages), kept working; StagedAllocator adapts any Allocation to it.
- AllocationError: bad input (a ValueError whose `field` names the argument).
- Objective helpers: what an allocation is expected to buy, and the effective ratio it implies.

Pure-Python versions of both stages (test oracle, benchmark baseline) are in
trace_core.allocation.naive.
"""

from trace_core.allocation import prefixes as _prefixes  # noqa: F401  (registers the built-in strategies)
from trace_core.allocation import roots as _roots  # noqa: F401
from trace_core.allocation.checks import AllocationError
from trace_core.allocation.exact import allocate_prefixes, allocate_roots
from trace_core.allocation.modes import (
    MODES,
    PREFIX_STRATEGIES,
    ROOT_STRATEGIES,
    Allocation,
    PrefixStrategy,
    RootStrategy,
    available_modes,
    available_prefix_strategies,
    available_root_strategies,
    build_allocation,
    register_mode,
    register_prefix_strategy,
    register_root_strategy,
)
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
    StagedAllocator,
    TraceAllocator,
    UniformAllocator,
    allocator_from_allocation,
    available_allocators,
    get_allocator,
    register_allocator,
)

__all__ = [
    "MODES",
    "PREFIX_STRATEGIES",
    "ROOT_STRATEGIES",
    "Allocation",
    "AllocationError",
    "Allocator",
    "PCLAllocator",
    "PrefixStrategy",
    "RandomTreeAllocator",
    "RootStrategy",
    "StagedAllocator",
    "TraceAllocator",
    "UniformAllocator",
    "allocate_prefixes",
    "allocate_roots",
    "allocator_from_allocation",
    "available_allocators",
    "available_modes",
    "available_prefix_strategies",
    "available_root_strategies",
    "build_allocation",
    "expected_prefix_objective",
    "expected_root_objective",
    "get_allocator",
    "register_allocator",
    "register_mode",
    "register_prefix_strategy",
    "register_root_strategy",
    "root_effective_ratio_estimate",
    "root_mixed_probability",
    "tree_effective_ratio_estimate",
    "tree_mixed_probability",
]
