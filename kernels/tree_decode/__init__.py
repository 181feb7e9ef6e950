"""tree_decode_attention: one decode step of many branches over the paged tree KV cache (forward only).

    out = tree_decode_attention(q, k_pool, v_pool, meta, *, scale=None, backend=None)

q [B, Hq, D] (one new token per branch), k_pool / v_pool [num_pages, page_size, Hkv, D] (one
layer's pools), Hq a multiple of Hkv (GQA), float16 / bfloat16 / float32; meta: which pages each
query reads (`build_tree_decode_meta`, meta.py). out [B, Hq, D] in q's dtype. Generation needs no
gradients, so this is a plain function (the training-side tree attention has its own autograd op).

Backends (`trace_kernels._runtime.select_backend`):
    triton.py  CUDA, or CPU under TRITON_INTERPRET=1: cascade attention, each shared segment's pages
               read once per tile of queries below it, partials merged by log-sum-exp
    cpu.py     anywhere else: per-branch attention in fp32 (and the cascade in torch, for tests/benches)
    naive.py   the per-branch oracle (each query over a private copy of its path)
    meta.py    the step's metadata (segments, their queries, work tiles; split-KV chunking)
    checks.py  argument validation, shared by the op and the torch paths
"""

from __future__ import annotations

import torch

from .._runtime import Backend, select_backend
from .checks import check_tree_decode_inputs
from .cpu import tree_decode_attention_torch
from .meta import TreeDecodeMeta, build_tree_decode_meta, choose_split_tokens
from .triton import tree_decode_triton

__all__ = ["TreeDecodeMeta", "build_tree_decode_meta", "choose_split_tokens", "tree_decode_attention"]


def tree_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: TreeDecodeMeta,
    *,
    scale: float | None = None,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """Decode attention of B branches over the paged tree KV cache.

    q [B, Hq, D]; k_pool, v_pool [num_pages, page_size, Hkv, D] (one layer's pools); meta from
    `build_tree_decode_meta` (on q's device); scale defaults to D**-0.5. Returns [B, Hq, D].
    backend: "triton" / "cpu" to force a path; None: select_backend's choice.
    """
    check_tree_decode_inputs(q, k_pool, v_pool, meta)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    chosen = select_backend("tree_decode_attention", q, k_pool, v_pool, backend=backend)
    with torch.no_grad():
        if chosen is Backend.TRITON:
            return tree_decode_triton(q, k_pool, v_pool, meta, scale)
        return tree_decode_attention_torch(q, k_pool, v_pool, meta, scale)
