"""Metadata of one shared-prefix decode step: which queries read which paged KV segments.

A *segment* is a run of tokens stored in pages (a node of the paged tree KV cache: a prompt, a
turn). Each query (one decoding branch) attends to the segments on its root-to-leaf path. The
metadata groups queries by segment, so the kernel reads every segment once for all the queries
below it, in tiles of `block_q` queries:

    seg_pages   [S, max_pages] int32   page ids of each segment, in token order (padded with 0)
    seg_len     [S] int32              tokens in each segment (>= 1; empty segments are dropped)
    pair_ptr    [S+1] int32            CSR: pairs pair_ptr[s]..pair_ptr[s+1] are segment s's queries
    pair_query  [nnz] int32            the query index of each (segment, query) pair
    tile_seg    [W] int32              work tiles: segment of tile w ...
    tile_start  [W] int32              ... and its first pair, relative to pair_ptr[s]
    query_slots [B, max_len] int64     flat slot ids (page * page_size + offset) of every key of each
                                       query, padded with 0 (read by the per-branch attention: oracle, CPU path)
    query_len   [B] int32              keys per query

Attention is a softmax over a *set* of keys (positions are already inside K via RoPE), so the
order of segments on a path does not matter. That also makes splitting free: `split_tokens` cuts
every longer segment into chunks of that many tokens, each chunk a segment of its own with the
same queries (split-KV, as in flash-decoding). A long shared prefix with few branches is then read
by many programs in parallel instead of one per kv head, and the LSE merge is unchanged; every
page is still read once per tile of queries. `choose_split_tokens` picks the chunk for a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TreeDecodeMeta:
    seg_pages: torch.Tensor
    seg_len: torch.Tensor
    pair_ptr: torch.Tensor
    pair_query: torch.Tensor
    tile_seg: torch.Tensor
    tile_start: torch.Tensor
    query_slots: torch.Tensor
    query_len: torch.Tensor
    page_size: int
    block_q: int
    num_queries: int

    @property
    def num_pairs(self) -> int:
        return int(self.pair_query.numel())

    def keys_read_shared(self) -> int:
        """Key/value token rows the grouped kernel reads (each segment once per tile of queries)."""
        seg_len = self.seg_len.cpu().numpy().astype(np.int64)
        return int(seg_len[self.tile_seg.cpu().numpy()].sum())

    def keys_read_per_branch(self) -> int:
        """Key/value token rows a per-branch attention reads (each query its whole path)."""
        return int(self.query_len.cpu().numpy().astype(np.int64).sum())


def choose_split_tokens(
    seg_len: Sequence[int],
    seg_queries: Sequence[int],
    *,
    block_q: int,
    kv_heads: int,
    page_size: int,
    target_programs: int,
    min_tokens: int = 256,
) -> int | None:
    """The largest chunk (min_tokens times a power of two, whole pages) that gives the decode kernel
    at least `target_programs` programs (e.g. 2 per SM), or min_tokens if none does; None when the
    unsplit segments already give enough programs.

    seg_len[s], seg_queries[s]: tokens and number of queries of each segment of the step.
    """
    tiles = [-(-q // block_q) for q in seg_queries]
    if kv_heads * sum(tiles) >= target_programs:
        return None
    longest = max(seg_len)
    chunk = max(page_size, -(-min_tokens // page_size) * page_size)
    best = chunk
    while chunk < longest:
        programs = kv_heads * sum(-(-n // chunk) * t for n, t in zip(seg_len, tiles))
        if programs < target_programs:
            break
        best, chunk = chunk, chunk * 2
    return best if best < longest else None


def build_tree_decode_meta(
    segments: Sequence[tuple[Sequence[int], int]],
    query_segments: Sequence[Sequence[int]],
    *,
    page_size: int,
    block_q: int = 16,
    split_tokens: int | None = None,
    device="cpu",
) -> TreeDecodeMeta:
    """segments[s] = (page ids, number of tokens) of segment s; query_segments[b] = the segments
    query b attends to (its path). Returns the metadata of one decode step (see module doc).

    split_tokens: cut segments longer than this into chunks of this many tokens (a multiple of
    page_size); None keeps segments whole.
    """
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size: must be a positive integer, got {page_size!r}")
    if not isinstance(block_q, int) or block_q <= 0 or block_q & (block_q - 1):
        raise ValueError(f"block_q: must be a positive power of two, got {block_q!r}")
    if split_tokens is not None and (
        not isinstance(split_tokens, int) or split_tokens <= 0 or split_tokens % page_size
    ):
        raise ValueError(f"split_tokens: must be a positive multiple of page_size ({page_size}), got {split_tokens!r}")
    if len(query_segments) == 0:
        raise ValueError("query_segments: at least one query is needed")
    num_segments = len(segments)
    for s, (pages, length) in enumerate(segments):
        if length < 0 or len(pages) * page_size < length:
            raise ValueError(f"segments[{s}]: {length} tokens do not fit in {len(pages)} page(s) of {page_size}")
    # pairs, grouped by segment; empty segments contribute nothing
    queries_of = [[] for _ in range(num_segments)]
    for b, segs in enumerate(query_segments):
        if len(set(segs)) != len(segs):
            raise ValueError(f"query_segments[{b}]: lists a segment twice ({list(segs)})")
        total = 0
        for s in segs:
            if not 0 <= s < num_segments:
                raise ValueError(f"query_segments[{b}]: segment {s} is outside 0..{num_segments - 1}")
            if segments[s][1] > 0:
                queries_of[s].append(b)
                total += segments[s][1]
        if total == 0:
            raise ValueError(f"query_segments[{b}]: the query has no keys to attend to")
    # the kernel's segments: each kept segment whole, or cut into chunks of split_tokens
    chunks = []  # (pages, tokens, queries)
    for s in range(num_segments):
        if not queries_of[s]:
            continue
        pages, length = segments[s]
        step = length if split_tokens is None else split_tokens
        per_chunk = -(-step // page_size)
        for c, start in enumerate(range(0, length, step)):
            chunks.append((pages[c * per_chunk : (c + 1) * per_chunk], min(step, length - start), queries_of[s]))
    max_pages = max(len(pages) for pages, _, _ in chunks)
    seg_pages = np.zeros((len(chunks), max_pages), np.int32)
    seg_len = np.zeros(len(chunks), np.int32)
    counts = np.zeros(len(chunks), np.int64)
    pair_query, tile_seg, tile_start = [], [], []
    for i, (pages, length, queries) in enumerate(chunks):
        seg_pages[i, : len(pages)] = pages
        seg_len[i] = length
        counts[i] = len(queries)
        pair_query.extend(queries)
        starts = range(0, len(queries), block_q)
        tile_seg.extend([i] * len(starts))
        tile_start.extend(starts)
    pair_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    # per-query key slots, for the per-branch attention (the oracle and the CPU path)
    slots_of = []
    for segs in query_segments:
        parts = []
        for s in segs:
            pages, length = segments[s]
            pos = np.arange(length)
            parts.append(np.asarray(pages, np.int64)[pos // page_size] * page_size + pos % page_size)
        slots_of.append(np.concatenate(parts) if parts else np.zeros(0, np.int64))
    query_len = np.array([x.size for x in slots_of], np.int32)
    query_slots = np.zeros((len(slots_of), int(query_len.max())), np.int64)
    for b, x in enumerate(slots_of):
        query_slots[b, : x.size] = x

    def t(a):
        return torch.as_tensor(a).to(device)

    return TreeDecodeMeta(
        seg_pages=t(seg_pages),
        seg_len=t(seg_len),
        pair_ptr=t(pair_ptr),
        pair_query=t(np.asarray(pair_query, np.int32)),
        tile_seg=t(np.asarray(tile_seg, np.int32)),
        tile_start=t(np.asarray(tile_start, np.int32)),
        query_slots=t(query_slots),
        query_len=t(query_len),
        page_size=page_size,
        block_q=block_q,
        num_queries=len(query_segments),
    )
