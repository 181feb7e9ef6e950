"""Packing: the packed layout reproduces every leaf sequence, its attention and its labels exactly."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forest_strategies import ancestors_or_self, forests
from trace_core.forest import ForestError, RolloutForest
from trace_core.packing.forest import pack, pack_reference, split_by_tokens, unpack
from trace_core.synthetic_forest import synthetic_forest

SETTINGS = settings(max_examples=80, deadline=None)


@SETTINGS
@given(forests())
def test_numba_packer_equals_plain_python_packer(forest):
    assert pack(forest).equals(pack_reference(forest))


@SETTINGS
@given(forests())
def test_unpack_restores_every_leaf_sequence(forest):
    packed = pack(forest)
    sequences = forest.leaf_sequences()
    assert packed.leaf_nodes.tolist() == forest.leaves.tolist()
    for seq, ids, mask, lp in zip(
        sequences, unpack(packed), unpack(packed, packed.loss_mask), unpack(packed, packed.old_logprobs), strict=True
    ):
        np.testing.assert_array_equal(ids, seq.token_ids)
        np.testing.assert_array_equal(mask, seq.loss_mask)
        np.testing.assert_array_equal(lp, seq.logprobs)
    assert packed.num_leaf_path_tokens == sum(s.token_ids.size for s in sequences)
    assert packed.num_tokens == forest.num_tokens  # each node's tokens exactly once


@SETTINGS
@given(forests())
def test_end_rule_equals_ancestor_relation(forest):
    packed = pack(forest)
    node = packed.node_of_token
    n = packed.num_tokens
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    by_end = (j <= i) & (i < packed.end[None, :])
    brute = np.zeros((n, n), dtype=bool)
    for q in range(n):
        visible_nodes = ancestors_or_self(forest, node[q])
        for k in range(q + 1):
            brute[q, k] = node[k] in visible_nodes
    np.testing.assert_array_equal(by_end, brute)


@SETTINGS
@given(forests())
def test_position_ids_are_positions_in_the_leaf_sequences(forest):
    packed = pack(forest)
    for positions in unpack(packed, packed.position_ids):
        np.testing.assert_array_equal(positions, np.arange(positions.size))


@SETTINGS
@given(forests())
def test_label_pairs_are_the_next_token_pairs_of_all_leaves_once(forest):
    packed = pack(forest)
    pairs = list(zip(packed.label_rows.tolist(), packed.label_pos.tolist()))
    assert len(pairs) == len(set(pairs))  # each pair once
    offsets, index = packed.leaf_token_index()
    expected = set()
    for a, b in zip(offsets[:-1], offsets[1:]):
        path = index[a:b]
        expected.update(zip(path[:-1].tolist(), path[1:].tolist()))
    assert set(pairs) == expected
    np.testing.assert_array_equal(packed.labels, packed.input_ids[packed.label_pos])
    assert packed.label_rows.size == packed.num_tokens - forest.roots.size
    # the leaf sequences' own next-token targets, read through the pairs
    target_of_row = {}
    for row, label in zip(packed.label_rows.tolist(), packed.labels.tolist()):
        target_of_row.setdefault(row, set()).add(label)
    for seq, idx in zip(forest.leaf_sequences(), (index[a:b] for a, b in zip(offsets[:-1], offsets[1:]))):
        for t in range(seq.token_ids.size - 1):
            assert seq.token_ids[t + 1] in target_of_row[int(idx[t])]


@SETTINGS
@given(forests())
def test_leaf_count_is_the_token_multiplicity_over_leaf_paths(forest):
    packed = pack(forest)
    _, index = packed.leaf_token_index()
    np.testing.assert_array_equal(packed.leaf_count, np.bincount(index, minlength=packed.num_tokens))


@SETTINGS
@given(forests(), st.data())
def test_packing_a_subset_of_trees(forest, data):
    roots = forest.roots
    chosen = data.draw(st.lists(st.sampled_from(roots.tolist()), min_size=1, unique=True))
    packed = pack(forest, roots=chosen)
    assert packed.equals(pack_reference(forest, roots=chosen))
    assert packed.root_nodes.tolist() == chosen
    leaves = [leaf for leaf in forest.leaves if forest.leaf_path(leaf)[0] in chosen]
    assert packed.leaf_nodes.tolist() == sorted(leaves)
    for leaf, ids in zip(packed.leaf_nodes, unpack(packed)):
        np.testing.assert_array_equal(ids, forest.leaf_sequence(leaf).token_ids)
    sizes = np.diff(packed.tree_offsets)
    for r, size in zip(chosen, sizes):
        assert size == sum(
            forest.tok_end[u] - forest.tok_start[u]
            for u in range(forest.num_nodes)
            if forest.prompt_id[u] == forest.prompt_id[r]
        )


def test_known_layout():
    """0:[a b] -> 1:[c] -> {2:[d e], 3:[f]};  0 -> 4:[g];  a second tree 5:[h] -> 6:[i]."""
    f = RolloutForest()
    r = f.add_root(0, [10, 11])
    n1 = f.add_node(r, [12], [True])
    f.add_node(n1, [13, 14], [True, False])
    f.add_node(n1, [15], [True])
    f.add_node(r, [16], [True])
    r2 = f.add_root(1, [17])
    f.add_node(r2, [18], [True])
    p = pack(f)
    assert p.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 16, 17, 18]
    assert p.position_ids.tolist() == [0, 1, 2, 3, 4, 3, 2, 0, 1]
    assert p.end.tolist() == [7, 7, 6, 5, 5, 6, 7, 9, 9]
    assert p.leaf_count.tolist() == [3, 3, 2, 1, 1, 1, 1, 1, 1]
    assert p.loss_mask.tolist() == [False, False, True, True, False, True, True, False, True]
    assert list(zip(p.label_rows.tolist(), p.label_pos.tolist())) == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
        (2, 5),
        (1, 6),
        (7, 8),
    ]
    assert p.tree_offsets.tolist() == [0, 7, 9]
    assert p.end.dtype == np.int32 and p.input_ids.dtype == np.int64


def test_unpack_torch_values_and_errors():
    f = synthetic_forest(np.random.default_rng(1), num_prompts=2, rollouts=2, turns=3, continuations=2)
    p = pack(f)
    hidden = torch.randn(p.num_tokens, 3)
    for leaf, rows in zip(p.leaf_nodes, unpack(p, hidden)):
        seq = f.leaf_sequence(leaf)
        assert rows.shape == (seq.token_ids.size, 3)
    first = unpack(p, hidden)[0]
    offsets, index = p.leaf_token_index()
    torch.testing.assert_close(first, hidden[torch.as_tensor(index[: offsets[1]])])
    with pytest.raises(ForestError, match="values: has leading size 3"):
        unpack(p, np.zeros(3))
    with pytest.raises(ForestError, match="roots: node 1 is not a root"):
        pack(f, roots=[1])
    with pytest.raises(ForestError, match="roots: node 999 does not exist"):
        pack(f, roots=[999])
    with pytest.raises(ForestError, match="more than once"):
        pack(f, roots=[0, 0])


def test_unpack_accepts_lists_and_names_bad_arguments():
    # issue 19: unpack with a Python list raised AttributeError ('list' object has no attribute 'shape')
    f = synthetic_forest(np.random.default_rng(1), num_prompts=2, rollouts=2, turns=3, continuations=2)
    p = pack(f)
    values = list(range(p.num_tokens))
    for got, want in zip(unpack(p, values), unpack(p, np.arange(p.num_tokens)), strict=True):
        np.testing.assert_array_equal(got, want)
    rows = [[float(i), -float(i)] for i in range(p.num_tokens)]
    assert [u.shape[1] for u in unpack(p, tuple(rows))] == [2] * p.num_leaves
    with pytest.raises(ForestError, match="values: has leading size 2"):
        unpack(p, [1, 2])
    with pytest.raises(ForestError, match="values: must have a leading dimension"):
        unpack(p, 5)
    with pytest.raises(TypeError, match="values: not a numpy array, torch tensor or regular array-like"):
        unpack(p, [[1], [1, 2]] * p.num_tokens)
    with pytest.raises(TypeError, match="packed: must be a PackedTree"):
        unpack(values)


def test_pack_validates_the_forest():
    f = RolloutForest()
    f.add_root(0, [1, 2])  # a prompt without turns
    with pytest.raises(ForestError, match="empty trajectory"):
        pack(f)


def test_deep_chain_does_not_recurse():
    f = RolloutForest()
    u = f.add_root(0, [1])
    for _ in range(5000):  # deeper than Python's recursion limit
        u = f.add_node(u, [2], [True])
    f.set_reward(u, 1.0)
    p = pack(f)
    assert p.position_ids[-1] == 5000 and p.end.max() == 5001
    assert p.equals(pack_reference(f))


def test_split_by_tokens_keeps_trees_whole_and_within_budget():
    f = synthetic_forest(np.random.default_rng(2), num_prompts=12, rollouts=2, turns=3, continuations=2)
    sizes = {int(r): int(((f.tok_end - f.tok_start)[f.tree_root() == r]).sum()) for r in f.roots}
    budget = max(sizes.values()) + 5
    batches = split_by_tokens(f, budget)
    assert np.concatenate(batches).tolist() == f.roots.tolist()  # every tree once, in order
    for batch in batches:
        assert pack(f, roots=batch).num_tokens == sum(sizes[int(r)] for r in batch) <= budget
    for a, b in zip(batches[:-1], batches[1:]):  # greedy: the next tree did not fit
        assert sum(sizes[int(r)] for r in a) + sizes[int(b[0])] > budget
    assert len(split_by_tokens(f, sum(sizes.values()))) == 1
    with pytest.raises(ForestError, match="max_tokens: 3 is smaller than the tree of prompt 0"):
        split_by_tokens(f, 3)
    with pytest.raises(ForestError, match="max_tokens: must be positive"):
        split_by_tokens(f, 0)
    alone = split_by_tokens(f, 3, oversized="alone")  # every tree is too big: one micro-batch each
    assert [b.tolist() for b in alone] == [[int(r)] for r in f.roots]
    with pytest.raises(ForestError, match="oversized: must be"):
        split_by_tokens(f, 3, oversized="drop")
