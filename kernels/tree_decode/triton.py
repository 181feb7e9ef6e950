"""Triton kernel of shared-prefix decode attention over a paged tree KV cache: cascade attention.

One decode step of B branches: query b (one token, Hq heads) attends to every key on its
root-to-leaf path of segments (see meta.py).

1. one program per (tile of up to `block_q` queries of one segment, kv head) streams that
   segment's pages once, for all its queries and all their GQA heads together (rows = query x
   head), and writes a normalised partial output and its natural-log LSE per (segment, query);
2. the partials of each query are merged in fp32 (`cpu.merge_partials`).

A query's result depends only on its own path (each (segment, query) partial is computed row by
row), so a branch alone and the same branch among many siblings agree within fp tolerance.
Host side: `tree_decode_triton`, which the op (in __init__) calls with validated inputs.
"""

from __future__ import annotations

import torch

from .._runtime import interpreter_enabled
from .cpu import merge_partials
from .meta import TreeDecodeMeta

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU path only
    triton = None

_BLOCK_N = 16  # keys per inner step under the interpreter (tl.dot needs >= 16)
# GPU autotune candidates (BLOCK_N keys per step, num_warps, num_stages): a decode step is
# memory-bound, so longer key steps with deeper prefetch; all compile for sm_90 without spills at
# head_dim 64 and 128 (trace_kernels.tools.compile_check, tests/kernels/test_kernel_compile.py). Above 128 only
# steps of <= 32 keys fit in registers (bench/results/compile_sm90_triton*.md).
_GPU_SHAPES = [(64, 4, 3), (32, 4, 3), (64, 4, 4), (128, 8, 3), (16, 4, 4)]


def fitting_decode_configs(configs: list, head_dim_pad: int) -> list:
    """The configs that compile without spills at this (padded) head dim."""
    return [c for c in configs if head_dim_pad <= 128 or c.kwargs["BLOCK_N"] <= 32] or configs


def _prune_decode(configs, named_args, **kwargs):
    return fitting_decode_configs(configs, kwargs.get("HEAD_DIM_PAD", named_args.get("HEAD_DIM_PAD")))


def decode_configs() -> list:
    """The partial kernel's autotune configs (one under the interpreter, which cannot autotune)."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": _BLOCK_N}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in _GPU_SHAPES]


def _next_pow2(x: int) -> int:
    return 1 << (max(int(x), 1) - 1).bit_length()


if triton is not None:

    @triton.autotune(
        configs=decode_configs(),
        key=["HEAD_DIM", "BLOCK_ROWS", "GROUP"],
        prune_configs_by={"early_config_prune": _prune_decode},
    )
    @triton.jit
    def _segment_partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        out_ptr,
        lse_ptr,
        seg_pages_ptr,
        seg_len_ptr,
        pair_ptr_ptr,
        pair_query_ptr,
        tile_seg_ptr,
        tile_start_ptr,
        stride_qb,
        stride_qh,
        stride_kp,
        stride_kt,
        stride_kh,
        stride_vp,
        stride_vt,
        stride_vh,
        stride_pages,
        stride_ob,
        stride_oh,
        stride_lb,
        scale,
        page_size,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE_DOT: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seg = tl.load(tile_seg_ptr + tile)
        first = tl.load(pair_ptr_ptr + seg) + tl.load(tile_start_ptr + tile)
        last = tl.load(pair_ptr_ptr + seg + 1)
        seg_len = tl.load(seg_len_ptr + seg)

        rows = tl.arange(0, BLOCK_ROWS)  # row = (query of the tile, head of the group), padded to >= 16
        pair = first + rows // GROUP_PAD
        head = kv_head * GROUP + rows % GROUP_PAD
        row_ok = (pair < last) & (rows // GROUP_PAD < BLOCK_Q) & (rows % GROUP_PAD < GROUP)
        query = tl.load(pair_query_ptr + pair, mask=row_ok, other=0).to(tl.int64)
        dims = tl.arange(0, HEAD_DIM_PAD)
        dim_ok = dims < HEAD_DIM
        q = tl.load(
            q_ptr + query[:, None] * stride_qb + head[:, None] * stride_qh + dims[None, :],
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong: compute in fp32
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_ROWS], tl.float32)
        acc = tl.zeros([BLOCK_ROWS, HEAD_DIM_PAD], tl.float32)
        for start in range(0, seg_len, BLOCK_N):
            tok = start + tl.arange(0, BLOCK_N)
            tok_ok = tok < seg_len
            page = tl.load(seg_pages_ptr + seg * stride_pages + tok // page_size, mask=tok_ok, other=0).to(tl.int64)
            offset = tok % page_size
            kv_mask = tok_ok[:, None] & dim_ok[None, :]
            k = tl.load(
                k_ptr + page[:, None] * stride_kp + offset[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=kv_mask,
                other=0.0,
            )
            v = tl.load(
                v_ptr + page[:, None] * stride_vp + offset[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=kv_mask,
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE_DOT:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(tok_ok[None, :], scores * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out = acc / l_i[:, None]
        lse = m_i + tl.log(l_i)
        pair64 = pair.to(tl.int64)
        tl.store(
            out_ptr + pair64[:, None] * stride_ob + head[:, None] * stride_oh + dims[None, :],
            out,
            mask=row_ok[:, None] & dim_ok[None, :],
        )
        tl.store(lse_ptr + pair64 * stride_lb + head, lse, mask=row_ok)


def tree_decode_triton(q, k_pool, v_pool, meta: TreeDecodeMeta, scale: float):
    """The Triton path of the op: per-(segment, query) partials, then their LSE merge. [B, Hq, D] in q's dtype."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_pool.shape[2]
    group = num_q_heads // kv_heads
    group_pad = _next_pow2(group)
    block_q = meta.block_q
    q = q.contiguous()
    if k_pool.stride(3) != 1 or v_pool.stride(3) != 1:
        raise ValueError("k_pool, v_pool: the head_dim axis must be contiguous")
    device = q.device
    partial_out = torch.empty(meta.num_pairs, num_q_heads, head_dim, dtype=torch.float32, device=device)
    partial_lse = torch.empty(meta.num_pairs, num_q_heads, dtype=torch.float32, device=device)
    upcast = interpreter_enabled() or q.dtype == torch.float32
    grid = (int(meta.tile_seg.numel()), kv_heads)
    _segment_partial_kernel[grid](
        q,
        k_pool,
        v_pool,
        partial_out,
        partial_lse,
        meta.seg_pages,
        meta.seg_len,
        meta.pair_ptr,
        meta.pair_query,
        meta.tile_seg,
        meta.tile_start,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        meta.seg_pages.stride(0),
        partial_out.stride(0),
        partial_out.stride(1),
        partial_lse.stride(0),
        scale,
        meta.page_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_ROWS=max(16, block_q * group_pad),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, _next_pow2(head_dim)),
        UPCAST=upcast,
        IEEE_DOT=upcast,
    )
    out = merge_partials(partial_out, partial_lse, meta.pair_query.long(), meta.num_queries)
    return out.to(q.dtype)
