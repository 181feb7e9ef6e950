"""TRACE's tree advantages as verl advantage estimators (`algorithm.adv_estimator=tree_grpo` / `segment`).

verl's `compute_advantage` (verl/trainer/ppo/ray_trainer.py) hands a registered estimator only
`token_level_rewards`, `response_mask`, `config` and `index` (the batch's `uid` column), so the tree
travels in the uid strings. A row of a TRACE batch is one leaf (prompt + every turn of its root-to-leaf
path as the response), and its uid is

    "<group>#trace:<n_1>.<n_2>...<n_T>:<e_1>.<e_2>...<e_T>"

group    the prompt's tree (any string without "#trace:"; the row uid verl gave the prompt)
n_t      the id of the leaf's turn-t node, an integer unique within the group (trace-rl's forest node
         ids); n_1 is the leaf's bare rollout ("rollout root"), a continuation shares n_1..n_t with
         the rollout it branched from at turn t and has new ids after it
e_t      where turn t ends in the response (token offset; turn t is response[e_(t-1):e_t], e_0 = 0,
         its model tokens and then the observation after them)

`encode_tree_uid` writes it, `forest_from_index` rebuilds the exact forest (structure and rewards) from a
batch's uids and rewards, and the estimators run trace-rl's own `tree_grpo` / `segment` on it. The
`trace_agent` loop (agent_loop.py) writes this uid into the extra field `trace_uid`; verl's stock
trainer keeps its own per-prompt `uid` column (its `DataProto.union` rejects a changed one), so
`adopt_tree_uids(batch)` copies `trace_uid` into `uid` before the advantages are computed
(`install_tree_uid_hook()` does that inside verl's `compute_advantage` for RayPPOTrainer).

Rows whose uid carries no "#trace:" part are one-turn bare rollouts of their uid's group, so on a plain
verl batch `tree_grpo` is GRPO with the population standard deviation (the within-rollout term of a
single leaf is 0).

Rewards: the outcome of a row is the sum of its `token_level_rewards` (as verl's GRPO reads it); tree
estimators need outcomes in [0, 1] (keep `algorithm.use_kl_in_reward=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trace_core.advantage import LEAF, compute_advantages
from trace_core.forest import ForestError, RolloutForest

TREE_MARK = "#trace:"
ESTIMATORS = ("tree_grpo", "segment")  # trace-rl estimators registered with verl under the same names


def encode_tree_uid(group: str, path: Sequence[int], turn_ends: Sequence[int]) -> str:
    """The uid of a leaf row (see module docstring)."""
    group = str(group)
    if TREE_MARK in group:
        raise ForestError("group", f"must not contain {TREE_MARK!r}, got {group!r}")
    if len(path) == 0 or len(path) != len(turn_ends):
        raise ForestError("path", f"needs one turn end per node and at least one node, got {path} / {turn_ends}")
    if any(b <= a for a, b in zip([0, *turn_ends[:-1]], turn_ends)):
        raise ForestError("turn_ends", f"must be strictly increasing and > 0, got {list(turn_ends)}")
    return f"{group}{TREE_MARK}{'.'.join(str(int(n)) for n in path)}:{'.'.join(str(int(e)) for e in turn_ends)}"


def decode_tree_uid(uid: Any, response_length: int, row: int) -> tuple[str, list[int], list[int]]:
    """(group, path, turn_ends) of a row; a plain uid is a one-turn bare rollout of its own (node id -1 - row)."""
    text = str(uid)
    if TREE_MARK not in text:
        return text, [-1 - row], [max(int(response_length), 1)]
    group, _, tail = text.rpartition(TREE_MARK)
    try:
        nodes, ends = tail.split(":")
        path = [int(x) for x in nodes.split(".")]
        turn_ends = [int(x) for x in ends.split(".")]
    except ValueError:
        raise ForestError(f"index[{row}]", f"malformed TRACE uid {text!r} (expected group#trace:n1.n2:e1.e2)") from None
    if len(path) != len(turn_ends) or any(b <= a for a, b in zip([0, *turn_ends[:-1]], turn_ends)):
        raise ForestError(f"index[{row}]", f"TRACE uid {text!r}: one strictly increasing turn end per node expected")
    return group, path, turn_ends


def forest_from_index(index: Sequence[Any], rewards: Sequence[float], response_lengths: Sequence[int]):
    """Rebuild the forest of a batch: (forest, leaf node of each row, per-row list of (forest node, start, end)).

    Node tokens are placeholders (one per turn): the estimators read structure and rewards only."""
    forest = RolloutForest()
    roots: dict[str, int] = {}  # group -> its root node
    nodes: dict[tuple[int, int], int] = {}  # (group, node id) -> forest node
    spans: dict[int, tuple[int, int, int]] = {}  # forest node -> (parent forest node, depth, end)
    leaf_of_row, row_spans = [], []
    for row, (uid, length) in enumerate(zip(index, response_lengths)):
        group, path, ends = decode_tree_uid(uid, int(length), row)
        if group not in roots:
            roots[group] = forest.add_root(len(roots), [0])
        g = parent = roots[group]
        turns, start = [], 0
        for depth, (pid, end) in enumerate(zip(path, ends), start=1):
            key = (g, pid)
            if key in nodes:
                node = nodes[key]
                if spans[node] != (parent, depth, end):
                    raise ForestError(
                        f"index[{row}]",
                        f"node {pid} of group {group!r} appears with another parent, depth or turn end in another row",
                    )
            else:
                if not np.isnan(forest.reward[parent]):
                    raise ForestError(
                        f"index[{row}]", f"passes through node {path[depth - 2]}, the leaf of another row"
                    )
                node = forest.add_node(parent, [0], [True])
                nodes[key], spans[node] = node, (parent, depth, end)
            turns.append((node, start, end))
            start, parent = end, node
        if forest.num_children[parent] > 0 or not np.isnan(forest.reward[parent]):
            raise ForestError(f"index[{row}]", f"ends at node {path[-1]}, which another row reaches or passes through")
        forest.set_reward(parent, float(rewards[row]))
        leaf_of_row.append(parent)
        row_spans.append(turns)
    return forest, np.asarray(leaf_of_row, dtype=np.int64), row_spans


def tree_advantages(
    name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] advantages (= returns) of trace-rl estimator `name` on the batch's forest."""
    scores = token_level_rewards.sum(dim=-1).double().cpu().numpy()
    if np.any(~np.isfinite(scores)) or np.any(scores < 0) or np.any(scores > 1):
        raise ForestError(
            "token_level_rewards",
            f"TRACE tree advantages need outcome rewards in [0, 1]; row sums span [{scores.min()}, {scores.max()}] "
            "(set algorithm.use_kl_in_reward=False and give 0/1 or [0, 1] scores)",
        )
    length = response_mask.shape[-1]
    forest, leaf_of_row, row_spans = forest_from_index(index, scores, [length] * len(scores))
    values, kind = compute_advantages(forest, name)
    out = torch.zeros(response_mask.shape, dtype=torch.float64)
    for row, turns in enumerate(row_spans):
        if kind == LEAF:
            out[row] = float(values[leaf_of_row[row]])
        else:
            for node, start, end in turns:
                out[row, start:end] = float(values[node])
    out = out.to(token_level_rewards.dtype).to(response_mask.device) * response_mask
    return out, out


def _estimator(name: str):
    def estimator(token_level_rewards, response_mask, index=None, config=None, **_: Any):
        if index is None:
            index = [f"row{i}" for i in range(token_level_rewards.shape[0])]
        return tree_advantages(name, token_level_rewards, response_mask, index)

    estimator.__name__ = f"trace_{name}_advantage"
    estimator.__doc__ = f"trace-rl's {name!r} advantages on the forest the batch's uids encode (see this module)."
    return estimator


_ESTIMATOR_FNS = {name: _estimator(name) for name in ESTIMATORS}


def register_estimators() -> list[str]:
    """Register `tree_grpo` and `segment` with verl's advantage-estimator registry (idempotent)."""
    from verl.trainer.ppo.core_algos import register_adv_est

    for name, fn in _ESTIMATOR_FNS.items():
        register_adv_est(name)(fn)
    return list(ESTIMATORS)


def adopt_tree_uids(data, field: str = "trace_uid"):
    """Copy the TRACE uids a `trace_agent` rollout wrote (non-tensor `field`) into `uid`, keeping verl's
    own uids as `verl_uid`. Rows without one keep their uid. Returns `data` (a verl DataProto)."""
    tree = data.non_tensor_batch.get(field)
    if tree is None:
        return data
    uid = data.non_tensor_batch.get("uid")
    if uid is None:
        uid = np.array([f"row{i}" for i in range(len(tree))], dtype=object)
    data.non_tensor_batch.setdefault("verl_uid", uid.copy())
    data.non_tensor_batch["uid"] = np.array([t if t is not None else u for t, u in zip(tree, uid)], dtype=object)
    return data


def install_tree_uid_hook() -> None:
    """Make verl's RayPPOTrainer adopt TRACE uids (`adopt_tree_uids`) right before it computes advantages.

    verl's fit loop calls the module-level `compute_advantage` of verl.trainer.ppo.ray_trainer; this
    wraps that name (once, in the driver process). Only needed when the rollouts come from `trace_agent`."""
    from verl.trainer.ppo import ray_trainer

    current = ray_trainer.compute_advantage
    if getattr(current, "_trace_adopts_uids", False):
        return

    def compute_advantage(data, *args, **kwargs):
        return current(adopt_tree_uids(data), *args, **kwargs)

    compute_advantage._trace_adopts_uids = True  # type: ignore[attr-defined]
    ray_trainer.compute_advantage = compute_advantage
