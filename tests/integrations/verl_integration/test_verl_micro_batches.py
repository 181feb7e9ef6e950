"""group_preserving_micro_batches: the shared-prefix actor's micro-batches (numpy only, no verl needed)."""

from __future__ import annotations

import numpy as np
import pytest

from trace_core.integrations.verl.micro_batches import group_preserving_micro_batches
from trace_core.packing.flat import pack_shared_prefixes


def grpo_rows(groups: int, n: int, *, system: int = 3, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows of `groups` prompts x n responses, all starting with the same `system` tokens (a chat
    template), shuffled; returns (rows, group of each row)."""
    rng = np.random.default_rng(seed)
    head = rng.integers(1, 50, system)
    rows, group_of = [], []
    for g in range(groups):
        prompt = np.concatenate([head, rng.integers(1, 50, int(rng.integers(4, 9)))])
        for _ in range(n):
            rows.append(np.concatenate([prompt, rng.integers(1, 50, int(rng.integers(1, 6)))]))
            group_of.append(g)
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], np.asarray(group_of)[order]


def packed_size(rows, batch) -> int:
    width = max(len(rows[i]) for i in batch)
    ids = np.zeros((len(batch), width), np.int64)
    mask = np.zeros_like(ids)
    for k, i in enumerate(batch):
        ids[k, : len(rows[i])], mask[k, : len(rows[i])] = rows[i], 1
    return len(pack_shared_prefixes(ids, mask).input_ids)


@pytest.mark.parametrize("seed", range(5))
def test_groups_that_fit_are_never_split(seed):
    rows, group_of = grpo_rows(groups=6, n=4, seed=seed)
    budget = 45  # one group packs into at most 3 + 8 + 4 * 5 = 31 tokens; two rarely fit
    batches = group_preserving_micro_batches(rows, max_tokens=budget)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(rows)))  # each row exactly once
    for batch in batches:
        assert packed_size(rows, batch) <= budget
    for g in range(6):
        assert sum(np.isin(np.flatnonzero(group_of == g), b).any() for b in batches) == 1, f"group {g} split"


def test_greedy_cut_would_split_a_group():
    """The cut goes before the smallest shared prefix, not before the row that overflowed."""
    a = [np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10][:k]) for k in (6,)]  # a group of one long row
    b = [np.array([20, 21, 22, 23, x]) for x in (1, 2, 3)]  # a group of three rows sharing 4 tokens
    rows = a + b
    # greedy would put b's first row with a (6 + 5 = 11 <= 12) and split b
    batches = group_preserving_micro_batches(rows, max_tokens=12)
    assert [sorted(x.tolist()) for x in batches] == [[0], [1, 2, 3]]


def test_count_splits_to_exactly_that_many():
    rows, group_of = grpo_rows(groups=2, n=4, seed=1)
    batches = group_preserving_micro_batches(rows, max_tokens=10_000, count=5)
    assert len(batches) == 5
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(rows)))
    batches = group_preserving_micro_batches(rows, max_tokens=10_000, count=2)
    assert sorted(sorted(group_of[b].tolist()) for b in batches) == [[0] * 4, [1] * 4]  # split between groups


def test_oversized_row_alone_and_bad_arguments():
    rows = [np.arange(1, 9), np.arange(1, 4), np.array([7, 7])]
    batches = group_preserving_micro_batches(rows, max_tokens=4)
    assert any(b.tolist() == [0] for b in batches)
    with pytest.raises(ValueError, match="max_tokens"):
        group_preserving_micro_batches(rows, max_tokens=0)
    with pytest.raises(ValueError, match="count"):
        group_preserving_micro_batches(rows, max_tokens=10, count=4)
