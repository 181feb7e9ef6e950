"""A leaf of a RolloutForest as one verl row: the prompt, the whole root-to-leaf path as the response."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trace_core.forest import ROLE_MODEL, RolloutForest
from trace_core.integrations.verl.advantage import encode_tree_uid


@dataclass(frozen=True)
class LeafRow:
    prompt_ids: list[int]  # the tree's root (the prompt)
    response_ids: list[int]  # every turn on the path: model tokens, then the observation after them
    response_mask: list[int]  # 1 on model tokens
    response_logprobs: list[float]  # sampling logprobs (0 on observation tokens)
    path: list[int]  # forest node of each turn (path[0]: the bare rollout's first turn)
    turn_ends: list[int]  # where each turn ends in the response
    reward: float
    uid: str  # encode_tree_uid(group, path, turn_ends)


def leaf_row(forest: RolloutForest, leaf: int, group: str) -> LeafRow:
    """Leaf `leaf` of `forest` as a row of tree `group` (the uid's group part)."""
    path = [int(u) for u in forest.leaf_path(leaf)]
    root, turns = path[0], path[1:]
    ids, mask, logprobs, ends = [], [], [], []
    for u in turns:
        lo, hi = int(forest.tok_start[u]), int(forest.tok_end[u])
        ids += forest.tokens[lo:hi].tolist()
        mask += (forest.role[lo:hi] == ROLE_MODEL).astype(int).tolist()
        logprobs += np.nan_to_num(forest.logprob[lo:hi]).astype(float).tolist()
        ends.append(len(ids))
    return LeafRow(
        prompt_ids=forest.node_tokens(root).tolist(),
        response_ids=ids,
        response_mask=mask,
        response_logprobs=logprobs,
        path=turns,
        turn_ends=ends,
        reward=float(forest.reward[leaf]),
        uid=encode_tree_uid(group, turns, ends),
    )
