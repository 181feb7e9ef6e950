"""Allocation as a pair of strategies (trace_core.allocation.modes): modes, budgets, cold start, options,
user strategies, and the Allocator adapter."""

from __future__ import annotations

import numpy as np
import pytest

from trace_core.allocation import (
    MODES,
    PREFIX_STRATEGIES,
    ROOT_STRATEGIES,
    Allocation,
    AllocationError,
    Allocator,
    PrefixStrategy,
    RootStrategy,
    StagedAllocator,
    allocate_prefixes,
    allocate_roots,
    available_modes,
    build_allocation,
    get_allocator,
    register_mode,
    register_prefix_strategy,
    register_root_strategy,
)
from trace_core.allocation.prefixes import ActivePrefixes, NoPrefixes, RandomPrefixes, UniformPrefixes
from trace_core.allocation.roots import ActiveRoots, PCLRoots, UniformRoots

RNG = np.random.default_rng
PAIRS = {  # mode -> (root, prefix, root class, prefix class, expands, uses_predictor)
    "trace": ("active", "active", ActiveRoots, ActivePrefixes, True, True),
    "uniform": ("uniform", "none", UniformRoots, NoPrefixes, False, False),
    "random_tree": ("uniform", "random", UniformRoots, RandomPrefixes, True, False),
    "pcl": ("pcl", "none", PCLRoots, NoPrefixes, False, True),
}


@pytest.fixture
def cleanup():
    """Names registered by a test, removed afterwards: cleanup.append((registry, name))."""
    added: list = []
    yield added
    for registry, name in added:
        registry.unregister(name)


@pytest.mark.parametrize("mode", sorted(PAIRS))
def test_builtin_modes_are_the_documented_pairs(mode):
    root, prefix, root_cls, prefix_cls, expands, uses_predictor = PAIRS[mode]
    allocation = build_allocation(mode)
    assert (allocation.root_name, allocation.prefix_name) == (root, prefix) == MODES.get(mode)
    assert type(allocation.root) is root_cls and type(allocation.prefix) is prefix_cls
    assert allocation.expands is expands and allocation.uses_predictor is uses_predictor
    assert isinstance(allocation.root, RootStrategy) and isinstance(allocation.prefix, PrefixStrategy)
    assert set(PAIRS) <= set(available_modes())


def test_budgets_of_expanding_and_bare_pairs():
    counts = np.array([3, 0, 5])
    for mode in ("trace", "random_tree"):
        allocation = build_allocation(mode)
        assert allocation.bare_budget(32, 2) == 32
        assert allocation.continuation_budget(counts, 2).tolist() == [6, 0, 10]
    for mode in ("uniform", "pcl"):  # every leaf is a bare rollout: the same 96 leaves per step
        allocation = build_allocation(mode)
        assert allocation.bare_budget(32, 2) == 96
        budget = allocation.continuation_budget(counts, 2)
        assert budget.tolist() == [0, 0, 0] and budget.dtype == np.int64
    assert build_allocation("trace").bare_budget(32, 0) == build_allocation("uniform").bare_budget(32, 0) == 32


def test_pcl_pair_expands_nothing_and_spends_every_leaf_on_kept_prompts():
    allocation = build_allocation("pcl", options={"count_per_prompt": 4})
    assert not allocation.expands and allocation.prefix_name == "none"
    budget = allocation.bare_budget(8, 1)  # M (1 + N): PCL's bare rollouts, no tree
    counts = allocation.root(np.array([0.95, 0.5, 0.1, 0.45, 0.6]), budget, m_min=2, m_max=8, eps=0.02, rng=RNG(0))
    assert counts.sum() == 16 and sorted(counts[counts > 0].tolist()) == [4, 4, 4, 4]
    assert counts[0] == 0  # the farthest from 0.5 is dropped
    assert not allocation.continuation_budget(counts, 1).any()
    # its prefix stage samples nothing, and refuses a budget it cannot spend
    assert allocation.prefix([0.3, 0.6], [1, 0], [0, 1], [0, 0], k_max=None, eps=0.02, rng=RNG(0)).tolist() == [0, 0]
    with pytest.raises(AllocationError, match=r"budget_per_group\[1\] = 2, but the prefix strategy 'none'") as info:
        allocation.prefix([0.3, 0.6], [1, 0], [0, 1], [0, 2], k_max=None, eps=0.02, rng=RNG(0))
    assert info.value.field == "budget_per_group"


def test_cold_replaces_the_stages_that_read_the_predictor():
    cold = build_allocation("trace").cold()
    assert (cold.root_name, cold.prefix_name) == ("uniform", "uniform")
    assert type(cold.root) is UniformRoots and type(cold.prefix) is UniformPrefixes
    assert not cold.uses_predictor and cold.expands
    mixed = build_allocation("uniform", prefix_strategy="active").cold()
    assert (mixed.root_name, mixed.prefix_name) == ("uniform", "uniform")
    # nothing reads the predictor: the same pair
    random_tree = build_allocation("random_tree")
    assert random_tree.cold() is random_tree
    # pcl's cold_start is None: it keeps running, on v = 0.5, until the predictor is ready
    pcl = build_allocation("pcl")
    assert pcl.cold() is pcl and pcl.root.cold_start is None and pcl.uses_predictor


def test_stages_can_be_mixed_by_name():
    allocation = build_allocation("uniform", root_strategy="uniform", prefix_strategy="active")
    assert (allocation.root_name, allocation.prefix_name) == ("uniform", "active")
    assert allocation.expands and allocation.uses_predictor and allocation.bare_budget(10, 3) == 10
    assert build_allocation("trace", root_strategy="pcl").describe() == "pcl/active"


def test_options_reach_the_factories_that_accept_them():
    allocation = build_allocation("trace", options={"root_method": "ranked", "count_per_prompt": 3, "unused": 1})
    assert allocation.root.root_method == "ranked"
    assert build_allocation("pcl", options={"count_per_prompt": 3}).root.count_per_prompt == 3
    # options survive cold start: the cold pair is built with them too
    pcl_roots = build_allocation("trace", root_strategy="pcl", options={"count_per_prompt": 3})
    assert pcl_roots.cold().root.count_per_prompt == 3
    with pytest.raises(AllocationError, match="root_method must be one of") as info:
        build_allocation("trace", options={"root_method": "exact"})
    assert info.value.field == "root_method"


def test_builtin_strategies_match_the_solvers_and_the_legacy_allocators():
    rng = RNG(3)
    v = rng.random(12)
    for method in ("dp", "ranked"):
        got = ActiveRoots(method)(v, 30, m_min=2, m_max=6, eps=0.02, rng=RNG(0))
        assert np.array_equal(got, allocate_roots(v, 30, m_min=2, m_max=6, method=method))
    p, r, group = rng.random(20), rng.integers(0, 2, 20), rng.integers(0, 4, 20)
    budgets = np.bincount(group, minlength=4) * 2
    assert np.array_equal(
        ActivePrefixes()(p, r, group, budgets, k_max=3, eps=0.02, rng=RNG(0)),
        allocate_prefixes(p, r, group, budgets, k_max=3),
    )
    assert np.array_equal(
        UniformRoots()(v, 30, m_min=2, m_max=6, eps=0.02, rng=RNG(0)),
        get_allocator("uniform").roots(v, 30, m_min=2, m_max=6),
    )
    # random: draws from the rng argument, so the same seed gives the same tree and another seed another one
    first = RandomPrefixes()(p, r, group, budgets, k_max=3, eps=0.02, rng=RNG(7))
    assert np.array_equal(first, RandomPrefixes()(p, r, group, budgets, k_max=3, eps=0.02, rng=RNG(7)))
    assert np.array_equal(first, get_allocator("random_tree", rng=7).prefixes(p, r, group, budgets, k_max=3))
    assert not all(
        np.array_equal(first, RandomPrefixes()(p, r, group, budgets, k_max=3, eps=0.02, rng=RNG(s)))
        for s in range(8, 12)
    )
    assert np.array_equal(np.bincount(group, weights=first, minlength=4), budgets) and first.max() <= 3
    with pytest.raises(AllocationError, match=r"needs a numpy\.random\.Generator"):
        RandomPrefixes()(p, r, group, budgets, k_max=3, eps=0.02, rng=None)


def test_staged_allocator_adapts_any_pair_to_the_allocator_api():
    allocator = StagedAllocator(build_allocation("random_tree"), rng=5)
    assert isinstance(allocator, Allocator)
    counts = allocator.roots([0.5] * 4, 8, m_min=2, m_max=4)
    assert counts.tolist() == [2, 2, 2, 2]
    k = allocator.prefixes([0.2, 0.7, 0.4], [1, 0, 1], [0, 0, 1], [3, 2], k_max=3)
    assert k[:2].sum() == 3 and k[2] == 2
    with pytest.raises(ValueError, match=r"rng must be a numpy\.random\.Generator or an int seed"):
        StagedAllocator(build_allocation("trace"), rng="seed")


def test_a_user_strategy_without_options_and_a_user_mode(cleanup):
    @register_root_strategy("test_first_only")
    class FirstOnly:  # no __init__ parameters: options are not forced on it
        uses_predictor = False
        cold_start = None

        def __call__(self, v, budget, *, m_min, m_max, eps, rng):
            counts = np.zeros(len(v), dtype=np.int64)
            counts[0] = budget
            return counts

    cleanup.append((ROOT_STRATEGIES, "test_first_only"))
    register_mode("test_first_tree", root="test_first_only", prefix="uniform")
    cleanup.append((MODES, "test_first_tree"))
    allocation = build_allocation("test_first_tree", options={"root_method": "ranked", "count_per_prompt": 2})
    assert isinstance(allocation, Allocation) and allocation.expands and not allocation.uses_predictor
    assert allocation.root([0.5, 0.5], 6, m_min=2, m_max=None, eps=0.02, rng=RNG(0)).tolist() == [6, 0]
    with pytest.raises(AllocationError, match="already registered"):
        register_root_strategy("test_first_only")(FirstOnly)
    register_root_strategy("test_first_only", FirstOnly, replace=True)
    # a mode may name a strategy registered later; building it then names the missing one
    register_mode("test_dangling", root="test_not_yet", prefix="none")
    cleanup.append((MODES, "test_dangling"))
    with pytest.raises(AllocationError, match="'test_not_yet' is not one of the registered root strategies") as info:
        build_allocation("test_dangling")
    assert info.value.field == "allocation.mode"


def test_lazy_strategy_paths_and_incomplete_strategies(cleanup):
    register_prefix_strategy("test_lazy_uniform", "trace_core.allocation.prefixes:UniformPrefixes")
    cleanup.append((PREFIX_STRATEGIES, "test_lazy_uniform"))
    assert type(build_allocation("trace", prefix_strategy="test_lazy_uniform").prefix) is UniformPrefixes

    @register_prefix_strategy("test_no_expands")
    class NoExpands:
        uses_predictor = False
        cold_start = None

        def __call__(self, p, r, group, budget_per_group, *, k_max, eps, rng):
            return np.zeros(len(p), dtype=np.int64)

    cleanup.append((PREFIX_STRATEGIES, "test_no_expands"))
    with pytest.raises(AllocationError, match="'test_no_expands' builds a NoExpands, which lacks expands") as info:
        build_allocation("trace", prefix_strategy="test_no_expands")
    assert info.value.field == "allocation.prefix_strategy"
    with pytest.raises(AllocationError, match="must be callable"):
        register_root_strategy("test_not_callable", 42)


@pytest.mark.parametrize(
    "kwargs, field, listed",
    [
        (dict(mode="best"), "allocation.mode", "pcl, random_tree, trace, uniform"),
        (dict(mode="trace", root_strategy="greedy"), "allocation.root_strategy", "active, pcl, uniform"),
        (dict(mode="trace", prefix_strategy="all"), "allocation.prefix_strategy", "active, none, random, uniform"),
    ],
)
def test_unknown_names_name_the_key_and_list_the_registered(kwargs, field, listed):
    with pytest.raises(AllocationError) as info:
        build_allocation(**kwargs)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ") and listed in str(info.value)
    assert isinstance(info.value, ValueError)


def test_register_mode_checks_its_arguments(cleanup):
    with pytest.raises(AllocationError, match="root must name a registered root strategy"):
        register_mode("test_bad", root="", prefix="none")
    with pytest.raises(AllocationError, match="already registered"):
        register_mode("trace", root="uniform", prefix="none")
    assert MODES.get("trace") == ("active", "active")
