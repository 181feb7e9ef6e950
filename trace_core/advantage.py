"""Advantages on a rollout forest: numpy in, numpy out, usable by any trainer.

Two shapes of credit, both returned as a float64 array over forest nodes [n]:

- leaf advantages (`tree_grpo`, `grpo`): defined at leaves (0 elsewhere); every model token on a
  leaf's root-to-leaf path gets that leaf's advantage.
- node advantages (`segment`): each node's own tokens get the node's value; a token shared by
  several leaf paths gets the same credit on each of them.

`trace_core.loss.packed_loss_weights` turns either into the per-token sums the exact packed loss needs.

Estimators are selected by name (`optim.advantage` in a trainer config) from the registry ADVANTAGES; add
yours with `register_advantage("mine", fn, kind=LEAF)` (fn(forest) -> [n] float array), e.g. in a plugin.

Standard-deviation convention: population std (ddof=0) over the group's leaves; a group whose std
is <= `eps` (all rewards equal, or a single leaf) contributes exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np

from trace_core.forest import ForestError, RolloutForest
from trace_core.registry import Registry

LEAF, NODE = "leaf", "node"  # what an advantage array is indexed by (see module docstring)


def _leaf_rewards(forest: RolloutForest) -> tuple[np.ndarray, np.ndarray]:
    leaves = forest.leaves
    if leaves.size == 0:
        raise ForestError("forest", "has no leaves (no finished rollouts): there is nothing to compute advantages for")
    forest.validate_rewards()
    return leaves, forest.reward[leaves]


def grpo(forest: RolloutForest, *, eps: float = 1e-6) -> np.ndarray:
    """[n] leaf advantages: z-score of each leaf's reward among all leaves of its prompt."""
    leaves, rewards = _leaf_rewards(forest)
    out = np.zeros(forest.num_nodes)
    out[leaves] = _group_zscore(rewards, forest.tree_root()[leaves], eps)
    return out


def tree_grpo(forest: RolloutForest, *, eps: float = 1e-6) -> np.ndarray:
    """[n] leaf advantages (TRACE default, Tree-GRPO style): z-score over all leaves of the prompt
    plus z-score within the leaf's tree (its bare rollout and every continuation branched from it)."""
    leaves, rewards = _leaf_rewards(forest)
    out = np.zeros(forest.num_nodes)
    out[leaves] = _group_zscore(rewards, forest.tree_root()[leaves], eps) + _group_zscore(
        rewards, forest.rollout_root()[leaves], eps
    )
    return out


def segment(forest: RolloutForest) -> np.ndarray:
    """[n] node advantages: V(u) - V(b), with V the subtree success rate and b the nearest proper
    ancestor of u that branches (has >= 2 children) or else the root. Along an unbranched chain V is
    constant, so a whole branch segment gets one credit: how much better its subtree did than the
    branch point it left. Roots get 0."""
    _leaf_rewards(forest)
    value = forest.subtree_success_rates()
    return _segment_credit(forest.parent, forest.num_children, value)


# name -> (estimator, LEAF or NODE)
ADVANTAGES: Registry[tuple[Callable[..., np.ndarray], str]] = Registry(
    "advantage estimator",
    field="advantage",
    error=ForestError,
    unknown="unknown estimator {name!r}; choose one of {names}",
)


def register_advantage(name: str, fn: Callable[..., np.ndarray], *, kind: str = LEAF, replace: bool = False) -> None:
    """Register estimator `fn(forest) -> [n] advantages` under `name`; `kind` says what it is indexed by."""
    if kind not in (LEAF, NODE):
        raise ForestError("kind", f"must be {LEAF!r} or {NODE!r}, got {kind!r}")
    if not callable(fn):
        raise ForestError("fn", f"advantage estimator {name!r} must be callable, got {fn!r}")
    ADVANTAGES.register(name, (fn, kind), replace=replace)


register_advantage("tree_grpo", tree_grpo)
register_advantage("grpo", grpo)
register_advantage("segment", segment, kind=NODE)


def available_advantages() -> list[str]:
    return ADVANTAGES.names()


def compute_advantages(forest: RolloutForest, name: str = "tree_grpo") -> tuple[np.ndarray, str]:
    """Look an estimator up by name; returns (advantages [n], LEAF or NODE)."""
    fn, kind = ADVANTAGES.get(name)
    return fn(forest), kind


def _group_zscore(values: np.ndarray, groups: np.ndarray, eps: float) -> np.ndarray:
    """(x - group mean) / group std (ddof=0); 0 for groups with std <= eps."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, weights=values) / counts
    centred = values - mean[inverse]
    std = np.sqrt(np.bincount(inverse, weights=centred**2) / counts)
    ok = std[inverse] > eps
    return np.where(ok, centred / np.where(ok, std[inverse], 1.0), 0.0)


@numba.njit(cache=True)
def _segment_credit(parent, num_children, value):
    n = parent.size
    branch = np.full(n, -1, np.int64)  # nearest proper ancestor that branches, or the root
    out = np.zeros(n)
    for u in range(n):
        p = parent[u]
        if p < 0:
            continue
        branch[u] = p if (num_children[p] >= 2 or parent[p] < 0) else branch[p]
        out[u] = value[u] - value[branch[u]]
    return out
