"""Allocators by name (the older, one-object API), adapters over the Stage-1 / Stage-2 strategies.

New code builds an `Allocation` (trace_core.allocation.modes: a root strategy and a prefix strategy from
their registries). This module keeps the `Allocator` API working: an allocator answers both questions of a
step, `roots` and `prefixes`, with the same shapes, budgets, caps and errors as allocate_roots /
allocate_prefixes:

    allocator = get_allocator("random_tree", rng=seed)    # options go to the factory
    m = allocator.roots(v, budget, m_min=2, m_max=32)
    k = allocator.prefixes(p, r, group, m[active] * N, k_max=4)
    allocator = allocator_from_allocation(build_allocation("trace"), rng=0)   # any pair as an Allocator

Users add their own with the decorator:

    @register_allocator("mine")
    class Mine:
        def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02): ...
        def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trace_core.allocation.checks import AllocationError
from trace_core.allocation.modes import Allocation
from trace_core.allocation.prefixes import ActivePrefixes, RandomPrefixes, UniformPrefixes
from trace_core.allocation.roots import ActiveRoots, PCLRoots, UniformRoots
from trace_core.registry import Registry


@runtime_checkable
class Allocator(Protocol):
    """Interface of an allocation strategy (see the module docstring for the contract)."""

    def roots(self, v: Any, budget: int, *, m_min: int = 2, m_max: int | None = None, eps: float = 0.02) -> np.ndarray:
        """(B,) int64 counts in {0} U [m_min, m_max] summing to budget."""
        ...

    def prefixes(
        self, p: Any, r: Any, group: Any, budget_per_group: Any, *, k_max: int | None = None, eps: float = 0.02
    ) -> np.ndarray:
        """(N,) int64 counts in [0, k_max], summing to budget_per_group[g] over each group g."""
        ...


AllocatorFactory = Callable[..., Allocator]
_REGISTRY: Registry[AllocatorFactory] = Registry(
    "allocator",
    field="allocator",
    error=AllocationError,
    callable_only=True,
    unknown="unknown allocator {name!r}; registered: {names}",
)


def register_allocator(name: str, *, replace: bool = False) -> Callable[[AllocatorFactory], AllocatorFactory]:
    """Class/function decorator registering a factory under `name` (get_allocator calls it with options).

    A name already taken raises ValueError unless replace=True.
    """
    if not isinstance(name, str) or not name:
        raise AllocationError("name", f"name must be a non-empty str, got {name!r}")
    return _REGISTRY.register(name, replace=replace)


def get_allocator(name: str, **options: Any) -> Allocator:
    """A new allocator registered under `name`, built with `options` (e.g. rng=0 for random_tree)."""
    allocator = _REGISTRY.get(name)(**options)
    if not isinstance(allocator, Allocator):
        raise AllocationError(
            "allocator",
            f"allocator {name!r}: its factory returned {type(allocator).__name__}, which lacks roots()/prefixes()",
        )
    return allocator


def available_allocators() -> list[str]:
    return _REGISTRY.names()


def _as_generator(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (np.random.Generator, int, np.integer)):
        raise AllocationError("rng", f"rng must be a numpy.random.Generator or an int seed, got {rng!r}")
    return np.random.default_rng(rng)


class StagedAllocator:
    """An Allocator over an Allocation: roots() runs its root strategy, prefixes() its prefix strategy, both
    drawing from one generator (`rng`: a Generator or an int seed)."""

    def __init__(self, allocation: Allocation, rng: np.random.Generator | int = 0) -> None:
        self.allocation = allocation
        self.rng = _as_generator(rng)

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return self.allocation.root(v, budget, m_min=m_min, m_max=m_max, eps=eps, rng=self.rng)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return self.allocation.prefix(p, r, group, budget_per_group, k_max=k_max, eps=eps, rng=self.rng)


def allocator_from_allocation(allocation: Allocation, rng: np.random.Generator | int = 0) -> StagedAllocator:
    return StagedAllocator(allocation, rng)


@register_allocator("trace")
class TraceAllocator:
    """TRACE: exact root allocation (stage 1) and exact greedy prefix expansion (stage 2).

    Args:
        root_method: "ranked" (default: exact and fast) or "dp" (the method's exact DP); see
            allocate_roots.
    """

    def __init__(self, root_method: str = "ranked") -> None:
        self._roots, self._prefixes = ActiveRoots(root_method), ActivePrefixes()
        self.root_method = root_method

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return self._roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, rng=None)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return self._prefixes(p, r, group, budget_per_group, k_max=k_max, eps=eps, rng=None)


@register_allocator("uniform")
class UniformAllocator:
    """GRPO baseline: ignores the predictor; the same count for every prompt and every anchor.

    roots: as many prompts as the caps allow take the budget (the first ones in input order, i.e.
    the sampler's order), counts as equal as possible, the remainder one each to the first prompts.
    prefixes: each group's budget spread evenly over its anchors, the remainder one each to its
    first anchors (uniform tree expansion; a budget of 0 is plain GRPO without expansion).
    """

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return UniformRoots()(v, budget, m_min=m_min, m_max=m_max, eps=eps, rng=None)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return UniformPrefixes()(p, r, group, budget_per_group, k_max=k_max, eps=eps, rng=None)


@register_allocator("random_tree")
class RandomTreeAllocator:
    """Tree-GRPO / TreePO style baseline: uniform roots, continuations on uniformly random anchors.

    Args:
        rng: a numpy Generator or an int seed (required, so runs are reproducible).
    """

    def __init__(self, rng):
        self.rng = _as_generator(rng)

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return UniformRoots()(v, budget, m_min=m_min, m_max=m_max, eps=eps, rng=self.rng)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return RandomPrefixes()(p, r, group, budget_per_group, k_max=k_max, eps=eps, rng=self.rng)


@register_allocator("pcl")
class PCLAllocator:
    """PCL baseline: keep the prompts whose predicted success is nearest 0.5, a fixed count each.

    Args:
        count_per_prompt: rollouts per selected prompt (GRPO group size), within [m_min, m_max].

    roots: see PCLRoots. prefixes: PCL itself does not expand prefixes (the mode `pcl` pairs it with the
    prefix strategy `none`); with a positive budget this adapter spreads evenly like UniformAllocator.
    """

    def __init__(self, count_per_prompt: int = 8) -> None:
        self._roots = PCLRoots(count_per_prompt)
        self.count_per_prompt = self._roots.count_per_prompt

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return self._roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, rng=None)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return UniformPrefixes()(p, r, group, budget_per_group, k_max=k_max, eps=eps, rng=None)


__all__ = [
    "Allocator",
    "PCLAllocator",
    "RandomTreeAllocator",
    "StagedAllocator",
    "TraceAllocator",
    "UniformAllocator",
    "allocator_from_allocation",
    "available_allocators",
    "get_allocator",
    "register_allocator",
]
