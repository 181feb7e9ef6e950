"""Allocation strategies selectable by name: TRACE and the baselines it is compared with.

An allocator answers the two questions of a training step (METHOD.md steps 1 and 3): how many bare
rollouts each candidate prompt gets (`roots`), and how many continuations each turn prefix gets
(`prefixes`). Every allocator returns the same shapes, spends budgets exactly, respects the same
caps and raises the same ValueErrors for bad input as trace_core.allocation.allocate_roots /
allocate_prefixes, so a trainer can swap them by name:

    allocator = get_allocator("random_tree", rng=seed)    # options go to the factory
    m = allocator.roots(v, budget, m_min=2, m_max=32)
    k = allocator.prefixes(p, r, group, m[active] * N, k_max=4)

Users add their own with the decorator:

    @register_allocator("mine")
    class Mine:
        def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02): ...
        def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02): ...
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.exact import ROOT_METHODS, _check_prefixes, _check_roots, allocate_prefixes, allocate_roots


@runtime_checkable
class Allocator(Protocol):
    """Interface of an allocation strategy (see the module docstring for the contract)."""

    def roots(self, v, budget: int, *, m_min: int = 2, m_max: int | None = None, eps: float = 0.02) -> np.ndarray:
        """(B,) int64 counts in {0} U [m_min, m_max] summing to budget."""
        ...

    def prefixes(self, p, r, group, budget_per_group, *, k_max: int | None = None, eps: float = 0.02) -> np.ndarray:
        """(N,) int64 counts in [0, k_max], summing to budget_per_group[g] over each group g."""
        ...


AllocatorFactory = Callable[..., Allocator]
_REGISTRY: dict[str, AllocatorFactory] = {}


def register_allocator(name: str, *, replace: bool = False) -> Callable[[AllocatorFactory], AllocatorFactory]:
    """Class/function decorator registering a factory under `name` (get_allocator calls it with options).

    A name already taken raises ValueError unless replace=True.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def decorator(factory: AllocatorFactory) -> AllocatorFactory:
        if not callable(factory):
            raise ValueError(f"allocator {name!r}: the registered object must be callable (a class or factory)")
        if name in _REGISTRY and not replace:
            raise ValueError(f"an allocator named {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = factory
        return factory

    return decorator


def get_allocator(name: str, **options) -> Allocator:
    """A new allocator registered under `name`, built with `options` (e.g. rng=0 for random_tree)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown allocator {name!r}; registered: {', '.join(available_allocators())}")
    allocator = _REGISTRY[name](**options)
    if not isinstance(allocator, Allocator):
        raise ValueError(f"allocator {name!r}: its factory returned {type(allocator).__name__}, which lacks roots()/prefixes()")
    return allocator


def available_allocators() -> list[str]:
    return sorted(_REGISTRY)


@register_allocator("trace")
class TraceAllocator:
    """TRACE: exact root allocation (stage 1) and exact greedy prefix expansion (stage 2).

    Args:
        root_method: "dp" (the method's exact DP) or "ranked" (equally exact, much faster); see
            allocate_roots.
    """

    def __init__(self, root_method: str = "dp"):
        if root_method not in ROOT_METHODS:
            raise ValueError(f"root_method must be one of {ROOT_METHODS}, got {root_method!r}")
        self.root_method = root_method

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return allocate_roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, method=self.root_method)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return allocate_prefixes(p, r, group, budget_per_group, k_max=k_max, eps=eps)


@register_allocator("uniform")
class UniformAllocator:
    """GRPO baseline: ignores the predictor; the same count for every prompt and every anchor.

    roots: as many prompts as the caps allow take the budget (the first ones in input order, i.e.
    the sampler's order), counts as equal as possible, the remainder one each to the first prompts.
    prefixes: each group's budget spread evenly over its anchors, the remainder one each to its
    first anchors (uniform tree expansion; a budget of 0 is plain GRPO without expansion).
    """

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        v, budget, m_min, m_max, _ = _check_roots(v, budget, m_min, m_max, eps)
        counts = np.zeros(v.shape[0], dtype=np.int64)
        if budget == 0:
            return counts
        # The most prompts k with k * m_min <= budget <= k * cap (feasibility is already checked).
        active = min(v.shape[0], budget // m_min)
        _spread_evenly(counts[:active], budget)
        return counts

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        p, r, group, budgets, k_max, _ = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
        sizes = checks.group_sizes(group, budgets.shape[0])
        rank = _rank_within_group(group, budgets.shape[0])
        safe_sizes = np.maximum(sizes, 1)  # groups without anchors have budget 0 (checked)
        base, extra = budgets // safe_sizes, budgets % safe_sizes
        return base[group] + (rank < extra[group]).astype(np.int64)


@register_allocator("random_tree")
class RandomTreeAllocator:
    """Tree-GRPO / TreePO style baseline: uniform roots, continuations on uniformly random anchors.

    Args:
        rng: a numpy Generator or an int seed (required, so runs are reproducible).

    roots: as UniformAllocator. prefixes: in each group, the budget's continuations land on
    anchors drawn uniformly at random without exceeding k_max (every way of placing them within the
    caps is equally likely: slots drawn without replacement from k_max slots per anchor).
    """

    def __init__(self, rng):
        if isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (np.random.Generator, int, np.integer)):
            raise ValueError(f"rng must be a numpy.random.Generator or an int seed, got {rng!r}")
        self.rng = np.random.default_rng(rng)

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        return UniformAllocator().roots(v, budget, m_min=m_min, m_max=m_max, eps=eps)

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        p, r, group, budgets, k_max, _ = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
        counts = np.zeros(p.shape[0], dtype=np.int64)
        order = np.argsort(group, kind="stable")
        starts = np.concatenate(([0], np.cumsum(checks.group_sizes(group, budgets.shape[0]))))
        for g in np.flatnonzero(budgets):
            members = order[starts[g]:starts[g + 1]]
            slots_per_anchor = int(budgets[g]) if k_max is None else k_max
            slots = self.rng.choice(members.size * slots_per_anchor, size=int(budgets[g]), replace=False)
            counts[members] = np.bincount(slots // slots_per_anchor, minlength=members.size)
        return counts


@register_allocator("pcl")
class PCLAllocator:
    """PCL baseline: keep the prompts whose predicted success is nearest 0.5, a fixed count each.

    Args:
        count_per_prompt: rollouts per selected prompt (GRPO group size), within [m_min, m_max].

    roots: budget // count_per_prompt prompts, nearest to 0.5 first (ties: input order), each
    get count_per_prompt; the leftover budget % count_per_prompt goes one by one to the selected
    prompts in the same order, so the budget is spent exactly. prefixes: PCL itself does not expand
    prefixes (give it budget 0); with a positive budget it spreads evenly like UniformAllocator.
    """

    def __init__(self, count_per_prompt: int = 8):
        self.count_per_prompt = checks.as_count(count_per_prompt, "count_per_prompt", minimum=1)

    def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
        v, budget, m_min, m_max, eps = _check_roots(v, budget, m_min, m_max, eps)
        c = self.count_per_prompt
        cap = checks.effective_root_cap(budget, m_max)
        counts = np.zeros(v.shape[0], dtype=np.int64)
        if budget == 0:
            return counts
        selected = budget // c
        if selected == 0:
            raise ValueError(f"pcl: budget={budget} is below count_per_prompt={c}; not even one prompt can be kept")
        if not (m_min <= c <= cap):
            raise ValueError(f"count_per_prompt={c} must lie in [m_min={m_min}, {cap}] (cap = min(m_max, budget))")
        if selected > v.shape[0]:
            raise ValueError(
                f"pcl: budget={budget} with count_per_prompt={c} needs {selected} prompts but v has only"
                f" {v.shape[0]}; raise count_per_prompt or the candidate pool"
            )
        nearest = np.argsort(np.abs(checks.clipped(v, eps) - 0.5), kind="stable")[:selected]
        chosen = np.full(selected, c, dtype=np.int64)
        _spread_evenly(chosen, budget - selected * c, add=True)
        if chosen.max() > cap:
            raise ValueError(
                f"pcl: spending budget={budget} on {selected} prompts needs {int(chosen.max())} rollouts for"
                f" some prompt, above the cap {cap}; choose a budget divisible by count_per_prompt={c}"
            )
        counts[nearest] = chosen
        return counts

    def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
        return UniformAllocator().prefixes(p, r, group, budget_per_group, k_max=k_max, eps=eps)


def _spread_evenly(out: np.ndarray, total: int, *, add: bool = False) -> None:
    """Write (or add) total split as evenly as possible over out, remainder to the first entries."""
    base, extra = divmod(total, out.size)
    share = np.full(out.size, base, dtype=np.int64)
    share[:extra] += 1
    if add:
        out += share
    else:
        out[:] = share


def _rank_within_group(group: np.ndarray, n_groups: int) -> np.ndarray:
    """(N,) position of each anchor among its group's anchors, in input order."""
    order = np.argsort(group, kind="stable")
    starts = np.concatenate(([0], np.cumsum(checks.group_sizes(group, n_groups))))
    rank = np.empty(group.shape[0], dtype=np.int64)
    rank[order] = np.arange(group.shape[0]) - starts[group[order]]
    return rank
