"""numba root DP behind trace_core.allocation.allocate_roots (inputs already validated and clipped).

The DP over (prompt i, budget b) keeps V_i(b), the best objective of prompts 0..i sharing b
rollouts. Storing the argmax of every cell, a (B, budget + 1) table, used to cost as much as the
DP arithmetic itself (the table stores ran in the innermost loop, and a fresh 8-16 MB table is
page-faulted in on every call). So the forward pass keeps values only and saves every
CHECKPOINT_EVERY-th row; the backtrack then recomputes, one segment of rows at a time from its
checkpoint, just the cells the answer can pass through: within a segment ending at budget b,
row t is needed only on [b - (rows after t) * cap, b]. Every cell is computed by the same
operations in the same order in both passes (relax_cells), so the recomputed values, and hence the
choices, are bitwise those of a full table; reference.py's pure-Python twin keeps the full table
and tests check both agree.
"""

from __future__ import annotations

import numba
import numpy as np

# Near-ties in the root DP: a larger count replaces a smaller one only when it improves the partial
# objective over prompts 0..i by more than TIE_RTOL * (i + 1). Without this, float rounding (sums of
# the same terms in a different order differ by an ulp) would decide between equally good
# allocations, e.g. which of several identical prompts gets the extra rollout.
TIE_RTOL = 1e-12

# Rows between saved checkpoints. The backtrack recomputes about B * CHECKPOINT_EVERY * cap / 2
# cells; the checkpoints take B / CHECKPOINT_EVERY rows of memory.
CHECKPOINT_EVERY = 16

# Budget columns processed together, so a block of the current row and the matching window of the
# previous row stay in L1 cache across all counts m.
_BLOCK = 512


@numba.njit(cache=True)
def mixed_probability_table(v: float, cap: int, out: np.ndarray) -> None:
    """out[m] = 1 - v^m - (1-v)^m for m = 1..cap (powers by repeated products), out[0] = 0."""
    a = 1.0
    c = 1.0
    w = 1.0 - v
    out[0] = 0.0
    for m in range(1, cap + 1):
        a *= v
        c *= w
        out[m] = (1.0 - a) - c


@numba.njit(cache=True)
def row_bounds(i, n, budget, cap):
    """Budgets reachable after prompts 0..i: they hold at most (i+1)*cap, the rest at most (n-1-i)*cap."""
    return max(0, budget - (n - 1 - i) * cap), min(budget, (i + 1) * cap)


@numba.njit(cache=True)
def relax_cells(prev, cur, mixed, lo, hi, m_min, cap, tol):
    """cur[b] = best of prev[b] (count 0) and prev[b - m] + mixed[m], m = m_min..min(cap, b), for b in [lo, hi].

    Counts are tried in increasing order and a larger one wins only if it beats the best so far
    by more than tol, so among near-equal options the smallest count is kept.
    """
    for b in range(lo, hi + 1):
        cur[b] = prev[b]
    for b0 in range(lo, hi + 1, _BLOCK):
        b1 = min(b0 + _BLOCK, hi + 1)
        for m in range(m_min, cap + 1):
            start = max(b0, m)
            if start >= b1:
                continue
            g = mixed[m]
            # Slices with a non-negative loop index let LLVM vectorise (no wraparound check).
            src = prev[start - m : b1 - m]
            dst = cur[start:b1]
            for j in range(b1 - start):
                x = src[j] + g
                d = dst[j]
                dst[j] = x if x > d + tol else d


@numba.njit(cache=True)
def relax_cells_with_choices(prev, cur, choice, mixed, lo, hi, m_min, cap, tol):
    """relax_cells that also records the winning count: choice[b] for b in [lo, hi] (same updates)."""
    for b in range(lo, hi + 1):
        cur[b] = prev[b]
        choice[b] = 0
    for b0 in range(lo, hi + 1, _BLOCK):
        b1 = min(b0 + _BLOCK, hi + 1)
        for m in range(m_min, cap + 1):
            start = max(b0, m)
            if start >= b1:
                continue
            g = mixed[m]
            src = prev[start - m : b1 - m]
            dst = cur[start:b1]
            dst_choice = choice[start:b1]
            for j in range(b1 - start):
                x = src[j] + g
                better = x > dst[j] + tol
                dst[j] = x if better else dst[j]
                dst_choice[j] = m if better else dst_choice[j]


@numba.njit(cache=True)
def _copy_range(dst, src, lo, hi):
    """dst[lo:hi] = src[lo:hi] (an explicit loop: numba compiles slice assignment several times slower)."""
    for b in range(lo, hi):
        dst[b] = src[b]


@numba.njit(cache=True)
def _fill_range(dst, lo, hi, value):
    for b in range(lo, hi):
        dst[b] = value


@numba.njit(cache=True)
def root_dp_forward(v, budget, m_min, cap, tie_rtol, every):
    """Forward pass: the optimal objective and checkpoints (ceil(B / every), budget + 1).

    checkpoints[k] is the value row of prompts 0..k*every-1 (checkpoints[0], no prompt yet, is 0 at
    b = 0 and -inf elsewhere); cells a row cannot reach hold -inf.
    """
    n = v.shape[0]
    # Two row buffers swapped after each prompt (copying a row back would cost ~10% of the pass).
    # A swapped-in buffer holds a stale row below lo, which the next prompt never reads: its cells
    # b >= lo' = lo + cap (or lo' = lo = 0) read b - m >= lo. Above hi no row has written yet: -inf.
    prev = np.empty(budget + 1)
    cur = np.empty(budget + 1)
    _fill_range(prev, 0, budget + 1, -np.inf)
    _fill_range(cur, 0, budget + 1, -np.inf)
    prev[0] = 0.0
    mixed = np.empty(cap + 1)
    checkpoints = np.empty(((n + every - 1) // every, budget + 1))
    prev_lo = 0
    for i in range(n):
        if i % every == 0:
            _fill_range(checkpoints[i // every], 0, prev_lo, -np.inf)
            _copy_range(checkpoints[i // every], prev, prev_lo, budget + 1)
        mixed_probability_table(v[i], cap, mixed)
        lo, hi = row_bounds(i, n, budget, cap)
        relax_cells(prev, cur, mixed, lo, hi, m_min, cap, tie_rtol * (i + 1))
        prev, cur = cur, prev
        prev_lo = lo
    return prev[budget], checkpoints


@numba.njit(cache=True)
def root_dp_backtrack(v, budget, m_min, cap, tie_rtol, every, checkpoints):
    """Counts (B,) int64 of the DP's optimum, last segment of `every` prompts first.

    For the segment of prompts s..e-1 whose last prompt ends at budget b, prompt t's row is needed
    only on [b - (e-1-t) * cap, b]; it is recomputed there from the segment's checkpoint, with the
    choices, and read back from prompt e-1 down to s.
    """
    n = v.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    prev = np.empty(budget + 1)
    cur = np.empty(budget + 1)
    mixed = np.empty(cap + 1)
    choice = np.empty((every, budget + 1), dtype=np.int64)
    b = budget
    for k in range(checkpoints.shape[0] - 1, -1, -1):
        s = k * every
        e = min(s + every, n)
        _copy_range(prev, checkpoints[k], 0, budget + 1)
        for t in range(s, e):
            window_lo = max(0, b - (e - 1 - t) * cap)
            lo, hi = row_bounds(t, n, budget, cap)
            lo = max(lo, window_lo)
            hi = min(hi, b)
            mixed_probability_table(v[t], cap, mixed)
            relax_cells_with_choices(prev, cur, choice[t - s], mixed, lo, hi, m_min, cap, tie_rtol * (t + 1))
            # Cells of the window the row cannot reach stay unreachable for the next row.
            _fill_range(prev, window_lo, lo, -np.inf)
            _copy_range(prev, cur, lo, hi + 1)
            _fill_range(prev, max(hi + 1, window_lo), b + 1, -np.inf)
        for t in range(e - 1, s - 1, -1):
            m = choice[t - s, b]
            counts[t] = m
            b -= m
    return counts
