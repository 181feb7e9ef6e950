"""Built-in Stage-1 (root) strategies: bare rollouts per candidate prompt (docs/method.md step 1).

Every strategy returns (B,) int64 counts in {0} U [m_min, m_max] summing to the budget exactly, and raises
the same AllocationErrors for bad input as allocate_roots.
"""

from __future__ import annotations

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.checks import AllocationError
from trace_core.allocation.exact import ROOT_METHODS, _check_roots, allocate_roots
from trace_core.allocation.modes import register_root_strategy


@register_root_strategy("uniform")
class UniformRoots:
    """GRPO: ignores the predictor. As many prompts as the caps allow take the budget (the first ones in input
    order, i.e. the sampler's order), counts as equal as possible, the remainder one each to the first prompts."""

    uses_predictor = False
    cold_start = None

    def __call__(self, v, budget, *, m_min=2, m_max=None, eps=0.02, rng=None):
        v, budget, m_min, m_max, _ = _check_roots(v, budget, m_min, m_max, eps)
        counts = np.zeros(v.shape[0], dtype=np.int64)
        if budget == 0:
            return counts
        # The most prompts k with k * m_min <= budget <= k * cap (feasibility is already checked).
        active = min(v.shape[0], budget // m_min)
        spread_evenly(counts[:active], budget)
        return counts


@register_root_strategy("active")
class ActiveRoots:
    """TRACE: the exact solver of sum_i 1 - v_i^m_i - (1 - v_i)^m_i (allocate_roots); uniform while the
    predictor is untrained.

    Args:
        root_method: "ranked" (default: exact and fast) or "dp" (the method's exact DP); see allocate_roots.
    """

    uses_predictor = True
    cold_start = "uniform"

    def __init__(self, root_method: str = "ranked") -> None:
        if root_method not in ROOT_METHODS:
            raise AllocationError("root_method", f"root_method must be one of {ROOT_METHODS}, got {root_method!r}")
        self.root_method = root_method

    def __call__(self, v, budget, *, m_min=2, m_max=None, eps=0.02, rng=None):
        return allocate_roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, method=self.root_method)


@register_root_strategy("pcl")
class PCLRoots:
    """PCL: keep the budget // count_per_prompt prompts whose predicted success is nearest 0.5 (ties: input
    order), count_per_prompt rollouts each; the leftover budget % count_per_prompt goes one by one to the kept
    prompts in the same order, so the budget is spent exactly. No cold-start strategy: before the predictor is
    ready every v is 0.5 and the first prompts are kept.

    Args:
        count_per_prompt: rollouts per kept prompt (GRPO group size), within [m_min, m_max]
            (config: allocation.pcl_count).
    """

    uses_predictor = True
    cold_start = None

    def __init__(self, count_per_prompt: int = 8) -> None:
        self.count_per_prompt = checks.as_count(count_per_prompt, "count_per_prompt", minimum=1)

    def __call__(self, v, budget, *, m_min=2, m_max=None, eps=0.02, rng=None):
        v, budget, m_min, m_max, eps = _check_roots(v, budget, m_min, m_max, eps)
        c = self.count_per_prompt
        cap = checks.effective_root_cap(budget, m_max)
        counts = np.zeros(v.shape[0], dtype=np.int64)
        if budget == 0:
            return counts
        selected = budget // c
        if selected == 0:
            raise AllocationError(
                "count_per_prompt",
                f"pcl: budget={budget} is below count_per_prompt={c}; not even one prompt can be kept",
            )
        if not (m_min <= c <= cap):
            raise AllocationError(
                "count_per_prompt",
                f"count_per_prompt={c} must lie in [m_min={m_min}, {cap}] (cap = min(m_max, budget))",
            )
        if selected > v.shape[0]:
            raise AllocationError(
                "count_per_prompt",
                f"pcl: budget={budget} with count_per_prompt={c} needs "
                f"{selected} prompts but v has only {v.shape[0]}; raise "
                "count_per_prompt or the candidate pool",
            )
        nearest = np.argsort(np.abs(checks.clipped(v, eps) - 0.5), kind="stable")[:selected]
        chosen = np.full(selected, c, dtype=np.int64)
        spread_evenly(chosen, budget - selected * c, add=True)
        if chosen.max() > cap:
            raise AllocationError(
                "count_per_prompt",
                f"pcl: spending budget={budget} on {selected} prompts needs "
                f"{int(chosen.max())} rollouts for some prompt, above the cap "
                f"{cap}; choose a budget divisible by count_per_prompt={c}",
            )
        counts[nearest] = chosen
        return counts

    def check_budget(self, n_prompts: int, budget: int, *, m_min: int, m_max: int | None, eps: float) -> None:
        """Raise the error a step would raise (checked when the config is built, not at the first step)."""
        self(np.full(n_prompts, 0.5), budget, m_min=m_min, m_max=m_max, eps=eps)


def spread_evenly(out: np.ndarray, total: int, *, add: bool = False) -> None:
    """Write (or add) total split as evenly as possible over out, remainder to the first entries."""
    base, extra = divmod(total, out.size)
    share = np.full(out.size, base, dtype=np.int64)
    share[:extra] += 1
    if add:
        out += share
    else:
        out[:] = share


__all__ = ["ActiveRoots", "PCLRoots", "UniformRoots", "spread_evenly"]
