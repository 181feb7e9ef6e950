"""Group-preserving micro-batches for the shared-prefix actor (numpy only, no verl).

verl's own micro-batching (`rearrange_micro_batches`) balances attention work across micro-batches
and so scatters the n rows of a prompt over several of them; shared-prefix packing only shares a
prefix inside one micro-batch. `group_preserving_micro_batches` keeps sharing rows together:

- rows are taken in token order, where rows that share a prefix are neighbours, and the packed size
  of a run of sorted rows is the sum of their lengths minus each one's common prefix (lcp) with the
  row before it (what `pack_shared_prefixes` would lay out);
- when a micro-batch would exceed the token budget, it is cut before the row with the *smallest*
  lcp in it (the cut recomputes the least shared prefix), not simply before the row that overflowed.
  Inside a prompt group the lcp is at least the prompt's length, between groups it is only what the
  prompts themselves share (e.g. a chat template's system prompt), so a group that fits the budget is
  never split, and a group larger than the budget is split where its rows diverge least early;
- `count` asks for exactly that many micro-batches (data-parallel ranks must run the same number of
  forwards under FSDP): the largest ones are halved, again at their smallest lcp, until there are
  enough.
"""

from __future__ import annotations

import numpy as np

from trace_core.packing.flat import _sorted_lcp


def group_preserving_micro_batches(
    rows: list[np.ndarray], *, max_tokens: int, count: int | None = None
) -> list[np.ndarray]:
    """Row indices of each micro-batch (int64 arrays, sharing rows together; see the module).

    rows: the B sequences (1-D int arrays, no padding).
    max_tokens: packed-token budget of one micro-batch (> 0); a row longer than it gets a
        micro-batch of its own.
    count: the number of micro-batches wanted (>= the budget's own count, <= B), or None.
    """
    if not isinstance(max_tokens, (int, np.integer)) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
    if not rows:
        raise ValueError("rows: no sequences (batch size 0)")
    if count is not None and not 1 <= count <= len(rows):
        raise ValueError(f"count: {count} micro-batches asked for {len(rows)} rows; need 1 <= count <= rows")
    order, lcp = _sorted_lcp([np.asarray(r, np.int64) for r in rows])
    lengths = np.array([len(rows[i]) for i in order], np.int64)
    added = lengths - lcp  # packed tokens a sorted row adds after its predecessor

    runs: list[tuple[int, int]] = []  # [start, stop) over the sorted rows
    start = 0
    while start < len(order):
        stop, used = start + 1, int(lengths[start])
        while stop < len(order) and used + int(added[stop]) <= max_tokens:
            used += int(added[stop])
            stop += 1
        if stop < len(order) and stop - start > 1:
            stop = _cheapest_cut(lcp, start, stop + 1)  # the overflowing row may start the next one
        runs.append((start, stop))
        start = stop
    if count is not None:
        while len(runs) < count:
            widest = max(range(len(runs)), key=lambda k: _packed(lengths, lcp, *runs[k]))
            a, b = runs[widest]
            if b - a < 2:  # every run is one row: count <= B guarantees a wider one exists
                widest = max(range(len(runs)), key=lambda k: runs[k][1] - runs[k][0])
                a, b = runs[widest]
            cut = _cheapest_cut(lcp, a, b)
            runs[widest : widest + 1] = [(a, cut), (cut, b)]
    return [order[a:b].copy() for a, b in runs]


def _cheapest_cut(lcp: np.ndarray, start: int, stop: int) -> int:
    """The cut k in (start, stop) with the smallest lcp[k] (the latest one among equals)."""
    window = lcp[start + 1 : stop]
    return start + 1 + int(len(window) - 1 - np.argmin(window[::-1]))


def _packed(lengths: np.ndarray, lcp: np.ndarray, start: int, stop: int) -> int:
    return int(lengths[start] + (lengths[start + 1 : stop] - lcp[start + 1 : stop]).sum())
