"""pack_shared_prefixes: a flat padded batch as prefix trees, each distinct prefix once.

The oracle is the definition: packed token p stands for one distinct prefix; every sequence
position maps to the packed token of its prefix; a packed query sees exactly the keys of its own
prefix under the tree attention rule; labels are the next tokens.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trace_core.packing.flat import SequenceBatchError, pack_shared_prefixes, shared_prefix_micro_batches


def padded(seqs: list[list[int]], left: list[int] | None = None, width: int | None = None, pad: int = 0):
    """Rows with `left[b]` pad tokens before the sequence and the rest after it."""
    left = left or [0] * len(seqs)
    width = width or max(lp + len(s) for lp, s in zip(left, seqs))
    ids = np.full((len(seqs), width), pad, np.int64)
    mask = np.zeros((len(seqs), width), np.int64)
    for b, (lp, s) in enumerate(zip(left, seqs)):
        ids[b, lp : lp + len(s)] = s
        mask[b, lp : lp + len(s)] = 1
    return ids, mask


def check_pack(seqs, left=None):
    ids, mask = padded(seqs, left)
    packed = pack_shared_prefixes(ids, mask)
    prefixes = {tuple(s[: t + 1]) for s in seqs for t in range(len(s))}
    assert packed.num_tokens == len(prefixes)  # each distinct prefix once: sharing is maximal
    assert packed.num_sequence_tokens == sum(map(len, seqs))
    assert packed.num_trees == len({s[0] for s in seqs})

    end = packed.end.astype(np.int64)
    visible = [np.flatnonzero((np.arange(packed.num_tokens) <= q) & (q < end)) for q in range(packed.num_tokens)]
    for b, s in enumerate(seqs):
        cols = np.flatnonzero(mask[b])
        index = packed.token_index[b, cols]
        assert (packed.token_index[b, mask[b] == 0] == -1).all()
        np.testing.assert_array_equal(packed.input_ids[index], s)
        np.testing.assert_array_equal(packed.position_ids[index], np.arange(len(s)))
        for t, q in enumerate(index):  # query (b, t) sees exactly the packed tokens of s[:t+1]
            np.testing.assert_array_equal(visible[q], np.sort(index[: t + 1]))
        pairs = packed.pair_index[b, cols]
        assert pairs[0] == -1 and (packed.pair_index[b, mask[b] == 0] == -1).all()
        np.testing.assert_array_equal(packed.label_rows[pairs[1:]], index[:-1])
        np.testing.assert_array_equal(packed.labels[pairs[1:]], s[1:])
    return packed


def test_grpo_group_shares_the_prompt():
    prompt = [5, 6, 7, 8]
    seqs = [prompt + [1, 2, 3], prompt + [1, 4], prompt + [9, 9, 9, 9], prompt + [9, 9, 2]]
    packed = check_pack(seqs, left=[2, 2, 0, 1])
    # prompt once, then the completions' own shared prefixes ([1], [9, 9]) once
    assert packed.num_tokens == 4 + (1 + 2 + 1) + (2 + 2 + 1)


def test_duplicates_and_prefix_rows_share_everything():
    packed = check_pack([[3, 4, 5], [3, 4, 5], [3, 4], [3], [7, 1]])
    assert packed.num_tokens == 3 + 2 and packed.num_trees == 2


def test_single_token_rows_have_no_pairs():
    packed = check_pack([[4], [4], [2]])
    assert packed.labels.size == 0 and (packed.pair_index == -1).all()


def test_torch_bool_mask_and_no_mask():
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]])
    a = pack_shared_prefixes(ids, torch.ones_like(ids, dtype=torch.bool))
    np.testing.assert_array_equal(pack_shared_prefixes(ids, torch.ones(2, 3)).end, a.end)  # float 0/1 masks
    b = pack_shared_prefixes(ids)
    np.testing.assert_array_equal(a.input_ids, [1, 2, 3, 4])
    np.testing.assert_array_equal(a.end, b.end)
    np.testing.assert_array_equal(a.end, [4, 4, 3, 4])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_batches(data):
    """Random batches over a 3-token vocabulary (lots of accidental sharing), random padding."""
    seqs = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=7), min_size=1, max_size=9))
    left = data.draw(st.lists(st.integers(0, 3), min_size=len(seqs), max_size=len(seqs)))
    check_pack(seqs, left)


@pytest.mark.parametrize(
    "input_ids, mask, match",
    [
        (np.zeros(4, np.int64), None, r"input_ids: must be 2-D \[batch, length\]"),
        (np.zeros((0, 3), np.int64), None, "input_ids: has no sequences"),
        (np.zeros((2, 3)), None, "input_ids: must hold integers"),
        (np.zeros((2, 3), np.int64), np.ones((2, 4)), r"attention_mask: has shape \(2, 4\), expected \(2, 3\)"),
        (np.zeros((2, 3), np.int64), np.full((2, 3), 2), "attention_mask: must hold only 0 and 1"),
        (np.zeros((2, 3), np.int64), [[1, 1, 1], [0, 0, 0]], "attention_mask: row 1 has no tokens"),
        (np.zeros((2, 3), np.int64), [[1, 1, 1], [1, 0, 1]], "attention_mask: row 1 has padding between its tokens"),
        (np.zeros((2, 3), np.int64), np.full((2, 3), 0.5), "attention_mask: must hold only 0 and 1"),
        (np.zeros((2, 3), np.int64), np.full((2, 3), "a"), "attention_mask: must hold only 0 and 1"),
        (np.zeros((2, 3), bool), None, "input_ids: must hold integers, got dtype bool"),
        ([[1, 2, 3], [1, -5, 3]], None, "input_ids: row 1 has a negative token id -5"),
    ],
)
def test_bad_input_names_the_field(input_ids, mask, match):
    with pytest.raises(SequenceBatchError, match=match):
        pack_shared_prefixes(input_ids, mask)


@pytest.mark.parametrize(
    "row",
    [
        [1, 1, 1, 0, 1, 1, 1, 1],  # issue 19: the pad was scored and the last real token dropped
        [0, 1, 1, 0, 1, 1, 1, 0],  # left and right padding around a hole
        [1, 0, 1, 0, 1, 0, 1, 1],  # several holes
        [1, 1, 1, 1, 1, 1, 0, 1],  # a hole just before the last token
    ],
)
def test_mask_with_a_hole_raises_naming_attention_mask_and_row(row):
    ids = np.arange(1, 17, dtype=np.int64).reshape(2, 8)
    mask = np.array([[1] * 8, row])
    for call in (pack_shared_prefixes, lambda i, m: shared_prefix_micro_batches(i, m, max_tokens=64)):
        with pytest.raises(SequenceBatchError, match="attention_mask: row 1 has padding between its tokens") as info:
            call(ids, mask)
        assert info.value.field == "attention_mask"


def test_left_and_right_padding_stay_supported():
    ids = np.arange(1, 25, dtype=np.int64).reshape(3, 8)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]])
    packed = pack_shared_prefixes(ids, mask)
    for b in range(3):
        np.testing.assert_array_equal(packed.input_ids[packed.token_index[b][mask[b] == 1]], ids[b][mask[b] == 1])


def test_padding_token_values_are_ignored():
    """Whatever sits under the padding (negative ids included) is never read."""
    ids, mask = padded([[4, 5, 6], [4, 5]], left=[1, 0], pad=-100)
    packed = pack_shared_prefixes(ids, mask)
    np.testing.assert_array_equal(packed.input_ids, [4, 5, 6])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_micro_batches_cover_every_row_within_the_budget(data):
    seqs = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=7), min_size=1, max_size=12))
    max_tokens = data.draw(st.integers(7, 20))
    ids, mask = padded(seqs, data.draw(st.lists(st.integers(0, 2), min_size=len(seqs), max_size=len(seqs))))
    batches = shared_prefix_micro_batches(ids, mask, max_tokens=max_tokens)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(seqs)))
    sizes = [pack_shared_prefixes(ids[rows], mask[rows]).num_tokens for rows in batches]
    assert max(sizes) <= max_tokens
    # greedy: a micro-batch was closed only because the next row did not fit
    for rows, _size, following in zip(batches, sizes, batches[1:]):
        merged = np.concatenate([rows, following[:1]])
        assert pack_shared_prefixes(ids[merged], mask[merged]).num_tokens > max_tokens


def test_micro_batches_keep_groups_together():
    prompt_a, prompt_b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    seqs = [prompt_a + [1], prompt_b + [1], prompt_a + [2], prompt_b + [2], prompt_a + [3], prompt_b + [3]]
    ids, mask = padded(seqs)
    batches = shared_prefix_micro_batches(ids, mask, max_tokens=8)  # one prompt + 3 completions each
    assert [sorted(rows.tolist()) for rows in batches] == [[0, 2, 4], [1, 3, 5]]


def test_micro_batch_errors_and_oversized_rows():
    ids, mask = padded([[1, 2, 3, 4, 5], [1, 2]])
    with pytest.raises(SequenceBatchError, match=r"max_tokens: 4 is smaller than row 0 \(5 tokens\)"):
        shared_prefix_micro_batches(ids, mask, max_tokens=4)
    assert [b.tolist() for b in shared_prefix_micro_batches(ids, mask, max_tokens=4, oversized="alone")] == [[1], [0]]
    with pytest.raises(SequenceBatchError, match="max_tokens: must be a positive integer"):
        shared_prefix_micro_batches(ids, mask, max_tokens=0)
    with pytest.raises(SequenceBatchError, match="oversized: must be 'error' or 'alone'"):
        shared_prefix_micro_batches(ids, mask, max_tokens=9, oversized="split")
