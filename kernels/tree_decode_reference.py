"""Pure-PyTorch oracles of shared-prefix decode attention (same signature as the Triton op).

`tree_decode_attention_reference` is the no-sharing baseline: every query gathers its whole path
(ancestors' pages + its own) into a private copy and runs a plain softmax attention in fp32.
`tree_decode_attention_cascade` is the shared algorithm in torch: each segment's K/V is gathered
once for all the queries below it, partial attention + LSE per (segment, query), merged in fp32.
`tree_decode_attention_same_dtype` is the per-branch math without the upcast (tolerances only).

Shapes: q [B, Hq, D]; k_pool, v_pool [num_pages, page_size, Hkv, D]; Hq % Hkv == 0 (GQA);
returns [B, Hq, D] in q's dtype.
"""
from __future__ import annotations

import torch

from .tree_decode_meta import TreeDecodeMeta


def check_tree_decode_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: TreeDecodeMeta):
    if q.dim() != 3:
        raise ValueError(f"q: expected [num_queries, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(f"k_pool: expected [num_pages, page_size, kv_heads, head_dim], got shape {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise ValueError(f"v_pool: shape {tuple(v_pool.shape)} differs from k_pool's {tuple(k_pool.shape)}")
    if q.shape[0] != meta.num_queries:
        raise ValueError(f"q: {q.shape[0]} queries but meta describes {meta.num_queries}")
    if k_pool.shape[1] != meta.page_size:
        raise ValueError(f"k_pool: page_size {k_pool.shape[1]} differs from meta.page_size {meta.page_size}")
    if q.shape[2] != k_pool.shape[3]:
        raise ValueError(f"q: head_dim {q.shape[2]} differs from k_pool's {k_pool.shape[3]}")
    if q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"q: {q.shape[1]} query heads is not a multiple of {k_pool.shape[2]} kv heads")
    if not (q.dtype == k_pool.dtype == v_pool.dtype):
        raise ValueError(f"q, k_pool, v_pool: dtypes differ ({q.dtype}, {k_pool.dtype}, {v_pool.dtype})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q: dtype {q.dtype} is not supported (float16, bfloat16, float32)")


def attend_dense(q, k, v, valid, scale):
    """q [b, Hq, D], k/v [b, L, Hkv, D] (fp32), valid [b, L] -> (out [b, Hq, D], lse [b, Hq])."""
    b, num_heads, dim = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, kv_heads, num_heads // kv_heads, dim)  # GQA without repeating K/V
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", torch.exp(scores - lse[..., None]), v)
    return out.reshape(b, num_heads, dim), lse.reshape(b, num_heads)


def tree_decode_attention_reference(q, k_pool, v_pool, meta: TreeDecodeMeta, scale: float | None = None):
    """Per-branch attention over a private copy of each query's path (the no-sharing oracle)."""
    check_tree_decode_inputs(q, k_pool, v_pool, meta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    heads, dim = k_pool.shape[2], k_pool.shape[3]
    k = k_pool.reshape(-1, heads, dim)[meta.query_slots].float()  # [B, L, Hkv, D]
    v = v_pool.reshape(-1, heads, dim)[meta.query_slots].float()
    positions = torch.arange(meta.query_slots.shape[1], device=q.device)
    valid = positions[None, :] < meta.query_len[:, None].to(q.device)
    out, _ = attend_dense(q.float(), k, v, valid, scale)
    return out.to(q.dtype)


def tree_decode_attention_same_dtype(q, k_pool, v_pool, meta: TreeDecodeMeta, scale: float | None = None):
    """The per-branch attention carried out in q's own dtype (no upcast), for error budgets only:
    how far this lands from the fp32 reference measures what one pass of fp16 / bf16 rounding costs
    at these inputs, which sets the tolerance of a kernel that computes in that dtype on a GPU."""
    check_tree_decode_inputs(q, k_pool, v_pool, meta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    b, num_heads, dim = q.shape
    heads = k_pool.shape[2]
    k = k_pool.reshape(-1, heads, dim)[meta.query_slots]  # [B, L, Hkv, D], q's dtype
    v = v_pool.reshape(-1, heads, dim)[meta.query_slots]
    positions = torch.arange(meta.query_slots.shape[1], device=q.device)
    valid = positions[None, :] < meta.query_len[:, None].to(q.device)
    qg = q.reshape(b, heads, num_heads // heads, dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    p = torch.softmax(scores.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v).reshape(b, num_heads, dim)


def tree_decode_attention_cascade(q, k_pool, v_pool, meta: TreeDecodeMeta, scale: float | None = None):
    """Segment-grouped attention in torch: each shared segment read once for all its queries (private
    one-query segments in one padded batch), partials merged by LSE in fp32."""
    check_tree_decode_inputs(q, k_pool, v_pool, meta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    heads, dim = k_pool.shape[2], k_pool.shape[3]
    flat_k, flat_v = k_pool.reshape(-1, heads, dim), v_pool.reshape(-1, heads, dim)
    pair_ptr = meta.pair_ptr.tolist()
    seg_len = meta.seg_len.tolist()
    qf = q.float()
    partial_out = torch.empty(meta.num_pairs, q.shape[1], dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(meta.num_pairs, q.shape[1], dtype=torch.float32, device=q.device)
    counts = [pair_ptr[s + 1] - pair_ptr[s] for s in range(len(seg_len))]
    pair_query = meta.pair_query.to(q.device).long()
    seg_pages = meta.seg_pages.to(q.device).long()
    # segments read by one query only (private suffixes): one padded batch, like the per-branch path
    single = [s for s in range(len(seg_len)) if counts[s] == 1]
    if single:
        longest = max(seg_len[s] for s in single)
        pos = torch.arange(longest, device=q.device)
        rows = torch.tensor(single, device=q.device)
        lengths = meta.seg_len.to(q.device).long()[rows]
        valid = pos[None, :] < lengths[:, None]
        page = seg_pages[rows].gather(1, (pos // meta.page_size).clamp(max=seg_pages.shape[1] - 1)[None].expand(len(single), -1))
        slots = torch.where(valid, page * meta.page_size + pos % meta.page_size, torch.zeros_like(page))
        pairs = torch.tensor([pair_ptr[s] for s in single], device=q.device)
        out, lse = attend_dense(qf[pair_query[pairs]], flat_k[slots].float(), flat_v[slots].float(), valid, scale)
        partial_out[pairs], partial_lse[pairs] = out, lse
    # shared segments: K/V read once for all the queries below
    for s in range(len(seg_len)):
        if counts[s] == 1:
            continue
        pos = torch.arange(seg_len[s], device=q.device)
        slots = seg_pages[s][pos // meta.page_size] * meta.page_size + pos % meta.page_size
        k, v = flat_k[slots].float(), flat_v[slots].float()  # [L, Hkv, D]
        lo, hi = pair_ptr[s], pair_ptr[s + 1]
        qg = qf[pair_query[lo:hi]].reshape(hi - lo, heads, -1, dim)
        scores = torch.einsum("bhgd,lhd->bhgl", qg, k) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("bhgl,lhd->bhgd", torch.exp(scores - lse[..., None]), v)
        partial_out[lo:hi] = out.reshape(hi - lo, q.shape[1], dim)
        partial_lse[lo:hi] = lse.reshape(hi - lo, q.shape[1])
    return merge_partials(partial_out, partial_lse, meta.pair_query.to(q.device).long(), meta.num_queries).to(q.dtype)


def merge_partials(partial_out, partial_lse, pair_query, num_queries):
    """Combine per-(segment, query) partial attentions: out_b = sum_p exp(lse_p - lse_b) out_p.

    partial_out [nnz, Hq, D] fp32, partial_lse [nnz, Hq] fp32, pair_query [nnz] int64 -> [B, Hq, D] fp32."""
    heads = partial_lse.shape[1]
    index = pair_query[:, None].expand(-1, heads)
    peak = torch.full((num_queries, heads), float("-inf"), device=partial_lse.device)
    peak = peak.scatter_reduce(0, index, partial_lse, reduce="amax", include_self=True)
    weight = torch.exp(partial_lse - peak[pair_query])
    denom = torch.zeros(num_queries, heads, device=partial_lse.device).index_add_(0, pair_query, weight)
    out = torch.zeros(num_queries, heads, partial_out.shape[2], device=partial_out.device)
    out.index_add_(0, pair_query, weight[..., None] * partial_out)
    return out / denom[..., None]
