"""Built-in Stage-2 (prefix) strategies: continuations per anchor within each prompt (docs/method.md step 3).

Every strategy returns (N,) int64 counts in [0, k_max] summing to budget_per_group[g] over each group g, and
raises the same AllocationErrors for bad input as allocate_prefixes.
"""

from __future__ import annotations

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.checks import AllocationError
from trace_core.allocation.exact import _check_prefixes, allocate_prefixes
from trace_core.allocation.modes import register_prefix_strategy


@register_prefix_strategy("none")
class NoPrefixes:
    """No tree (GRPO, PCL): samples no continuation, so the pair's bare budget is every leaf of the step."""

    uses_predictor = False
    expands = False
    cold_start = None

    def __call__(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02, rng=None):
        p, r, group, budgets, k_max, eps = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
        if budgets.any():
            g = int(np.flatnonzero(budgets)[0])
            raise AllocationError(
                "budget_per_group",
                f"budget_per_group[{g}] = {int(budgets[g])}, but the prefix "
                "strategy 'none' expands nothing (its budget must be 0)",
            )
        return np.zeros(p.shape[0], dtype=np.int64)


@register_prefix_strategy("uniform")
class UniformPrefixes:
    """Uniform tree: each group's budget spread evenly over its anchors, the remainder one each to its first
    anchors (in input order)."""

    uses_predictor = False
    expands = True
    cold_start = None

    def __call__(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02, rng=None):
        p, r, group, budgets, k_max, _ = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
        sizes = checks.group_sizes(group, budgets.shape[0])
        rank = rank_within_group(group, budgets.shape[0])
        safe_sizes = np.maximum(sizes, 1)  # groups without anchors have budget 0 (checked)
        base, extra = budgets // safe_sizes, budgets % safe_sizes
        return base[group] + (rank < extra[group]).astype(np.int64)


@register_prefix_strategy("active")
class ActivePrefixes:
    """TRACE: exact greedy on the marginal chance of a flip q^k (1 - q) (allocate_prefixes); uniform while the
    predictor is untrained."""

    uses_predictor = True
    expands = True
    cold_start = "uniform"

    def __call__(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02, rng=None):
        return allocate_prefixes(p, r, group, budget_per_group, k_max=k_max, eps=eps)


@register_prefix_strategy("random")
class RandomPrefixes:
    """Tree-GRPO / TreePO style: in each group the budget's continuations land on anchors drawn uniformly at
    random without exceeding k_max (every placement within the caps equally likely: slots drawn without
    replacement from k_max slots per anchor). Draws from the `rng` argument."""

    uses_predictor = False
    expands = True
    cold_start = None

    def __call__(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02, rng=None):
        p, r, group, budgets, k_max, _ = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
        if not isinstance(rng, np.random.Generator):
            raise AllocationError("rng", f"the prefix strategy 'random' needs a numpy.random.Generator, got {rng!r}")
        counts = np.zeros(p.shape[0], dtype=np.int64)
        order = np.argsort(group, kind="stable")
        starts = np.concatenate(([0], np.cumsum(checks.group_sizes(group, budgets.shape[0]))))
        for g in np.flatnonzero(budgets):
            members = order[starts[g] : starts[g + 1]]
            slots_per_anchor = int(budgets[g]) if k_max is None else k_max
            slots = rng.choice(members.size * slots_per_anchor, size=int(budgets[g]), replace=False)
            counts[members] = np.bincount(slots // slots_per_anchor, minlength=members.size)
        return counts


def rank_within_group(group: np.ndarray, n_groups: int) -> np.ndarray:
    """(N,) position of each anchor among its group's anchors, in input order."""
    order = np.argsort(group, kind="stable")
    starts = np.concatenate(([0], np.cumsum(checks.group_sizes(group, n_groups))))
    rank = np.empty(group.shape[0], dtype=np.int64)
    rank[order] = np.arange(group.shape[0]) - starts[group[order]]
    return rank


__all__ = ["ActivePrefixes", "NoPrefixes", "RandomPrefixes", "UniformPrefixes", "rank_within_group"]
