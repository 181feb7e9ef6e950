"""Pure-Python versions of TRACE's two allocation stages: the oracle for tests and the benchmark baseline.

Same validation, same algorithms, same arithmetic in the same order as trace_core.allocation.exact
(its numba loops live in root_dp.py and kernels.py), so for valid input both return identical
arrays. The root DP here keeps the whole choice table; the numba DP keeps value checkpoints and
recomputes the few cells its backtrack needs (less memory traffic, same cells, same values).
Loops run over Python lists and heapq; numpy only converts the inputs and the result.
"""

from __future__ import annotations

import heapq

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.exact import _check_prefixes, _check_roots, repeat_probability
from trace_core.allocation.root_dp import TIE_RTOL


def allocate_roots_reference(
    v, budget: int, *, m_min: int = 2, m_max: int | None = None, eps: float = 0.02
) -> np.ndarray:
    """Pure-Python twin of trace_core.allocation.allocate_roots with method="dp" (same arguments,
    errors and result)."""
    v, budget, m_min, m_max, eps = _check_roots(v, budget, m_min, m_max, eps)
    n = v.shape[0]
    if budget == 0:
        return np.zeros(n, dtype=np.int64)
    cap = checks.effective_root_cap(budget, m_max)
    values = checks.clipped(v, eps).tolist()
    minus_inf = float("-inf")
    prev = [minus_inf] * (budget + 1)
    prev[0] = 0.0
    choice = []
    for i, vi in enumerate(values):
        gain = _mixed_probability_table(vi, cap)
        lo = max(0, budget - (n - 1 - i) * cap)
        hi = min(budget, (i + 1) * cap)
        tol = TIE_RTOL * (i + 1)
        cur = [minus_inf] * (budget + 1)
        row = [0] * (budget + 1)
        for b in range(lo, hi + 1):
            best, best_m = prev[b], 0
            for m in range(m_min, min(cap, b) + 1):
                x = prev[b - m] + gain[m]
                if x > best + tol:
                    best, best_m = x, m
            cur[b], row[b] = best, best_m
        prev = cur
        choice.append(row)
    counts = [0] * n
    b = budget
    for i in range(n - 1, -1, -1):
        counts[i] = choice[i][b]
        b -= counts[i]
    return np.asarray(counts, dtype=np.int64)


def allocate_prefixes_reference(
    p, r, group, budget_per_group, *, k_max: int | None = None, eps: float = 0.02
) -> np.ndarray:
    """Pure-Python twin of trace_core.allocation.allocate_prefixes (same arguments, errors and result)."""
    p, r, group, budgets, k_max, eps = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
    q = repeat_probability(p, r, eps).tolist()
    members: list[list[int]] = [[] for _ in range(budgets.shape[0])]
    for anchor, g in enumerate(group.tolist()):
        members[g].append(anchor)
    counts = [0] * len(q)
    for g, anchors in enumerate(members):
        remaining = int(budgets[g])
        # heapq is a min-heap: (-gain, position) pops the largest gain, then the earliest anchor.
        heap = [(-(1.0 - q[a]), j) for j, a in enumerate(anchors)]
        heapq.heapify(heap)
        while remaining > 0:
            neg_gain, j = heapq.heappop(heap)
            a = anchors[j]
            counts[a] += 1
            remaining -= 1
            if k_max is None or counts[a] < k_max:
                heapq.heappush(heap, (-(-neg_gain * q[a]), j))
    return np.asarray(counts, dtype=np.int64)


def _mixed_probability_table(v: float, cap: int) -> list[float]:
    """[0, f(1), ..., f(cap)] with f(m) = 1 - v^m - (1-v)^m, powers by repeated products."""
    table = [0.0] * (cap + 1)
    a = c = 1.0
    w = 1.0 - v
    for m in range(1, cap + 1):
        a *= v
        c *= w
        table[m] = (1.0 - a) - c
    return table
