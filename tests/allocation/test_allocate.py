"""Rollout allocation (trace_core.allocation): exactness against brute force, the fast solvers against
their pure-Python twins, baselines, tie rules, helpers, and every user-facing error."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_core.allocation import (
    Allocator,
    allocate_prefixes,
    allocate_roots,
    available_allocators,
    expected_prefix_objective,
    expected_root_objective,
    get_allocator,
    register_allocator,
    root_effective_ratio_estimate,
    root_mixed_probability,
    tree_effective_ratio_estimate,
    tree_mixed_probability,
)
from trace_core.allocation.naive import allocate_prefixes_reference, allocate_roots_reference
from trace_core.allocation.root_dp import CHECKPOINT_EVERY
from trace_core.allocation.strategies import _REGISTRY

EPS = 0.02
SETTINGS = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- brute force oracles (independent code)


def mixed(v: float, m: int, eps: float = EPS) -> float:
    v = min(max(v, eps), 1 - eps)
    return 0.0 if m <= 1 else 1 - v**m - (1 - v) ** m


def root_value(v, counts) -> float:
    return sum(mixed(vi, int(m)) for vi, m in zip(v, counts))


def root_feasible(n: int, budget: int, m_min: int, m_max: int | None) -> bool:
    cap = budget if m_max is None else min(m_max, budget)
    return budget == 0 or any(k * m_min <= budget <= k * cap for k in range(1, n + 1))


def all_root_allocations(n, budget, m_min, m_max):
    cap = budget if m_max is None else min(m_max, budget)
    options = [0] + list(range(m_min, cap + 1))
    return [c for c in itertools.product(options, repeat=n) if sum(c) == budget]


def repeat_q(p, r, eps=EPS):
    p = min(max(p, eps), 1 - eps)
    return p if r == 1 else 1 - p


def prefix_value(p, r, counts) -> float:
    return sum(1 - repeat_q(pa, ra) ** k for pa, ra, k in zip(p, r, counts))


def all_prefix_allocations(group, budgets, k_max):
    cap = max(budgets, default=0) if k_max is None else k_max
    for c in itertools.product(range(cap + 1), repeat=len(group)):
        sums = [0] * len(budgets)
        for g, k in zip(group, c):
            sums[g] += k
        if sums == list(budgets):
            yield c


def naive_root_greedy(v, budget, m_min, m_max):
    """Greedy by gain per rollout (a new prompt costs m_min at once); None when it gets stuck."""
    cap = budget if m_max is None else min(m_max, budget)
    counts = [0] * len(v)
    left = budget
    while left > 0:
        best, pick = -1.0, None
        for i, vi in enumerate(v):
            step = m_min if counts[i] == 0 else 1
            if step <= left and counts[i] + step <= cap:
                rate = (mixed(vi, counts[i] + step) - mixed(vi, counts[i])) / step
                if rate > best:
                    best, pick = rate, (i, step)
        if pick is None:
            return None
        counts[pick[0]] += pick[1]
        left -= pick[1]
    return counts


def check_root_counts(counts, n, budget, m_min, m_max):
    cap = budget if m_max is None else min(m_max, budget)
    assert counts.dtype == np.int64 and counts.shape == (n,)
    assert int(counts.sum()) == budget
    assert all(m == 0 or m_min <= m <= cap for m in counts.tolist())


def check_prefix_counts(counts, group, budgets, k_max):
    assert counts.dtype == np.int64 and counts.shape == (len(group),)
    assert (counts >= 0).all()
    if k_max is not None:
        assert (counts <= k_max).all()
    assert np.bincount(np.asarray(group, dtype=np.int64), weights=counts, minlength=len(budgets)).tolist() == list(
        budgets
    )


def other_allocators():
    return [get_allocator("uniform"), get_allocator("pcl", count_per_prompt=2), get_allocator("random_tree", rng=0)]


# ---------------------------------------------------------------- stage 1: roots


@pytest.mark.parametrize("method", ["dp", "ranked"])
def test_roots_match_exhaustive_search_and_beat_baselines(method):
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(120):
        n = int(rng.integers(1, 5))
        m_min = int(rng.integers(1, 4))
        m_max = None if trial % 4 == 0 else int(rng.integers(m_min, 7))
        budget = int(rng.integers(0, 16 if m_max is None else n * m_max + 2))
        v = rng.random(n)
        if trial % 3 == 0:  # exact ties and the clipped extremes
            v = rng.choice([0.0, 0.5, 1.0, 0.3], size=n)
        allocations = all_root_allocations(n, budget, m_min, m_max)
        if not allocations:
            with pytest.raises(ValueError, match="cannot be spent exactly"):
                allocate_roots(v, budget, m_min=m_min, m_max=m_max, method=method)
            continue
        best = max(root_value(v, c) for c in allocations)
        counts = allocate_roots(v, budget, m_min=m_min, m_max=m_max, method=method)
        check_root_counts(counts, n, budget, m_min, m_max)
        assert root_value(v, counts) == pytest.approx(best, abs=1e-12)
        greedy = naive_root_greedy(v.tolist(), budget, m_min, m_max)
        if greedy is not None:
            assert root_value(v, counts) >= root_value(v, greedy) - 1e-12
        for allocator in other_allocators():
            try:
                baseline = allocator.roots(v, budget, m_min=m_min, m_max=m_max)
            except ValueError:  # pcl's fixed count may not fit this budget
                continue
            assert root_value(v, counts) >= root_value(v, baseline) - 1e-12
        checked += 1
    assert checked > 60


@pytest.mark.parametrize("method", ["dp", "ranked"])
def test_roots_beat_greedy_where_greedy_is_suboptimal(method):
    # Greedy fills one sure-to-help prompt step by step; the DP sees that two groups of 2 are better.
    v = [0.5, 0.5]
    greedy = naive_root_greedy(v, 4, 2, None)
    counts = allocate_roots(v, 4, m_min=2, method=method)
    assert counts.tolist() == [2, 2]
    assert greedy == [4, 0]
    assert root_value(v, counts) > root_value(v, greedy) + 0.1


def test_roots_tie_rule_is_reverse_lexicographic_minimum_among_optima():
    for v_value, n, budget, m_max in [
        (0.0, 6, 15, 6),
        (1.0, 5, 11, 3),
        (0.0, 3, 12, None),
        (0.0, 4, 8, 8),
        (0.37, 5, 12, 6),
    ]:
        v = [v_value] * n
        allocations = all_root_allocations(n, budget, 2, m_max)
        best = max(root_value(v, c) for c in allocations)
        optimal = [c for c in allocations if root_value(v, c) > best - 1e-9]
        expected = min(optimal, key=lambda c: c[::-1])
        counts = allocate_roots(v, budget, m_max=m_max, method="dp")
        assert tuple(counts.tolist()) == expected
        assert (np.diff(counts) <= 0).all(), "identical prompts: counts non-increasing, dropped prompts last"


def test_ranked_tie_rule_takes_the_most_prompts_among_optima():
    for v_value, n, budget, m_max in [(0.0, 6, 15, 6), (1.0, 5, 11, 3), (0.0, 3, 12, None), (0.37, 5, 12, 6)]:
        v = [v_value] * n
        allocations = all_root_allocations(n, budget, 2, m_max)
        best = max(root_value(v, c) for c in allocations)
        most_active = max(sum(m > 0 for m in c) for c in allocations if root_value(v, c) > best - 1e-9)
        counts = allocate_roots(v, budget, m_max=m_max, method="ranked")
        assert root_value(v, counts) == pytest.approx(best, abs=1e-12)
        assert (counts > 0).sum() == most_active
        assert (np.diff(counts) <= 0).all(), "identical prompts: counts non-increasing, dropped prompts last"


@pytest.mark.parametrize("method", ["dp", "ranked"])
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_roots_all_zero_or_all_one_spend_the_budget_deterministically(value, method):
    v = np.full(64, value)
    first = allocate_roots(v, 301, m_max=16, method=method)
    check_root_counts(first, 64, 301, 2, 16)
    assert np.array_equal(first, allocate_roots(v.copy(), 301, m_max=16, method=method))
    assert (np.diff(first) <= 0).all()


def test_default_is_ranked_and_equals_the_dp_on_random_cases():
    """The default solver is "ranked"; the DP (the method's statement) is its oracle: identical counts
    wherever the optimum is unique (distinct v), the same objective where ties allow several."""
    import inspect

    assert inspect.signature(allocate_roots).parameters["method"].default == "ranked"
    rng = np.random.default_rng(19)
    compared = 0
    for trial in range(600):
        n = int(rng.integers(1, [8, 40, 200][trial % 3]))
        m_min = int(rng.integers(1, 5))
        m_max = None if trial % 7 == 0 else m_min + int(rng.integers(0, 12))
        active = int(rng.integers(1, n + 1))
        budget = int(rng.integers(active * m_min, active * (m_max or m_min + 6) + 1))
        if not root_feasible(n, budget, m_min, m_max):
            continue
        v = rng.random(n)
        eps = [0.0, 0.02, 0.1][trial % 3]
        if trial % 5 == 0:  # values beyond the clip range tie after clipping
            v = rng.choice([0.0, 0.01, 0.3, 0.5, 0.99, 1.0], size=n)
        ranked = allocate_roots(v, budget, m_min=m_min, m_max=m_max, eps=eps)
        dp = allocate_roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, method="dp")
        assert np.array_equal(ranked, allocate_roots(v, budget, m_min=m_min, m_max=m_max, eps=eps, method="ranked"))
        check_root_counts(ranked, n, budget, m_min, m_max)
        clipped = np.clip(v, eps, 1 - eps)
        # one optimum unless two prompts are equally uncertain, or a count of 1 (worth 0) can go anywhere
        if m_min >= 2 and len(np.unique(np.abs(clipped - 0.5))) == n:
            assert np.array_equal(ranked, dp), trial
            compared += 1
        value = [sum(1 - x**m - (1 - x) ** m for x, m in zip(clipped, c.tolist()) if m > 1) for c in (ranked, dp)]
        assert value[0] == pytest.approx(value[1], abs=1e-9)
    assert compared >= 200


def test_roots_budget_zero_and_empty_pool():
    assert allocate_roots([0.3, 0.6], 0).tolist() == [0, 0]
    assert allocate_roots([], 0).shape == (0,)
    with pytest.raises(ValueError, match="budget=3 cannot be spent exactly .* over 0 prompt"):
        allocate_roots([], 3)


def test_roots_single_prompt():
    assert allocate_roots([0.4], 7, m_max=10).tolist() == [7]
    assert allocate_roots([0.4], 7).tolist() == [7]  # m_max=None: the cap is the budget
    with pytest.raises(ValueError, match=r"budget=7 .*\(at most 5 in total\)"):
        allocate_roots([0.4], 7, m_max=5)
    with pytest.raises(ValueError, match=r"budget=1 cannot be spent exactly .*m_min=2"):
        allocate_roots([0.4], 1)


def test_roots_unreachable_budget_names_the_numbers():
    with pytest.raises(ValueError, match=r"budget=5 .*m_min=3, 4\] over 10 prompt"):
        allocate_roots(np.full(10, 0.5), 5, m_min=3, m_max=4)  # 3, 4, 6, 7, ... but never 5
    with pytest.raises(ValueError, match=r"budget=100 .*\(at most 96 in total\)"):
        allocate_roots(np.full(3, 0.5), 100, m_max=32)


def test_roots_cap_far_beyond_int16():
    # A cap far beyond int16 (the counts are int64 throughout); one prompt keeps the DP to the last row.
    assert allocate_roots([0.5], 40_000).tolist() == [40_000]


def test_roots_prefer_uncertain_prompts():
    v = np.array([0.02, 0.5, 0.97, 0.45, 0.6, 0.99])
    counts = allocate_roots(v, 12, m_max=4)
    assert counts[[1, 3, 4]].tolist() == [4, 4, 4] and counts[[0, 2, 5]].sum() == 0


@SETTINGS
@given(
    v=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.5, 1.0])), min_size=0, max_size=10),
    budget=st.integers(0, 60),
    m_min=st.integers(1, 4),
    extra=st.one_of(st.none(), st.integers(0, 10)),
)
def test_roots_properties(v, budget, m_min, extra):
    m_max = None if extra is None else m_min + extra
    if not root_feasible(len(v), budget, m_min, m_max):
        with pytest.raises(ValueError, match=f"budget={budget} cannot be spent exactly"):
            allocate_roots(v, budget, m_min=m_min, m_max=m_max)
        return
    counts = allocate_roots(v, budget, m_min=m_min, m_max=m_max, method="dp")
    check_root_counts(counts, len(v), budget, m_min, m_max)
    assert np.array_equal(counts, allocate_roots(list(v), budget, m_min=m_min, m_max=m_max, method="dp"))
    assert np.array_equal(counts, allocate_roots_reference(v, budget, m_min=m_min, m_max=m_max))
    ranked = allocate_roots(v, budget, m_min=m_min, m_max=m_max, method="ranked")
    check_root_counts(ranked, len(v), budget, m_min, m_max)
    assert np.array_equal(ranked, allocate_roots(v, budget, m_min=m_min, m_max=m_max, method="ranked"))
    assert root_value(v, ranked) == pytest.approx(root_value(v, counts), abs=1e-9)


# ---------------------------------------------------------------- stage 2: prefixes


def test_prefixes_match_exhaustive_search_and_beat_baselines():
    rng = np.random.default_rng(1)
    for trial in range(120):
        n = int(rng.integers(1, 6))
        n_groups = int(rng.integers(1, 3))
        group = rng.integers(0, n_groups, n)
        sizes = np.bincount(group, minlength=n_groups)
        k_max = None if trial % 3 == 0 else int(rng.integers(1, 4))
        budgets = [int(rng.integers(0, 5)) if s else 0 for s in sizes]
        if k_max is not None:
            budgets = [min(b, s * k_max) for b, s in zip(budgets, sizes)]
        p = rng.random(n) if trial % 4 else rng.choice([0.0, 0.5, 1.0], size=n)
        r = rng.integers(0, 2, n)
        best = max(prefix_value(p, r, c) for c in all_prefix_allocations(group.tolist(), budgets, k_max))
        counts = allocate_prefixes(p, r, group, budgets, k_max=k_max)
        check_prefix_counts(counts, group, budgets, k_max)
        assert prefix_value(p, r, counts) == pytest.approx(best, abs=1e-12)
        for allocator in other_allocators():
            baseline = allocator.prefixes(p, r, group, budgets, k_max=k_max)
            check_prefix_counts(baseline, group, budgets, k_max)
            assert prefix_value(p, r, counts) >= prefix_value(p, r, baseline) - 1e-12


def test_prefixes_spend_on_likely_flips():
    # A success (r=1) on a prefix the predictor finds hopeless (p=0.1) is the likeliest to flip
    # (q = 0.1); then the coin flip (q = 0.5); a failure there (q = 0.9) before a confident success (q = 0.95).
    p = [0.1, 0.1, 0.95, 0.5]
    r = [1, 0, 1, 1]
    assert allocate_prefixes(p, r, [0, 0, 0, 0], [1]).tolist() == [1, 0, 0, 0]
    assert allocate_prefixes(p, r, [0, 0, 0, 0], [3], k_max=1).tolist() == [1, 1, 0, 1]
    # Without a cap the second continuation of anchor 0 (gain 0.1 * 0.9) loses to anchor 3 (0.5).
    assert allocate_prefixes(p, r, [0, 0, 0, 0], [2]).tolist() == [1, 0, 0, 1]


def test_prefixes_groups_are_independent_and_need_not_be_contiguous():
    p = np.array([0.3, 0.7, 0.2, 0.9, 0.5, 0.4])
    r = np.array([1, 0, 1, 0, 1, 1])
    group = np.array([1, 0, 1, 0, 2, 1])
    budgets = [3, 4, 2]
    together = allocate_prefixes(p, r, group, budgets, k_max=3)
    for g in range(3):
        alone = allocate_prefixes(
            p[group == g], r[group == g], np.zeros((group == g).sum(), dtype=int), [budgets[g]], k_max=3
        )
        assert np.array_equal(together[group == g], alone)


def test_prefixes_ties_go_to_the_earlier_anchor():
    assert allocate_prefixes([0.5] * 4, [1, 0, 1, 0], [0] * 4, [2]).tolist() == [1, 1, 0, 0]
    assert allocate_prefixes([1.0, 0.0, 1.0], [0, 1, 0], [0, 0, 0], [4], k_max=2).tolist() == [2, 1, 1]


def test_prefixes_budget_zero_and_empty_groups():
    assert allocate_prefixes([0.5, 0.5], [0, 1], [0, 0], [0]).tolist() == [0, 0]
    assert allocate_prefixes([], [], np.zeros(0, dtype=int), [0, 0]).shape == (0,)
    # Group 1 has no anchor and no budget: fine.
    assert allocate_prefixes([0.5], [1], [0], [2, 0]).tolist() == [2]


@SETTINGS
@given(
    data=st.data(),
    n=st.integers(0, 30),
    n_groups=st.integers(1, 5),
    k_max=st.one_of(st.none(), st.integers(1, 5)),
)
def test_prefixes_properties(data, n, n_groups, k_max):
    p = data.draw(st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.5, 1.0])), min_size=n, max_size=n))
    r = data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n))
    group = data.draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n))
    budgets = data.draw(st.lists(st.integers(0, 20), min_size=n_groups, max_size=n_groups))
    sizes = np.bincount(np.asarray(group, dtype=np.int64), minlength=n_groups)
    capacity = [s * (k_max if k_max is not None else 10**9) for s in sizes]
    if any(b > c for b, c in zip(budgets, capacity)):
        with pytest.raises(ValueError, match="is not reachable"):
            allocate_prefixes(p, r, group, budgets, k_max=k_max)
        return
    counts = allocate_prefixes(p, r, group, budgets, k_max=k_max)
    check_prefix_counts(counts, group, budgets, k_max)
    assert np.array_equal(counts, allocate_prefixes(p, r, group, budgets, k_max=k_max))
    assert np.array_equal(counts, allocate_prefixes_reference(p, r, group, budgets, k_max=k_max))
    # Optimality certificate of a separable concave problem: no single move within a group helps.
    q = np.array([repeat_q(pa, ra) for pa, ra in zip(p, r)])
    for a, b in itertools.permutations(range(n), 2):
        if group[a] == group[b] and counts[a] > 0 and (k_max is None or counts[b] < k_max):
            loss = q[a] ** (counts[a] - 1) * (1 - q[a])
            gain = q[b] ** counts[b] * (1 - q[b])
            assert gain <= loss + 1e-12


# ---------------------------------------------------------------- fast == reference on larger inputs


def test_fast_solvers_equal_pure_python_on_larger_inputs():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.random(60), np.full(10, 0.5), np.zeros(5), np.ones(5)])
    for budget, m_max in [(400, 16), (123, 7), (80, None)]:
        counts = allocate_roots(v, budget, m_max=m_max, method="dp")
        assert np.array_equal(counts, allocate_roots_reference(v, budget, m_max=m_max))
        ranked = allocate_roots(v, budget, m_max=m_max, method="ranked")
        assert root_value(v, ranked) == pytest.approx(root_value(v, counts), abs=1e-9)
    n = 3000
    p, r, group = rng.random(n), rng.integers(0, 2, n), rng.integers(0, 50, n)
    budgets = rng.integers(0, 200, 50)
    for k_max in [None, 5]:
        assert np.array_equal(
            allocate_prefixes(p, r, group, budgets, k_max=k_max),
            allocate_prefixes_reference(p, r, group, budgets, k_max=k_max),
        )


def test_root_dp_recomputed_backtrack_equals_the_full_choice_table():
    # The numba DP keeps only every CHECKPOINT_EVERY-th value row and recomputes the backtrack's cells
    # from them; the pure-Python twin keeps the whole choice table. Pools spanning several segments,
    # tie-heavy values (ties then fall across segment boundaries) and caps up to the budget.
    rng = np.random.default_rng(3)
    for trial in range(60):
        n = int(rng.integers(CHECKPOINT_EVERY + 1, 4 * CHECKPOINT_EVERY + 3))
        m_min = int(rng.integers(1, 4))
        m_max = None if trial % 5 == 0 else m_min + int(rng.integers(0, 12))
        v = [rng.random(n), np.round(rng.random(n), 1), np.full(n, rng.random()), rng.choice([0.0, 1.0], n)][trial % 4]
        active = int(rng.integers(1, min(n, 24) + 1))  # at most 24 * 14 rollouts keep the Python DP quick
        budget = int(rng.integers(active * m_min, active * (m_max or 3) + 1))
        counts = allocate_roots(v, budget, m_min=m_min, m_max=m_max, method="dp")
        check_root_counts(counts, n, budget, m_min, m_max)
        assert np.array_equal(counts, allocate_roots_reference(v, budget, m_min=m_min, m_max=m_max))


# ---------------------------------------------------------------- baselines and registry


def test_registry_lists_the_builtin_strategies():
    assert {"trace", "uniform", "random_tree", "pcl"} <= set(available_allocators())
    for name in ["trace", "uniform", "pcl"]:
        assert isinstance(get_allocator(name), Allocator)
    assert isinstance(get_allocator("random_tree", rng=1), Allocator)


def test_trace_allocator_is_the_two_stages():
    v, p, r, group = [0.1, 0.5, 0.8, 0.5, 0.5], [0.2, 0.6, 0.4], [1, 0, 1], [0, 0, 1]
    trace = get_allocator("trace")
    assert np.array_equal(trace.roots(v, 11, m_max=4), allocate_roots(v, 11, m_max=4))
    assert np.array_equal(trace.prefixes(p, r, group, [2, 1]), allocate_prefixes(p, r, group, [2, 1]))
    ranked = get_allocator("trace", root_method="ranked")
    assert np.array_equal(ranked.roots(v, 11, m_max=4), allocate_roots(v, 11, m_max=4, method="ranked"))
    with pytest.raises(ValueError, match="root_method must be one of"):
        get_allocator("trace", root_method="exact")


def test_uniform_baseline_counts():
    uniform = get_allocator("uniform")
    assert uniform.roots(np.full(4, 0.9), 14, m_max=8).tolist() == [4, 4, 3, 3]
    assert uniform.roots(np.full(10, 0.5), 7, m_min=2).tolist() == [3, 2, 2, 0, 0, 0, 0, 0, 0, 0]
    assert uniform.prefixes([0.5] * 5, [1] * 5, [0, 1, 0, 0, 1], [5, 1]).tolist() == [2, 1, 2, 1, 0]


def test_pcl_baseline_keeps_prompts_nearest_one_half():
    pcl = get_allocator("pcl", count_per_prompt=4)
    counts = pcl.roots([0.9, 0.45, 0.1, 0.6, 0.52], 13, m_max=8)
    assert counts.tolist() == [0, 4, 0, 4, 5]  # 0.52, 0.45, 0.6 kept; the leftover 1 goes to 0.52
    with pytest.raises(ValueError, match="needs 4 prompts but v has only 3"):
        pcl.roots([0.5] * 3, 16)
    with pytest.raises(ValueError, match="budget=3 is below count_per_prompt=4"):
        pcl.roots([0.5] * 3, 3)
    with pytest.raises(ValueError, match=r"count_per_prompt=4 must lie in \[m_min=2, 3\]"):
        pcl.roots([0.5] * 3, 9, m_max=3)
    with pytest.raises(ValueError, match="above the cap 4"):
        pcl.roots([0.5] * 3, 10, m_max=4)
    with pytest.raises(ValueError, match="count_per_prompt must be >= 1"):
        get_allocator("pcl", count_per_prompt=0)


def test_random_tree_is_reproducible_and_respects_caps():
    rng = np.random.default_rng(3)
    n = 400
    p, r, group = rng.random(n), rng.integers(0, 2, n), rng.integers(0, 8, n)
    budgets = np.full(8, 60)
    first = get_allocator("random_tree", rng=7).prefixes(p, r, group, budgets, k_max=3)
    again = get_allocator("random_tree", rng=np.random.default_rng(7)).prefixes(p, r, group, budgets, k_max=3)
    other = get_allocator("random_tree", rng=8).prefixes(p, r, group, budgets, k_max=3)
    check_prefix_counts(first, group, budgets, 3)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # Anchors are picked uniformly: with one continuation each, the spread is random, not first-come.
    spread = get_allocator("random_tree", rng=0).prefixes(
        np.full(100, 0.5), np.ones(100, int), np.zeros(100, int), [50]
    )
    assert 10 < spread[:50].sum() < 40
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator or an int seed"):
        get_allocator("random_tree", rng="seed")
    with pytest.raises(TypeError, match="rng"):
        get_allocator("random_tree")


def test_users_register_their_own_allocator():
    @register_allocator("test_first_prompt_only")
    class FirstPromptOnly:
        def __init__(self, scale=1):
            self.scale = scale

        def roots(self, v, budget, *, m_min=2, m_max=None, eps=0.02):
            counts = np.zeros(len(v), dtype=np.int64)
            counts[0] = budget
            return counts

        def prefixes(self, p, r, group, budget_per_group, *, k_max=None, eps=0.02):
            return get_allocator("uniform").prefixes(p, r, group, budget_per_group, k_max=k_max, eps=eps)

    try:
        allocator = get_allocator("test_first_prompt_only", scale=3)
        assert allocator.scale == 3 and allocator.roots([0.5, 0.5], 6).tolist() == [6, 0]
        with pytest.raises(ValueError, match="already registered"):
            register_allocator("test_first_prompt_only")(FirstPromptOnly)
        register_allocator("test_first_prompt_only", replace=True)(FirstPromptOnly)
    finally:
        _REGISTRY.pop("test_first_prompt_only", None)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown allocator 'nope'; registered: .*trace"):
        get_allocator("nope")
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        register_allocator("")
    with pytest.raises(ValueError, match="must be callable"):
        register_allocator("test_not_callable")(42)
    try:
        register_allocator("test_bad_factory")(lambda: object())
        with pytest.raises(ValueError, match="lacks roots"):
            get_allocator("test_bad_factory")
    finally:
        _REGISTRY.pop("test_bad_factory", None)


# ---------------------------------------------------------------- objective helpers


def enumerate_mixed_probability(v: float, m: int) -> float:
    """P(both outcomes among m Bernoulli(v) draws), summed over all 2^m outcome vectors."""
    total = 0.0
    for outcome in itertools.product([0, 1], repeat=m):
        if 0 < sum(outcome) < m:
            total += math.prod(v if o else 1 - v for o in outcome)
    return total


def test_root_objective_helpers_match_enumeration():
    v = np.array([0.3, 0.02, 0.5, 0.9, 0.7])
    counts = np.array([3, 0, 6, 1, 2])
    expected = [enumerate_mixed_probability(vi, int(m)) for vi, m in zip(v, counts)]
    assert root_mixed_probability(v, counts) == pytest.approx(expected, abs=1e-12)
    assert expected_root_objective(v, counts) == pytest.approx(sum(expected), abs=1e-12)
    assert root_effective_ratio_estimate(v, counts) == pytest.approx(sum(expected) / 4, abs=1e-12)
    assert math.isnan(root_effective_ratio_estimate(v, np.zeros(5, dtype=int)))
    # v = 0 is clipped to eps = 0.02 like the allocator does.
    assert root_mixed_probability([0.0], [2]) == pytest.approx([2 * 0.02 * 0.98])


def test_tree_mixed_probability_matches_enumeration_of_continuations():
    p = np.array([0.3, 0.8, 0.6, 0.1, 0.5])
    r = np.array([0, 0, 1, 1, 1])
    group = np.array([0, 0, 1, 1, 2])
    counts = np.array([2, 1, 1, 2, 3])
    bare_mixed = np.array([False, False, True])
    expected = []
    for g in range(3):
        if bare_mixed[g]:
            expected.append(1.0)
            continue
        anchors = [a for a in range(5) for _ in range(counts[a]) if group[a] == g]
        prob_no_flip = 0.0
        for outcome in itertools.product([0, 1], repeat=len(anchors)):
            if all(o == r[a] for o, a in zip(outcome, anchors)):
                prob_no_flip += math.prod(p[a] if o else 1 - p[a] for o, a in zip(outcome, anchors))
        expected.append(1 - prob_no_flip)
    assert tree_mixed_probability(p, r, group, counts, bare_mixed) == pytest.approx(expected, abs=1e-12)
    assert tree_effective_ratio_estimate(p, r, group, counts, bare_mixed) == pytest.approx(np.mean(expected))
    assert expected_prefix_objective(p, r, counts) == pytest.approx(prefix_value(p, r, counts), abs=1e-12)


def test_helper_errors():
    with pytest.raises(ValueError, match="counts has length 2 but v has length 3"):
        root_mixed_probability([0.1, 0.2, 0.3], [2, 2])
    with pytest.raises(ValueError, match=r"counts must be >= 0 everywhere; counts\[1\] = -2"):
        expected_root_objective([0.1, 0.2], [2, -2])
    with pytest.raises(ValueError, match="bare_mixed must be a 1-D bool array"):
        tree_mixed_probability([0.5], [1], [0], [1], [0])
    with pytest.raises(ValueError, match=r"group\[0\] = 1 but budget_per_group has 1 entries"):
        tree_mixed_probability([0.5], [1], [1], [1], np.array([False]))
    with pytest.raises(ValueError, match="r has length 1 but p has length 2"):
        expected_prefix_objective([0.5, 0.5], [1], [1, 1])


# ---------------------------------------------------------------- input errors

ROOT_ERRORS = [
    (dict(v=[0.2, float("nan")], budget=4), r"v must hold probabilities in \[0, 1\] \(no NaN\); v\[1\] = nan"),
    (dict(v=[0.2, 1.5], budget=4), r"v\[1\] = 1.5"),
    (dict(v=[-0.1, 0.5], budget=4), r"v\[0\] = -0.1"),
    (dict(v=[[0.2, 0.3]], budget=4), r"v must be a 1-D array, got shape \(1, 2\)"),
    (dict(v=["a", "b"], budget=4), "v must hold real numbers"),
    (dict(v=[True, False], budget=4), "v must hold real numbers"),
    (dict(v=[0.2, 0.3], budget=-1), "budget must be >= 0, got -1"),
    (dict(v=[0.2, 0.3], budget=4.0), "budget must be an int"),
    (dict(v=[0.2, 0.3], budget=True), "budget must be an int"),
    (dict(v=[0.2, 0.3], budget=4, m_min=0), "m_min must be >= 1, got 0"),
    (dict(v=[0.2, 0.3], budget=4, m_max=0), "m_max must be >= 1, got 0"),
    (dict(v=[0.2, 0.3], budget=4, m_min=5, m_max=3), r"m_min \(5\) must be <= m_max \(3\)"),
    (dict(v=[0.2, 0.3], budget=4, eps=0.6), r"eps must be a float in \[0, 0.5\], got 0.6"),
    (dict(v=[0.2, 0.3], budget=4, eps=float("nan")), r"eps must be a float in \[0, 0.5\]"),
    (dict(v=[0.2, 0.3], budget=9, m_max=4), r"budget=9 cannot be spent exactly .*\(at most 8 in total\)"),
]


def test_roots_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('dp', 'ranked'\), got 'greedy'"):
        allocate_roots([0.5, 0.5], 4, method="greedy")


@pytest.mark.parametrize("kwargs, message", ROOT_ERRORS)
@pytest.mark.parametrize("name", ["trace", "uniform", "random_tree", "pcl", "reference"])
def test_root_input_errors(name, kwargs, message):
    kwargs = dict(kwargs)
    v, budget = kwargs.pop("v"), kwargs.pop("budget")
    if name == "reference":
        roots = allocate_roots_reference
    else:
        roots = (get_allocator(name, rng=0) if name == "random_tree" else get_allocator(name)).roots
    with pytest.raises(ValueError, match=message):
        roots(v, budget, **kwargs)


PREFIX_ERRORS = [
    (dict(p=[0.2, float("nan")]), r"p must hold probabilities in \[0, 1\] \(no NaN\); p\[1\] = nan"),
    (dict(p=[0.2, 2.0]), r"p\[1\] = 2.0"),
    (dict(r=[1, 2]), r"r must hold outcomes in \{0, 1\}; r\[1\] = 2"),
    (dict(r=[0.5, 1.0]), r"r\[0\] = 0.5"),
    (dict(r=[1]), "r has length 1 but p has length 2"),
    (dict(group=[0, 0, 0]), "group has length 3 but p has length 2"),
    (dict(group=[0, -1]), r"group must be >= 0 everywhere; group\[1\] = -1"),
    (dict(group=[0, 2]), r"group\[1\] = 2 but budget_per_group has 2 entries"),
    (dict(group=[0.0, 1.0]), "group must hold integers"),
    (dict(budget_per_group=[2]), r"group\[1\] = 1 but budget_per_group has 1 entries"),
    (dict(budget_per_group=[2, -1]), r"budget_per_group must be >= 0 everywhere; budget_per_group\[1\] = -1"),
    (dict(budget_per_group=[[2, 1]]), "budget_per_group must be a 1-D array"),
    (dict(budget_per_group=[2, 1], k_max=0), "k_max must be >= 1, got 0"),
    (
        dict(budget_per_group=[5, 1], k_max=4),
        r"budget_per_group\[0\] = 5 is not reachable: group 0 has 1 anchor\(s\) \(k_max=4, so at most 4",
    ),
    (dict(budget_per_group=[1, 1, 3]), r"budget_per_group\[2\] = 3 is not reachable: group 2 has 0 anchor\(s\)"),
    (dict(eps=-0.1), r"eps must be a float in \[0, 0.5\], got -0.1"),
]


@pytest.mark.parametrize("kwargs, message", PREFIX_ERRORS)
@pytest.mark.parametrize("name", ["trace", "uniform", "random_tree", "pcl", "reference"])
def test_prefix_input_errors(name, kwargs, message):
    args = dict(p=[0.2, 0.7], r=[1, 0], group=[0, 1], budget_per_group=[1, 1])
    args.update(kwargs)
    if name == "reference":
        prefixes = allocate_prefixes_reference
    else:
        prefixes = (get_allocator(name, rng=0) if name == "random_tree" else get_allocator(name)).prefixes
    with pytest.raises(ValueError, match=message):
        prefixes(args.pop("p"), args.pop("r"), args.pop("group"), args.pop("budget_per_group"), **args)


def test_prefix_kernel_wide_index_buffer_gives_the_same_counts():
    # allocate_prefixes hands the kernel an int32 work buffer, int64 from 2**31 anchors on; the int64
    # specialisation is exercised here directly, on an input far smaller than that.
    from trace_core.allocation.numba_loops import prefix_greedy

    rng = np.random.default_rng(4)
    n = 500
    p, r, group = rng.random(n), rng.integers(0, 2, n), rng.integers(0, 7, n)
    budgets = np.array([0, 30, 5, 60, 1, 12, 9], dtype=np.int64)
    for cap in (-1, 2):
        narrow = prefix_greedy(p, r, group, budgets, cap, EPS, np.empty(n, dtype=np.int32))
        wide = prefix_greedy(p, r, group, budgets, cap, EPS, np.empty(n, dtype=np.int64))
        assert np.array_equal(narrow, wide)
        assert np.array_equal(narrow, allocate_prefixes_reference(p, r, group, budgets, k_max=None if cap < 0 else cap))
