"""Packed trees and attention oracles shared by the tree-attention tests and the mixed-precision tests."""

from __future__ import annotations

import numpy as np
import torch

from trace_core.forest import RolloutForest
from trace_core.packing.forest import pack
from trace_kernels.tree_attention.naive import tree_visibility_mask


def packed_forest(trees: list[tuple[list[int], list[int]]]):
    """Pack trees given as (parent list, token count per node); parent -1 is the root.
    Node ids are per tree; trees are concatenated in order."""
    parent, prompt, lengths = [], [], []
    for t, (parents, lens) in enumerate(trees):
        base = len(parent)
        parent += [p if p < 0 else p + base for p in parents]
        prompt += [t] * len(parents)
        lengths += lens
    lengths = np.asarray(lengths)
    tok_end = np.cumsum(lengths)
    total = int(tok_end[-1])
    forest = RolloutForest.from_arrays(
        parent=np.asarray(parent),
        prompt_id=np.asarray(prompt),
        tok_start=tok_end - lengths,
        tok_end=tok_end,
        tokens=np.arange(total) % 7,
        role=np.zeros(total, np.uint8),  # roles do not matter here
    )
    return pack(forest)


def random_tree(rng: np.random.Generator, n_nodes: int, max_len: int):
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n_nodes)]
    return parents, [int(x) for x in rng.integers(1, max_len + 1, n_nodes)]


def same_dtype_attention(q, k, v, end, scale):
    """The reference math carried out in the inputs' own dtype (sets the fp16/bf16 tolerance)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(~tree_visibility_mask(end)[None], float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v)
