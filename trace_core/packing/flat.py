"""Pack a flat batch of sequences as prefix trees: every distinct prefix once.

Trainers built on flat batches (verl, TRL, OpenRLHF) run GRPO groups whose n completions repeat
one prompt, so a per-sequence forward computes each prompt n times. `pack_shared_prefixes` finds
the shared prefixes by token (a radix trie over the sequences, so any common prefix counts, not
only the prompt) and lays the trie out exactly like `packing.pack` lays out a rollout tree:

    nodes in DFS pre-order, each node's tokens once;
    end[p] = end of the subtree range of p's node  ->  query i sees key j  iff  j <= i < end[j]
    position_ids[p] = depth of p (its index in every sequence that passes through it)

so `integrations.hf.tree_forward` runs it in one pass with the tree attention kernel. The packed
hidden state of position t of sequence b is exactly the per-sequence one: a causal LM's output at t
depends only on tokens 0..t, which are the same for all sequences through that packed token.

Labels: every packed token but a tree's first is predicted by one packed row (its predecessor on
the path), giving M = N - R (row, label) pairs for `trace_kernels.linear_logprob`.
`pair_index[b, t]` says which pair gives log p(input_ids[b, t] | input_ids[b, :t]).

numpy only (no torch); the radix trie comes from sorting the sequences and the longest common
prefixes of sorted neighbours, so the work is O(B log B) comparisons plus O(total tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike

    # what the public functions accept: a numpy array (or array-like) or a torch tensor on any device
    ArrayOrTensor = ArrayLike | torch.Tensor


class SequenceBatchError(ValueError):
    """Invalid flat-batch input. `field` names the offending argument."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, eq=False)
class SharedPrefixPack:
    """B padded sequences of width L packed as prefix trees: N packed tokens, M pairs, R trees.

    Per packed token [N]: input_ids int64, position_ids int64 (path depth), end int32 (attention rule)
    Per label pair [M = N - R]: label_rows int64 (packed row that predicts), labels int64
    Per input position [B, L]:
      token_index int64  packed position of input_ids[b, t]; -1 at padding
      pair_index  int64  pair that predicts input_ids[b, t]; -1 at padding and at each sequence's
                         first token (nothing predicts it)
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    end: np.ndarray
    label_rows: np.ndarray
    labels: np.ndarray
    token_index: np.ndarray
    pair_index: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Packed tokens N (what the model runs)."""
        return int(self.input_ids.size)

    @property
    def num_sequence_tokens(self) -> int:
        """Tokens of the sequences as given (what a per-sequence forward runs, padding excluded)."""
        return int((self.token_index >= 0).sum())

    @property
    def num_trees(self) -> int:
        return self.num_tokens - int(self.labels.size)

    @property
    def token_saving(self) -> float:
        """Sequence tokens per packed token (1.0: nothing shared)."""
        return self.num_sequence_tokens / self.num_tokens


def as_numpy(values: ArrayOrTensor) -> np.ndarray:
    """A numpy view of an array-like or a torch tensor (on any device)."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)


def _as_2d_ints(values: ArrayOrTensor, field: str) -> np.ndarray:
    array = as_numpy(values)
    if array.ndim != 2:
        raise SequenceBatchError(field, f"must be 2-D [batch, length], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise SequenceBatchError(field, f"must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _valid_spans(input_ids: np.ndarray, attention_mask: ArrayOrTensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(start [B], stop [B]): each row's tokens are input_ids[b, start:stop] (one contiguous run)."""
    B, L = input_ids.shape
    if B == 0:
        raise SequenceBatchError("input_ids", "has no sequences (batch size 0)")
    if attention_mask is None:
        return np.zeros(B, np.int64), np.full(B, L, np.int64)
    mask = as_numpy(attention_mask)
    if mask.shape != input_ids.shape:
        raise SequenceBatchError("attention_mask", f"has shape {mask.shape}, expected {input_ids.shape} like input_ids")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)) or np.any((mask != 0) & (mask != 1)):
        raise SequenceBatchError("attention_mask", "must hold only 0 and 1 (or booleans)")
    mask = mask.astype(bool)
    count = mask.sum(axis=1)
    empty = np.flatnonzero(count == 0)
    if empty.size:
        raise SequenceBatchError("attention_mask", f"row {empty[0]} has no tokens")
    start = mask.argmax(axis=1)
    stop = start + count
    # one contiguous run per row (left padding, right padding or both; no holes): the run from the
    # first to the last 1 must hold exactly `count` tokens
    last = L - 1 - mask[:, ::-1].argmax(axis=1)
    holes = np.flatnonzero(last + 1 != stop)
    if holes.size:
        raise SequenceBatchError(
            "attention_mask",
            f"row {holes[0]} has padding between its tokens; each row's tokens must be one contiguous run",
        )
    return start.astype(np.int64), stop.astype(np.int64)


def _sorted_lcp(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(order [B], lcp [B]): sequences in lexicographic token order; lcp[k] = common prefix length
    of sorted neighbours k-1 and k (lcp[0] = 0). A prefix of a sequence sorts before it."""
    # big-endian fixed-width bytes compare like the token lists (memcmp in C)
    keys = [s.astype(">u8").tobytes() for s in seqs]
    order = np.array(sorted(range(len(seqs)), key=keys.__getitem__), dtype=np.int64)
    lcp = np.zeros(len(seqs), np.int64)
    for k in range(1, len(seqs)):
        a, b = seqs[order[k - 1]], seqs[order[k]]
        m = min(a.size, b.size)
        differ = np.flatnonzero(a[:m] != b[:m])
        lcp[k] = differ[0] if differ.size else m
    return order, lcp


def pack_shared_prefixes(input_ids: ArrayOrTensor, attention_mask: ArrayOrTensor | None = None) -> SharedPrefixPack:
    """Pack the rows of a padded batch as prefix trees (see the module docstring).

    input_ids [B, L] int (numpy or torch); attention_mask [B, L] 0/1 or bool (None: no padding).
    Each row's tokens must be one contiguous run of the mask (left and/or right padding, as
    verl and TRL lay out prompt + completion); a hole (a 0 between 1s) raises SequenceBatchError. Identical rows and rows that are prefixes of
    others share every token.
    """
    input_ids = _as_2d_ints(input_ids, "input_ids")
    start, stop = _valid_spans(input_ids, attention_mask)
    seqs = [input_ids[b, start[b] : stop[b]] for b in range(input_ids.shape[0])]
    bad = next((b for b, s in enumerate(seqs) if s.min() < 0), None)
    if bad is not None:
        raise SequenceBatchError(
            "input_ids", f"row {bad} has a negative token id {int(seqs[bad].min())} inside its attention mask"
        )
    order, lcp = _sorted_lcp(seqs)

    B, L = input_ids.shape
    total = int((stop - start).sum())
    tokens = np.empty(total, np.int64)  # upper bound on the packed size
    depth = np.empty(total, np.int64)
    pred = np.empty(total, np.int64)  # predecessor row on the path; -1 at a tree's first token
    end = np.empty(total, np.int64)
    token_index = np.full((B, L), -1, np.int64)
    cursor = 0

    # DFS over groups of sorted sequences [a, b) that share their first d tokens. A group's node
    # holds tokens [d, h), h = the group's common prefix (a single sequence: its whole length);
    # its children are the sub-groups split where neighbours share exactly h tokens.
    roots = np.flatnonzero(lcp == 0).tolist() + [len(seqs)]
    stack: list[tuple] = [("node", a, b, 0, -1) for a, b in zip(roots[-2::-1], roots[:0:-1])]
    while stack:
        item = stack.pop()
        if item[0] == "exit":
            _, node_start, node_stop = item
            end[node_start:node_stop] = cursor
            continue
        _, a, b, d, parent_row = item
        h = seqs[order[a]].size if b - a == 1 else int(lcp[a + 1 : b].min())
        if h == d:  # a sequence that ends where its group's shared prefix ends: nothing of its own
            continue
        node_start, node_stop = cursor, cursor + h - d
        tokens[node_start:node_stop] = seqs[order[a]][d:h]
        depth[node_start:node_stop] = np.arange(d, h)
        pred[node_start] = parent_row
        pred[node_start + 1 : node_stop] = np.arange(node_start, node_stop - 1)
        for row in order[a:b]:
            token_index[row, start[row] + d : start[row] + h] = np.arange(node_start, node_stop)
        cursor = node_stop
        stack.append(("exit", node_start, node_stop))
        if b - a > 1:
            cuts = [a] + (a + 1 + np.flatnonzero(lcp[a + 1 : b] == h)).tolist() + [b]
            stack.extend(("node", lo, hi, h, node_stop - 1) for lo, hi in zip(cuts[-2::-1], cuts[:0:-1]))

    tokens, depth, pred, end = tokens[:cursor], depth[:cursor], pred[:cursor], end[:cursor]
    has_pair = pred >= 0
    pair_of_token = np.where(has_pair, np.cumsum(has_pair) - 1, -1)
    pair_index = np.where(token_index >= 0, pair_of_token[np.maximum(token_index, 0)], -1)
    return SharedPrefixPack(
        input_ids=tokens,
        position_ids=depth,
        end=end.astype(np.int32),
        label_rows=pred[has_pair],
        labels=tokens[has_pair],
        token_index=token_index,
        pair_index=pair_index,
    )


def shared_prefix_micro_batches(
    input_ids: ArrayOrTensor, attention_mask: ArrayOrTensor | None = None, *, max_tokens: int, oversized: str = "error"
) -> list[np.ndarray]:
    """Split a batch's rows into micro-batches of at most `max_tokens` *packed* tokens each,
    keeping rows that share prefixes together (for token-budgeted micro-batching, e.g. verl's
    dynamic batch size, without losing the sharing).

    Rows are taken in token order, where sharing rows are neighbours; the packed size of a run of
    sorted rows is the sum of their lengths minus each one's common prefix with the row before it,
    so the greedy split is O(B). A row longer than `max_tokens` raises (oversized="error") or gets a
    micro-batch of its own (oversized="alone"). Returns one int64 array of row indices per
    micro-batch: `pack_shared_prefixes(input_ids[rows], attention_mask[rows])`.
    """
    if oversized not in ("error", "alone"):
        raise SequenceBatchError("oversized", f"must be 'error' or 'alone', got {oversized!r}")
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0:
        raise SequenceBatchError("max_tokens", f"must be a positive integer, got {max_tokens!r}")
    input_ids = _as_2d_ints(input_ids, "input_ids")
    start, stop = _valid_spans(input_ids, attention_mask)
    lengths = stop - start
    too_long = np.flatnonzero(lengths > max_tokens)
    if too_long.size and oversized == "error":
        raise SequenceBatchError(
            "max_tokens",
            f"{max_tokens} is smaller than row {too_long[0]} "
            f"({lengths[too_long[0]]} tokens); a row cannot be split across micro-batches",
        )
    order, lcp = _sorted_lcp([input_ids[b, start[b] : stop[b]] for b in range(input_ids.shape[0])])
    batches: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for k, row in enumerate(order.tolist()):
        shared_cost = int(lengths[row] - lcp[k])  # what the row adds to the micro-batch of its predecessor
        if current and used + shared_cost > max_tokens:
            batches.append(np.asarray(current, np.int64))
            current, used = [], 0
        used += int(lengths[row]) if not current else shared_cost
        current.append(row)
    batches.append(np.asarray(current, np.int64))
    return batches
