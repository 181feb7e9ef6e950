"""Advantage estimators on hand-made trees with known answers, and their errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings

from forest_strategies import forests
from trace_core.advantage import LEAF, NODE, compute_advantages, grpo, segment, tree_grpo
from trace_core.forest import ForestError, RolloutForest

S = math.sqrt(2.0 / 9.0)  # population std of rewards [1, 0, 0]


def hand_forest():
    """prompt 0: rollout A  a1 -> {a2 (R=1), a2' (R=0)};  rollout B  b1 -> b2 (R=0).
    prompt 1: one rollout c (R=1)."""
    f = RolloutForest()
    r0 = f.add_root(0, [1])
    a1 = f.add_node(r0, [2], [True])
    a2 = f.add_node(a1, [3], [True])
    a2b = f.add_node(a1, [4], [True])
    b1 = f.add_node(r0, [2], [True])
    b2 = f.add_node(b1, [5], [True])
    r1 = f.add_root(1, [1])
    c = f.add_node(r1, [6], [True])
    for node, reward in ((a2, 1), (a2b, 0), (b2, 0), (c, 1)):
        f.set_reward(node, reward)
    return f, dict(r0=r0, a1=a1, a2=a2, a2b=a2b, b1=b1, b2=b2, r1=r1, c=c)


def test_grpo_known_values():
    f, n = hand_forest()
    adv = grpo(f)
    assert adv[n["a2"]] == pytest.approx((2 / 3) / S)
    assert adv[n["a2b"]] == pytest.approx(-(1 / 3) / S)
    assert adv[n["b2"]] == pytest.approx(-(1 / 3) / S)
    assert adv[n["c"]] == 0.0  # a single leaf has zero variance
    assert adv[[n["r0"], n["a1"], n["b1"], n["r1"]]].tolist() == [0, 0, 0, 0]  # leaves only


def test_tree_grpo_adds_the_within_rollout_zscore():
    f, n = hand_forest()
    adv = tree_grpo(f)
    assert adv[n["a2"]] == pytest.approx((2 / 3) / S + 1.0)  # rollout A: rewards [1, 0] -> +1 / -1
    assert adv[n["a2b"]] == pytest.approx(-(1 / 3) / S - 1.0)
    assert adv[n["b2"]] == pytest.approx(-(1 / 3) / S)  # rollout B alone: within-tree term 0
    assert adv[n["c"]] == 0.0


def test_segment_credit_known_values():
    f, n = hand_forest()
    adv = segment(f)
    expected = {
        "r0": 0,
        "a1": 1 / 2 - 1 / 3,
        "a2": 1 - 1 / 2,
        "a2b": 0 - 1 / 2,
        "b1": 0 - 1 / 3,
        "b2": 0 - 1 / 3,  # b1 does not branch: b2's branch point is the root
        "r1": 0,
        "c": 0,
    }
    for name, value in expected.items():
        assert adv[n[name]] == pytest.approx(value), name


@settings(max_examples=50, deadline=None)
@given(forests())
def test_zero_variance_groups_give_zero_and_groups_are_centred(forest):
    adv = grpo(forest)
    leaves = forest.leaves
    roots = forest.tree_root()[leaves]
    for r in np.unique(roots):
        group = adv[leaves[roots == r]]
        rewards = forest.reward[leaves[roots == r]]
        if rewards.min() == rewards.max():
            assert (group == 0).all()
        else:
            assert group.mean() == pytest.approx(0.0, abs=1e-9)
            assert group.std() == pytest.approx(1.0)
    tg = tree_grpo(forest)
    assert np.isfinite(tg).all() and (tg[forest.num_children > 0] == 0).all()


def test_registry_and_errors():
    f, _ = hand_forest()
    adv, kind = compute_advantages(f, "segment")
    assert kind == NODE and np.array_equal(adv, segment(f))
    assert compute_advantages(f)[1] == LEAF
    with pytest.raises(ForestError, match="advantage: unknown estimator 'ppo'"):
        compute_advantages(f, "ppo")
    empty = RolloutForest()
    with pytest.raises(ForestError, match="forest: has no leaves"):
        tree_grpo(empty)
    g = RolloutForest()
    g.add_node(g.add_root(0, [1]), [2], [True])  # reward never set
    for fn in (grpo, tree_grpo, segment):
        with pytest.raises(ForestError, match="reward: 1 leaves have no reward yet"):
            fn(g)
