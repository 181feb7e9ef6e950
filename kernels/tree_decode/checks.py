"""Argument validation of `tree_decode_attention`, shared by the op and the torch paths so all raise alike.

Shape, dtype and metadata-consistency checks only (no data reads, so no GPU sync).
"""

from __future__ import annotations

import torch

from .meta import TreeDecodeMeta


def check_tree_decode_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: TreeDecodeMeta) -> None:
    """Raise a ValueError naming the argument (q, k_pool, v_pool) that does not fit the others or meta."""
    if q.dim() != 3:
        raise ValueError(f"q: expected [num_queries, q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_pool.dim() != 4:
        raise ValueError(
            f"k_pool: expected [num_pages, page_size, kv_heads, head_dim], got shape {tuple(k_pool.shape)}"
        )
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
