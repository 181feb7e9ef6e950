"""The oracles of shared-prefix decode attention: per-branch attention over private copies of each path.

`tree_decode_attention_reference` is the no-sharing baseline: every query gathers its whole path
(ancestors' pages + its own) into a private copy and runs a plain softmax attention in fp32.
`tree_decode_attention_same_dtype` is the same math without the upcast (it sets tolerances only).

Shapes: q [B, Hq, D]; k_pool, v_pool [num_pages, page_size, Hkv, D]; Hq % Hkv == 0 (GQA);
returns [B, Hq, D] in q's dtype.
"""

from __future__ import annotations

import torch

from .checks import check_tree_decode_inputs
from .meta import TreeDecodeMeta


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
