"""numba loops behind trace_core.allocation, except the root DP (root_dp.py); inputs already validated.

The pure-Python twin of the prefix greedy (reference.py) runs the same arithmetic in the same
order, so both return identical arrays; keep them in step when changing either. The "ranked" root
solver has no twin: tests check it against brute force and the DP.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _sift_down(heap_gain, heap_pos, size, pos):
    """Restore the heap below pos. Order: larger gain first, lower position on equal gain.

    Gains are stored in the heap itself (not behind an index) so comparisons read contiguous memory.
    The larger child is picked with selects rather than branches: that comparison is a coin flip
    the branch predictor would miss half the time.
    """
    g = heap_gain[pos]
    j = heap_pos[pos]
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        cg = heap_gain[child]
        cj = heap_pos[child]
        if child + 1 < size:
            rg = heap_gain[child + 1]
            rj = heap_pos[child + 1]
            right = (rg > cg) | ((rg == cg) & (rj < cj))
            child += right
            cg = rg if right else cg
            cj = rj if right else cj
        if not ((cg > g) | ((cg == g) & (cj < j))):
            break
        heap_gain[pos] = cg
        heap_pos[pos] = cj
        pos = child
    heap_gain[pos] = g
    heap_pos[pos] = j


@numba.njit(cache=True)
def _anchors_by_group(group, budgets, anchors):
    """Counting sort of the anchors of groups with a budget into anchors[:starts[G]]; returns starts (G+1,).

    Group g's anchors, in input order, are anchors[starts[g]:starts[g+1]]. Anchors of groups with
    budget 0 get nothing and are left out.
    """
    n_groups = budgets.shape[0]
    starts = np.zeros(n_groups + 1, dtype=np.int64)
    for a in range(group.shape[0]):
        starts[group[a] + 1] += 1
    for g in range(n_groups):
        starts[g + 1] = starts[g] + (starts[g + 1] if budgets[g] > 0 else 0)
    fill = starts[:-1].copy()
    for a in range(group.shape[0]):
        g = group[a]
        if budgets[g] > 0:
            anchors[fill[g]] = a
            fill[g] += 1
    return starts


@numba.njit(cache=True)
def prefix_greedy(p, r, group, budgets, cap, eps, anchors):
    """Per-group greedy on the marginal gain q^k (1 - q) of an anchor's (k+1)-th continuation.

    p: (N,) float64 predicted success (unclipped, validated); r: (N,) int64 0/1 outcomes;
    group: (N,) int64 ids in [0, G); budgets: (G,) int64; cap: per-anchor cap, -1 = none;
    anchors: (N,) int32 (or int64 for N >= 2**31) work buffer.
    Returns counts (N,) int64. The objective sum 1 - q^k is separable and concave in each k, so
    taking the largest remaining marginal gain budget-many times is exactly optimal.
    """
    starts = _anchors_by_group(group, budgets, anchors)
    n_max = 0
    for g in range(budgets.shape[0]):
        n_max = max(n_max, starts[g + 1] - starts[g])
    counts = np.zeros(p.shape[0], dtype=np.int64)
    heap_pos = np.empty(n_max, dtype=np.int64)
    heap_gain = np.empty(n_max)
    q = np.empty(n_max)
    hi = 1.0 - eps
    for g in range(budgets.shape[0]):
        s = starts[g]
        size = starts[g + 1] - s
        remaining = budgets[g]
        # Local position j stands for anchor anchors[s + j]; positions follow input order.
        for j in range(size):
            a = anchors[s + j]
            pa = min(max(p[a], eps), hi)  # the method's clip to [eps, 1 - eps]
            q[j] = pa if r[a] == 1 else 1.0 - pa
            heap_gain[j] = 1.0 - q[j]
            heap_pos[j] = j
        for pos in range(size // 2 - 1, -1, -1):
            _sift_down(heap_gain, heap_pos, size, pos)
        while remaining > 0:
            top = heap_pos[0]
            anchor = anchors[s + top]
            counts[anchor] += 1
            remaining -= 1
            if cap < 0 or counts[anchor] < cap:
                heap_gain[0] *= q[top]
            else:  # the anchor is full: drop it from the heap
                size -= 1
                heap_gain[0] = heap_gain[size]
                heap_pos[0] = heap_pos[size]
            _sift_down(heap_gain, heap_pos, size, 0)
    return counts


@numba.njit(cache=True)
def ranked_tables(v, m_min, n_steps):
    """Per prompt (in rank order): f(m_min) and the marginal gains f(m+1) - f(m), m = m_min.., n_steps of them.

    v: (K,) clipped probabilities. Returns base (K,), steps (K, n_steps). The gain of the step
    m -> m+1 is v^m (1-v) + (1-v)^m v, computed from repeated products so it never increases with m
    (the objective is concave for m >= 1).
    """
    k = v.shape[0]
    base = np.empty(k)
    steps = np.empty((k, n_steps))
    for r in range(k):
        x = v[r]
        w = 1.0 - x
        a = 1.0
        c = 1.0
        for _ in range(m_min):
            a *= x
            c *= w
        base[r] = 0.0 if m_min <= 1 else (1.0 - a) - c
        for j in range(n_steps):
            steps[r, j] = a * w + c * x
            a *= x
            c *= w
    return base, steps


@numba.njit(cache=True)
def ranked_objectives(base, steps, position, budget, m_min, k_lo):
    """Best objective with exactly k active prompts (the k best-ranked), for k = 0..K (-inf if infeasible).

    With k prompts active, each holds m_min and the other budget - k*m_min rollouts go to the
    largest marginal gains among their steps (exact for concave gains). position[r, j] is the rank
    of step (r, j) in the global order of all steps by decreasing gain; a Fenwick tree over those
    positions holds the steps of the active prompts and yields the sum of the t best in O(log E).
    """
    k_hi, n_steps = steps.shape
    size = k_hi * n_steps
    count = np.zeros(size + 1, dtype=np.int64)
    total = np.zeros(size + 1)
    top_bit = 1
    while top_bit * 2 <= size:
        top_bit *= 2
    objective = np.full(k_hi + 1, -np.inf)
    if k_lo == 0:
        objective[0] = 0.0
    base_sum = 0.0
    for k in range(1, k_hi + 1):
        r = k - 1
        base_sum += base[r]
        for j in range(n_steps):
            i = position[r, j] + 1
            g = steps[r, j]
            while i <= size:
                count[i] += 1
                total[i] += g
                i += i & -i
        if k < k_lo:
            continue
        wanted = budget - k * m_min
        idx = 0
        got = 0
        acc = 0.0
        bit = top_bit if size > 0 else 0
        while bit > 0:
            nxt = idx + bit
            if nxt <= size and got + count[nxt] <= wanted:
                idx = nxt
                got += count[nxt]
                acc += total[nxt]
            bit //= 2
        objective[k] = base_sum + acc
    return objective
