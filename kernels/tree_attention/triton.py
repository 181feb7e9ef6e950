"""Tree attention over a packed rollout tree: FlashAttention-2 style Triton forward and backward.

Layout (see trace_core/packing.py): the nodes of one or more trees are laid out in DFS pre-order, so
the subtree of a token's node is the contiguous range [j, end[j]). Query i attends key j iff
    j <= i < end[j]
which needs one int per token instead of a [T, T] mask. Several trees concatenated need nothing more.

Block skipping works from O(T) metadata at a fixed granularity of META tokens (independent of the
kernel's tile sizes, so autotuning tiles never changes the metadata):
    kv_max_end[b]  = max(end[b*META : (b+1)*META])
    first_kv[b]    = first META-block whose kv_max_end exceeds b*META (searchsorted on its prefix max)
A query tile [i0, i1) starts its key loop at first_kv and skips every key tile whose max end is
<= i0 (no key of it reaches the tile: e.g. a sibling branch). Keys past i1 - 1 are never visited.
T is a runtime argument (not specialised), so a new packed length does not recompile.

Two loop shapes, both autotune candidates (the faster depends on the tree and the GPU):
  RUNS=False  one loop over key tiles with `if visible:` around the body. Simple, but the branch
              stops Triton's software pipelining: no tile is prefetched (see tools/compile_check).
  RUNS=True   an outer loop finds the next run of visible META-blocks by scanning kv_max_end
              (SCAN blocks per step, O(1) loads each), an inner branch-free loop streams that run's
              tiles, so its loads are pipelined. A visible run is a stretch of the query tile's
              ancestors (a path in DFS order is a few contiguous ranges: one per branch taken), so
              the outer loop runs about depth + 1 times. Keys are masked to [run_start, run_end):
              a tile overhanging its run's end never counts a key twice.

Host side: `block_skip_metadata`, and `tree_attention_forward` / `tree_attention_backward`, which
the op's autograd Function (in __init__) calls. Inputs arrive validated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_enabled

META = 16  # granularity of the block-skipping metadata; every tile size is a multiple of it
MAX_HEAD_DIM = 256  # the largest head dim with a bucket of configs (see _SHAPES)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_INTERPRET = interpreter_enabled()


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages[, RUNS]) per head-dim bucket
# (BLOCK_D <= 64, 128, 256). Each was compiled for sm_90 with trace_kernels.tools.compile_check on
# triton 3.6 and 3.9 and kept only if it spills no registers and fits the H100's shared memory
# (bench/results/compile_sm90_triton*.md); tests/kernels/test_kernel_compile.py re-checks on the
# installed triton. fwd / dq list the run-scanning loop (RUNS=True) first and keep the branching loop
# (RUNS=False) as a candidate: which is faster depends on the tree and the GPU.
_SHAPES = {
    "fwd": {
        64: [
            (128, 64, 8, 3, True),
            (64, 64, 4, 3, True),
            (128, 32, 4, 4, True),
            (128, 128, 8, 2, True),
            (64, 32, 4, 4, True),
            (128, 64, 8, 3, False),
            (128, 64, 4, 3, False),
        ],
        128: [(128, 64, 8, 3, True), (64, 64, 4, 3, True), (64, 32, 4, 4, True), (128, 64, 8, 3, False)],
        256: [(64, 32, 8, 3, True), (64, 64, 8, 2, True), (64, 32, 4, 3, False)],
    },
    "dq": {
        64: [
            (128, 64, 8, 3, True),
            (64, 64, 4, 3, True),
            (128, 32, 4, 4, True),
            (64, 32, 4, 4, True),
            (128, 64, 8, 3, False),
        ],
        128: [(128, 64, 8, 3, True), (64, 32, 4, 4, True), (128, 64, 8, 3, False)],
        256: [(32, 32, 4, 3, True), (32, 32, 4, 3, False)],
    },
    "dkdv": {  # outer loop over a key tile, inner over query tiles (contiguous: no skipping)
        64: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3), (32, 64, 8, 3), (64, 128, 8, 2)],
        128: [(16, 128, 8, 3), (32, 64, 8, 3)],
        256: [(32, 32, 8, 3)],
    },
}


def _config(kernel: str, shape: tuple) -> triton.Config:
    meta = {"BLOCK_M": shape[0], "BLOCK_N": shape[1]}
    if kernel != "dkdv":
        meta["RUNS"] = shape[4]
    return triton.Config(meta, num_warps=shape[2], num_stages=shape[3])


def _configs(kernel: str) -> list[triton.Config]:
    """Every bucket's candidates (the autotuner prunes to BLOCK_D's bucket). The interpreter cannot
    autotune, so it gets one small, unequal tile."""
    if _INTERPRET:
        bm, bn = (32, 16) if kernel == "dkdv" else (16, 32)  # BLOCK_N > META: the vector max path
        # SCAN=4: a 64-key scan window, so small test trees exercise windows with no visible block
        meta = (
            {"BLOCK_M": bm, "BLOCK_N": bn}
            if kernel == "dkdv"
            else {"BLOCK_M": bm, "BLOCK_N": bn, "RUNS": True, "SCAN": 4}
        )
        return [triton.Config(meta, num_warps=4, num_stages=1)]
    shapes = dict.fromkeys(shape for bucket in _SHAPES[kernel].values() for shape in bucket)  # ordered, unique
    return [_config(kernel, shape) for shape in shapes]


def head_dim_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def fitting_configs(kernel: str, configs: list[triton.Config], block_d: int) -> list[triton.Config]:
    """The configs listed for BLOCK_D's bucket (those that compile without spills at that head dim)."""
    wanted = {_config(kernel, shape).__str__() for shape in _SHAPES[kernel][head_dim_bucket(block_d)]}
    return [c for c in configs if str(c) in wanted] or configs


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        return fitting_configs(kernel, configs, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")))

    return {"early_config_prune": prune}


@triton.jit
def _kv_tile_max_end(KV_MAX_END, j0, n_meta, BLOCK_N: tl.constexpr, META_: tl.constexpr):
    """max(end) over the key tile [j0, j0 + BLOCK_N), read from the per-META-block maxima."""
    if BLOCK_N == META_:
        result = tl.load(KV_MAX_END + j0 // META_)
    else:
        idx = j0 // META_ + tl.arange(0, BLOCK_N // META_)
        result = tl.max(tl.load(KV_MAX_END + idx, mask=idx < n_meta, other=0), 0)
    return result


@triton.jit
def _next_visible_run(KV_MAX_END, j, stop, i0, META_: tl.constexpr, SCAN: tl.constexpr):
    """The first run of visible keys at or after j (a multiple of META_), below stop.

    Scans SCAN META-blocks of kv_max_end: a block is visible to the query tile starting at i0 iff
    its max end > i0. Returns (start, end) in keys, clipped to stop; start == end == the scanned
    window's end when the window holds no visible block (the caller goes on from there).
    """
    blocks = j // META_ + tl.arange(0, SCAN)
    in_range = blocks * META_ < stop  # stop <= T, so every loaded block exists
    visible = in_range & (tl.load(KV_MAX_END + blocks, mask=in_range, other=0) > i0)
    none = j // META_ + SCAN
    first = tl.min(tl.where(visible, blocks, none), 0)
    after = tl.min(tl.where((blocks > first) & (visible == 0), blocks, none), 0)
    window_end = tl.minimum(none * META_, stop)
    start = tl.minimum(first * META_, window_end)
    return start, tl.minimum(after * META_, window_end)


@triton.jit
def _kv_tile(
    K,
    V,
    END,
    j0,
    key_stop,
    kv_head,
    offs_m,
    offs_d,
    d_ok,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Key/value tile starting at j0 (keys >= key_stop <= T masked off) and which of its keys each
    query row offs_m may see."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < key_stop
    cols = offs_n.to(tl.int64)
    k = tl.load(
        K + cols[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        V + cols[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    end_j = tl.load(END + offs_n, mask=col_ok, other=0)
    visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < end_j[None, :])
    return k, v, visible


@triton.jit
def _query_tile(T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query tile (program_id 0): its first row i0, row and head-dim offsets, their
    validity masks, and the rows as int64 for addressing."""
    i0 = tl.program_id(0) * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return i0, offs_m, offs_d, offs_m < T, offs_d < HEAD_DIM, offs_m.to(tl.int64)


@triton.jit
def _fwd_tile(
    q,
    m_i,
    l_i,
    acc,
    K,
    V,
    END,
    j0,
    key_stop,
    kv_head,
    offs_m,
    offs_d,
    d_ok,
    qk_scale_log2,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over the key tile at j0: returns the updated (m_i, l_i, acc)."""
    k, v, visible = _kv_tile(
        K,
        V,
        END,
        j0,
        key_stop,
        kv_head,
        offs_m,
        offs_d,
        d_ok,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        BLOCK_N,
        UPCAST,
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # rows that saw no visible key yet keep m = -inf; shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.autotune(configs=_configs("fwd"), key=["HEAD_DIM", "GROUP"], prune_configs_by=_prune("fwd"))
@triton.jit(do_not_specialize=["T", "n_meta"])
def _tree_attn_fwd_kernel(
    Q,
    K,
    V,
    END,
    KV_MAX_END,
    FIRST_KV,
    O,
    LSE,
    T,
    n_meta,
    qk_scale_log2,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    META_: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RUNS: tl.constexpr,
    SCAN: tl.constexpr = 64,
):
    head = tl.program_id(1)
    kv_head = head // GROUP
    i0, offs_m, offs_d, row_ok, d_ok, rows = _query_tile(T, HEAD_DIM, BLOCK_M, BLOCK_D)

    q = tl.load(
        Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter's tl.dot is wrong on bf16
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first_key = tl.load(FIRST_KV + i0 // META_) * META_
    hi = tl.minimum(i0 + BLOCK_M, T)
    if RUNS:
        j = first_key
        while j < hi:
            run_start, run_end = _next_visible_run(KV_MAX_END, j, hi, i0, META_, SCAN)
            for j0 in range(run_start, run_end, BLOCK_N):  # no branch: Triton pipelines these loads
                m_i, l_i, acc = _fwd_tile(
                    q,
                    m_i,
                    l_i,
                    acc,
                    K,
                    V,
                    END,
                    j0,
                    run_end,
                    kv_head,
                    offs_m,
                    offs_d,
                    d_ok,
                    qk_scale_log2,
                    stride_kt,
                    stride_kh,
                    stride_vt,
                    stride_vh,
                    BLOCK_N,
                    UPCAST,
                    DOT_PRECISION,
                )
            j = run_end
    else:
        for j0 in range(first_key // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            if _kv_tile_max_end(KV_MAX_END, j0, n_meta, BLOCK_N, META_) > i0:
                m_i, l_i, acc = _fwd_tile(
                    q,
                    m_i,
                    l_i,
                    acc,
                    K,
                    V,
                    END,
                    j0,
                    T,
                    kv_head,
                    offs_m,
                    offs_d,
                    d_ok,
                    qk_scale_log2,
                    stride_kt,
                    stride_kh,
                    stride_vt,
                    stride_vh,
                    BLOCK_N,
                    UPCAST,
                    DOT_PRECISION,
                )

    # every real row sees at least itself (end[i] > i), so l_i >= 1 there unless every visible score
    # overflowed to -inf: then 0 / 0 = NaN, as on the CPU path. Padding rows (l_i = 0) are not stored.
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural log
    tl.store(LSE + head * T + offs_m, lse, mask=row_ok)


@triton.jit
def _dq_tile(
    q,
    do,
    lse_log2,
    delta,
    K,
    V,
    END,
    j0,
    key_stop,
    kv_head,
    offs_m,
    offs_d,
    d_ok,
    qk_scale_log2,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS @ K of the key tile at j0 (unscaled), with P recomputed from the forward's LSE."""
    k, v, visible = _kv_tile(
        K,
        V,
        END,
        j0,
        key_stop,
        kv_head,
        offs_m,
        offs_d,
        d_ok,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        BLOCK_N,
        UPCAST,
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    p = tl.exp2(tl.where(visible, qk, float("-inf")) - lse_log2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    # masked again: a row whose scores overflowed has a non-finite LSE and delta, and its NaN must
    # reach only the keys it sees (as on the CPU path), not every key of the tile
    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
    return tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.autotune(configs=_configs("dq"), key=["HEAD_DIM", "GROUP"], prune_configs_by=_prune("dq"))
@triton.jit(do_not_specialize=["T", "n_meta"])
def _tree_attn_bwd_dq_kernel(
    Q,
    K,
    V,
    END,
    KV_MAX_END,
    FIRST_KV,
    DO,
    LSE,
    DELTA,
    DQ,
    T,
    n_meta,
    qk_scale_log2,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    META_: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RUNS: tl.constexpr,
    SCAN: tl.constexpr = 64,
):
    head = tl.program_id(1)
    kv_head = head // GROUP
    i0, offs_m, offs_d, row_ok, d_ok, rows = _query_tile(T, HEAD_DIM, BLOCK_M, BLOCK_D)
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=tile_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse_log2 = tl.load(LSE + head * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    first_key = tl.load(FIRST_KV + i0 // META_) * META_
    hi = tl.minimum(i0 + BLOCK_M, T)
    if RUNS:  # see _tree_attn_fwd_kernel
        j = first_key
        while j < hi:
            run_start, run_end = _next_visible_run(KV_MAX_END, j, hi, i0, META_, SCAN)
            for j0 in range(run_start, run_end, BLOCK_N):
                dq += _dq_tile(
                    q,
                    do,
                    lse_log2,
                    delta,
                    K,
                    V,
                    END,
                    j0,
                    run_end,
                    kv_head,
                    offs_m,
                    offs_d,
                    d_ok,
                    qk_scale_log2,
                    stride_kt,
                    stride_kh,
                    stride_vt,
                    stride_vh,
                    BLOCK_N,
                    UPCAST,
                    DOT_PRECISION,
                )
            j = run_end
    else:
        for j0 in range(first_key // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            if _kv_tile_max_end(KV_MAX_END, j0, n_meta, BLOCK_N, META_) > i0:
                dq += _dq_tile(
                    q,
                    do,
                    lse_log2,
                    delta,
                    K,
                    V,
                    END,
                    j0,
                    T,
                    kv_head,
                    offs_m,
                    offs_d,
                    d_ok,
                    qk_scale_log2,
                    stride_kt,
                    stride_kh,
                    stride_vt,
                    stride_vh,
                    BLOCK_N,
                    UPCAST,
                    DOT_PRECISION,
                )

    dq = dq * sm_scale
    tl.store(
        DQ + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_ok
    )


@triton.autotune(configs=_configs("dkdv"), key=["HEAD_DIM", "GROUP"], prune_configs_by=_prune("dkdv"))
@triton.jit(do_not_specialize=["T"])
def _tree_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    END,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    T,
    qk_scale_log2,
    sm_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_dot,
    stride_doh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key tile of one kv head; loops over the GROUP query heads sharing it (GQA) and over the
    query tiles that can see it: [j0, max(end over the tile)), a contiguous range since each key's
    visible queries [j, end[j]) start inside the tile."""
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    j0 = pid_n * BLOCK_N
    offs_n = j0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < T
    d_ok = offs_d < HEAD_DIM
    cols = offs_n.to(tl.int64)
    key_tile_ok = col_ok[:, None] & d_ok[None, :]

    k = tl.load(K + cols[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=key_tile_ok, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=key_tile_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    end_j = tl.load(END + offs_n, mask=col_ok, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = j0 // BLOCK_M * BLOCK_M
    hi = tl.max(end_j, 0)  # end <= T, so this never runs past the last query
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for i0 in range(lo, hi, BLOCK_M):
            offs_m = i0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            rows = offs_m.to(tl.int64)
            tile_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=tile_ok, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=tile_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse_log2 = tl.load(LSE + head * T + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + head * T + offs_m, mask=row_ok, other=0.0)
            visible_t = (offs_n[:, None] <= offs_m[None, :]) & (offs_m[None, :] < end_j[:, None])

            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
            # where, not exp2(-inf - lse): an overflowed row's LSE is non-finite, and its NaN must not
            # reach the keys it does not see (nor, through delta, their dk)
            p_t = tl.where(visible_t, tl.exp2(qk_t - lse_log2[None, :]), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = tl.where(visible_t, p_t * (dp_t - delta[None, :]), 0.0)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(
        DK + cols[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=key_tile_ok,
    )
    tl.store(
        DV + cols[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=key_tile_ok,
    )


# ----------------------------------------------------------------------------------------------
# host side


def block_skip_metadata(end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """O(T) metadata for block skipping, computed on end's device.

    end: int32 [T]. Returns (kv_max_end, first_kv), both int32 [ceil(T / META)]:
    kv_max_end[b] = max(end[b*META:(b+1)*META]); first_kv[b] = the first META-block whose
    kv_max_end is > b*META, i.e. the first key block any query of block b can see.
    """
    T = end.shape[0]
    n_meta = triton.cdiv(T, META)
    padded = torch.nn.functional.pad(end, (0, n_meta * META - T))  # padding keys end at 0: invisible
    kv_max_end = padded.view(n_meta, META).amax(dim=1)
    prefix_max = torch.cummax(kv_max_end, dim=0).values
    block_starts = torch.arange(n_meta, device=end.device, dtype=torch.int32) * META
    first_kv = torch.searchsorted(prefix_max, block_starts, right=True, out_int32=True)
    return kv_max_end.contiguous(), first_kv.contiguous()


def _launch_args(q: torch.Tensor) -> dict:
    D = q.shape[2]
    return dict(
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs K >= 16; extra lanes are masked
        UPCAST=_INTERPRET and q.dtype != torch.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # exact fp32, no TF32 rounding
    )


def tree_attention_forward(q, k, v, end, scale):
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    kv_max_end, first_kv = block_skip_metadata(end)
    out = torch.empty((T, Hq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), Hq)
    _tree_attn_fwd_kernel[grid](
        q,
        k,
        v,
        end,
        kv_max_end,
        first_kv,
        out,
        lse,
        T,
        kv_max_end.shape[0],
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        META_=META,
        **_launch_args(q),
    )
    return out, lse, kv_max_end, first_kv


def tree_attention_backward(q, k, v, end, out, lse, kv_max_end, first_kv, dout, scale):
    T, Hq, _ = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    dout = dout.contiguous()
    delta = (out.float() * dout.float()).sum(dim=-1).transpose(0, 1).contiguous()  # [Hq, T]
    # contiguous copies (no-ops in the usual case) so each gradient shares its input's strides
    q_c, k_c, v_c = q.contiguous(), k.contiguous(), v.contiguous()
    dq = torch.empty_like(q_c)
    dk = torch.empty_like(k_c)
    dv = torch.empty_like(v_c)
    common = dict(GROUP=group, **_launch_args(q))
    strides = (
        q_c.stride(0),
        q_c.stride(1),
        k_c.stride(0),
        k_c.stride(1),
        v_c.stride(0),
        v_c.stride(1),
        dout.stride(0),
        dout.stride(1),
    )
    _tree_attn_bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), Hq)](
        q_c,
        k_c,
        v_c,
        end,
        kv_max_end,
        first_kv,
        dout,
        lse,
        delta,
        dq,
        T,
        kv_max_end.shape[0],
        scale * LOG2E,
        scale,
        *strides,
        META_=META,
        **common,
    )
    _tree_attn_bwd_dkdv_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), Hkv)](
        q_c,
        k_c,
        v_c,
        end,
        dout,
        lse,
        delta,
        dk,
        dv,
        T,
        scale * LOG2E,
        scale,
        *strides,
        **common,
    )
    return dq, dk, dv
