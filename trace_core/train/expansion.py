"""Stage 2 of a step (docs/method.md step 3): continuations from turn prefixes, over one or more rounds.

Round 1 branches from the bare rollouts' turn prefixes (their non-final turns). Round r > 1 (OURS,
`allocation.expansion_rounds`) branches from the prefixes round r-1's continuations added after their
branch point; a round with no new prefix anywhere branches from every prefix so far, so the step
still samples its full budget. Each prompt's continuation budget (m_i * N) is split evenly over the
rounds, the first rounds taking the remainder.

Over several ranks (`exchange`, trace_core/train/distributed.py) each rank holds the trees of its own prompts;
whether a round has anchors, the prefix strategy and the budget moved between prompts are decided on every
rank's anchors together, in the order one process would hold them, so the step samples what one process does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from trace_core.forest import RolloutForest
from trace_core.rollout import Generated


@dataclass
class Expansion:
    """What Stage 2 sampled, and the predictions it made on the way (over all rounds)."""

    anchors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [A] forest nodes expanded from
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [A] Vhat of each at allocation time
    outcome: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [A] reward of the episode that wrote it
    reassigned: int = 0  # budget moved to other prompts because a prompt had no anchor in a round
    rounds: int = 0

    def add(self, anchors, predicted, outcome, moved) -> None:
        self.anchors = np.concatenate([self.anchors, anchors])
        self.predicted = np.concatenate([self.predicted, predicted])
        self.outcome = np.concatenate([self.outcome, outcome])
        self.reassigned += moved
        self.rounds += 1


def expand_prefixes(
    forest: RolloutForest,
    bare: Generated,
    budget: np.ndarray,
    *,
    rounds: int,
    predict: Callable[[np.ndarray], np.ndarray],
    allocate: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    expand: Callable[[np.ndarray, np.ndarray], Generated],
    exchange=None,
) -> Expansion:
    """Run Stage 2 on `forest` (which holds the bare rollouts `bare`).

    budget [B]        continuations per prompt id (m_i * N)
    predict(nodes)    [A] Vhat of anchor nodes
    allocate(p, r, group, budget_per_group) -> [A] continuations per anchor (the prefix strategy)
    expand(anchors, counts) -> what the engine added
    exchange          several ranks: a distributed.AnchorExchange (None: one process)
    """
    out = Expansion()
    fresh = bare.nodes
    for share in round_shares(budget, rounds):
        anchors = turn_prefixes(forest, fresh)
        if not (anchors.size if exchange is None else exchange.any(anchors)):
            anchors = turn_prefixes(forest, np.arange(forest.num_nodes))
        if not (anchors.size if exchange is None else exchange.any(anchors)):
            break
        outcome = forest.reward[forest.episode_leaf(anchors)]
        predicted = predict(anchors)
        group = forest.prompt_id[anchors]
        if exchange is None:
            round_budget, moved = prefix_budgets(share, group)
            counts = allocate(predicted, outcome, group, round_budget)
        else:  # the whole round's anchors on every rank; this rank's counts are its anchors' share
            all_predicted, all_outcome, all_group, mine = exchange.gather(anchors, predicted, outcome, group)
            round_budget, moved = prefix_budgets(share, all_group)
            counts = np.asarray(allocate(all_predicted, all_outcome, all_group, round_budget))[mine]
        fresh = expand(anchors, counts).nodes
        if exchange is not None:
            exchange.expanded(anchors, fresh)
        out.add(anchors, predicted, outcome, moved)
    return out


def turn_prefixes(forest: RolloutForest, nodes: np.ndarray) -> np.ndarray:
    """The anchors among `nodes`: turns (never roots) that have a next turn (never an episode's last)."""
    nodes = np.asarray(nodes, dtype=np.int64)
    return nodes[(forest.depth[nodes] >= 1) & (forest.num_children[nodes] > 0)]


def round_shares(budget: np.ndarray, rounds: int) -> list[np.ndarray]:
    """budget[i] split over `rounds`: as even as integers allow, the first rounds one more."""
    budget = np.asarray(budget, dtype=np.int64)
    return [budget // rounds + (r < budget % rounds) for r in range(rounds)]


def prefix_budgets(budget: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-prompt continuation budgets. A prompt whose bare rollouts all ended after one turn has no
    anchor; its share goes to the prompts that have anchors (in proportion to their budgets, ties to
    the lowest ids) so every step samples the same number of leaves. Returns (budgets, moved)."""
    budget = np.asarray(budget, dtype=np.int64).copy()
    has_anchor = np.zeros(budget.size, dtype=bool)
    has_anchor[group] = True
    moved = int(budget[~has_anchor].sum())
    budget[~has_anchor] = 0
    if moved and has_anchor.any():
        base = np.where(has_anchor, np.maximum(budget, 1), 0).astype(np.float64)
        share = np.floor(moved * base / base.sum()).astype(np.int64)
        rest = moved - int(share.sum())
        share[np.flatnonzero(has_anchor)[:rest]] += 1
        budget += share
    return budget, moved
