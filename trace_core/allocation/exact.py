"""TRACE's two allocation stages (docs/method.md steps 1 and 3), exact, with numba loops.

Stage 1 (`allocate_roots`) splits a global budget of bare rollouts over candidate prompts;
stage 2 (`allocate_prefixes`) splits each prompt's continuation budget over its turn prefixes.
"""

from __future__ import annotations

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.numba_loops import prefix_greedy, ranked_objectives, ranked_tables
from trace_core.allocation.root_dp import CHECKPOINT_EVERY, TIE_RTOL, root_dp_backtrack, root_dp_forward

ROOT_METHODS = ("dp", "ranked")


def allocate_roots(
    v, budget: int, *, m_min: int = 2, m_max: int | None = None, eps: float = 0.02, method: str = "ranked"
) -> np.ndarray:
    """Stage 1: rollout counts per candidate prompt that maximise the expected number of mixed groups.

    Chooses m_i in {0} U {m_min..m_max} with sum_i m_i == budget exactly, maximising
    sum_i [1 - v_i^m_i - (1 - v_i)^m_i] (the chance that prompt i's group has both a 0 and a 1),
    where v_i is the predicted success probability clipped to [eps, 1 - eps] as the method
    prescribes (so an unconfident predictor never rules a prompt out entirely). m_i = 0 drops prompt i.
    The objective is not concave in m (gain 0 at m = 1), so the method states an exact dynamic
    program over (prompt, budget): O(B * budget * m_max) time, O(B * budget / 16) memory (value rows
    kept at every 16th prompt; the backtrack recomputes the cells it needs from them, see root_dp.py).
    The default solver, "ranked", reaches the same optimum in O(E log E), E <= B * (m_max - m_min)
    (30x faster at B = 1024, budget 8192); the DP stays available and is its test oracle.

    Args:
        v: (B,) predicted success probabilities in [0, 1]; NaN or values outside [0, 1] raise.
        budget: total number of bare rollouts M >= 0, spent exactly.
        m_min: smallest count of an active prompt (>= 1; 2 is the least that can be mixed).
        m_max: largest count per prompt. None means no cap beyond the budget itself (cap = budget),
            which makes the DP O(B * budget^2): set a cap for large budgets.
        eps: clipping margin in [0, 0.5].
        method: "ranked" (default): exact, O(E log E) with E <= B * (m_max - m_min) instead of
            O(B * budget * m_max) (bench/bench_allocate.py). It relies on two facts: some optimum
            activates the prompts nearest v = 1/2, and f is concave for m >= 1 (details in
            _allocate_roots_ranked). "dp": the method's exact DP described above. Both reach the
            same optimal objective, and without ties (e.g. distinct predicted v) the same counts;
            they break ties differently (below).

    Returns:
        (B,) int64 counts.

    Ties: allocations whose objectives differ by less than 1e-12 per prompt count as equal (so
    float rounding never decides between equally good allocations); the result is deterministic
    and within 1e-12 * B^2 of the exact optimum. Among equal allocations "ranked" takes the most
    active prompts, then gives counts to prompts nearer 1/2, then to earlier prompts in input
    order. The DP returns the one with the smallest count for the last prompt, then for the one
    before it, and so on: earlier prompts in input order win ties. Example (both methods): with
    identical v_i (all 0 or all 1, both clipped to the same value) the counts come out
    non-increasing in input order and any dropped prompts are the last ones.

    Raises:
        ValueError: bad v / budget / m_min / m_max / eps, or a budget that cannot be spent exactly
            within the caps (the message gives the numbers).
    """
    if method not in ROOT_METHODS:
        raise checks.AllocationError("method", f"method must be one of {ROOT_METHODS}, got {method!r}")
    v, budget, m_min, m_max, eps = _check_roots(v, budget, m_min, m_max, eps)
    counts = np.zeros(v.shape[0], dtype=np.int64)
    if budget == 0:
        return counts
    cap = checks.effective_root_cap(budget, m_max)
    if method == "ranked":
        return _allocate_roots_ranked(checks.clipped(v, eps), budget, m_min, cap)
    v = checks.clipped(v, eps)
    _, checkpoints = root_dp_forward(v, budget, m_min, cap, TIE_RTOL, CHECKPOINT_EVERY)
    return root_dp_backtrack(v, budget, m_min, cap, TIE_RTOL, CHECKPOINT_EVERY, checkpoints)


def _allocate_roots_ranked(v: np.ndarray, budget: int, m_min: int, cap: int) -> np.ndarray:
    """Exact root allocation in O(E log E), E <= B * (cap - m_min) marginal steps, instead of the DP.

    Two facts make it exact. (1) f_v(m) = 1 - v^m - (1-v)^m grows as v nears 1/2, for every m, so
    moving an active prompt's count to an inactive prompt nearer 1/2 never lowers the objective:
    some optimum activates exactly the k prompts nearest 1/2 (ranked by |v - 1/2|, ties by input
    order). (2) For m >= 1 the marginal gain f(m+1) - f(m) = v^m (1-v) + (1-v)^m v decreases, so
    with the active set fixed, giving each m_min and the rest of the budget to the largest marginal
    gains is optimal. The solver evaluates (2) for every feasible k at once with a Fenwick tree.

    Ties: among k values whose objectives differ by less than 1e-12 * B it takes the largest k (the
    most prompts); equal marginal gains go to the better-ranked prompt, then the smaller count.
    v: (B,) clipped probabilities. Returns (B,) int64 counts.
    """
    n = v.shape[0]
    rank_order = np.argsort(np.abs(v - 0.5), kind="stable")
    k_lo = -(-budget // cap)
    k_hi = min(n, budget // m_min)
    n_steps = min(cap - m_min, budget - k_lo * m_min)  # no prompt can take more extra steps than this
    base, steps = ranked_tables(v[rank_order[:k_hi]], m_min, n_steps)
    # Flat index r * n_steps + j is rank-major, so a stable sort breaks equal gains by rank, then count.
    by_gain = np.argsort(-steps.ravel(), kind="stable")
    position = np.empty(by_gain.size, dtype=np.int64)
    position[by_gain] = np.arange(by_gain.size)
    objective = ranked_objectives(base, steps, position.reshape(steps.shape), budget, m_min, k_lo)
    best_k = int(np.flatnonzero(objective >= objective.max() - TIE_RTOL * n)[-1])
    extra_steps = budget - best_k * m_min
    chosen = by_gain[by_gain // max(n_steps, 1) < best_k][:extra_steps] if n_steps else by_gain[:0]
    counts = np.zeros(n, dtype=np.int64)
    counts[rank_order[:best_k]] = m_min + np.bincount(chosen // max(n_steps, 1), minlength=best_k)
    return counts


def allocate_prefixes(p, r, group, budget_per_group, *, k_max: int | None = None, eps: float = 0.02) -> np.ndarray:
    """Stage 2: continuation counts per anchor (turn prefix) that maximise the expected number of flips.

    Anchor a has predicted success p_a (clipped to [eps, 1 - eps]) and the outcome r_a of the bare
    rollout it lies on; q_a = r_a p_a + (1 - r_a)(1 - p_a) is the chance a continuation repeats that
    outcome, and k continuations are worth 1 - q_a^k. For every group g independently, chooses k_a
    with sum over the group's anchors == budget_per_group[g] exactly, maximising sum 1 - q_a^k_a.
    The objective is separable and concave, so greedy on the marginal gain q^k (1 - q) with a heap
    is exactly optimal: O((N + total budget) log N).

    Args:
        p: (N,) predicted success probability of each anchor, in [0, 1].
        r: (N,) outcome of the anchor's bare rollout, 0 or 1 (bool, int or float).
        group: (N,) int id of the anchor's group (its prompt), in [0, len(budget_per_group)).
            Anchors of a group need not be contiguous.
        budget_per_group: (G,) ints >= 0; entry g is the number of continuations for group g
            (m_g * N in the method). Its length defines the group ids; a group with no anchor must
            have budget 0.
        k_max: largest count per anchor (>= 1). None means no cap (an anchor may take its whole
            group's budget).
        eps: clipping margin in [0, 0.5].

    Returns:
        (N,) int64 counts, in the input order of the anchors.

    Ties (equal marginal gains) go to the anchor that comes first in the input, so the result is
    deterministic.

    Raises:
        ValueError: bad p / r / group / budget_per_group / k_max / eps, mismatched lengths, or a
            group whose budget exceeds what its anchors can take (the message gives the numbers).
    """
    p, r, group, budgets, k_max, eps = _check_prefixes(p, r, group, budget_per_group, k_max, eps)
    # Work buffer for the kernel's grouping of anchor indices: int32 halves its scattered writes.
    anchors = np.empty(p.shape[0], dtype=np.int32 if p.shape[0] < 2**31 else np.int64)
    return prefix_greedy(p, r, group, budgets, -1 if k_max is None else k_max, eps, anchors)


def repeat_probability(p: np.ndarray, r: np.ndarray, eps: float) -> np.ndarray:
    """q = r p + (1 - r)(1 - p) with p clipped to [eps, 1 - eps]: chance a continuation repeats r."""
    p = checks.clipped(p, eps)
    return np.where(r == 1, p, 1.0 - p)


def _check_roots(v, budget, m_min, m_max, eps):
    v = checks.as_probabilities(v, "v")
    budget = checks.as_count(budget, "budget")
    m_min = checks.as_count(m_min, "m_min", minimum=1)
    m_max = checks.as_optional_count(m_max, "m_max", minimum=1)
    checks.check_root_caps(m_min, m_max)
    eps = checks.as_eps(eps)
    checks.check_root_budget_reachable(v.shape[0], budget, m_min, m_max)
    return v, budget, m_min, m_max, eps


def _check_prefixes(p, r, group, budget_per_group, k_max, eps):
    p = checks.as_probabilities(p, "p")
    r = checks.as_binary_outcomes(r, "r")
    budgets = checks.as_nonnegative_ints(budget_per_group, "budget_per_group")
    group = checks.as_group_ids(group, budgets.shape[0])
    checks.check_same_length("p", p, r=r, group=group)
    k_max = checks.as_optional_count(k_max, "k_max", minimum=1)
    eps = checks.as_eps(eps)
    checks.check_prefix_budget_reachable(checks.group_sizes(group, budgets.shape[0]), budgets, k_max)
    return p, r, group, budgets, k_max, eps
