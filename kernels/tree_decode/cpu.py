"""The torch paths of shared-prefix decode attention (no Triton).

`tree_decode_attention_torch` is what the op runs where Triton cannot: the per-branch math of
naive.py. `tree_decode_attention_cascade` is the kernel's shared algorithm in torch (each segment's
K/V gathered once for all the queries below it, partial attention + LSE per (segment, query),
merged in fp32), which tests and the CPU bench compare with the per-branch math.
`merge_partials` is the LSE merge, shared with the Triton path.
"""

from __future__ import annotations

import torch

from .checks import check_tree_decode_inputs
from .meta import TreeDecodeMeta
from .naive import attend_dense, tree_decode_attention_reference

# CPU decode runs the oracle's per-branch math (as before this package was split): one gather and one
# batched attention per step, where the cascade below loops over shared segments in Python.
tree_decode_attention_torch = tree_decode_attention_reference


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
        page_of_pos = (pos // meta.page_size).clamp(max=seg_pages.shape[1] - 1)
        page = seg_pages[rows].gather(1, page_of_pos[None].expand(len(single), -1))
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
