"""Triton kernels of `linear_logprob` (imported only when the Triton backend runs).

Three kernels, each computing logits tile by tile with fp32 accumulators (no [N, V] tensor):
- `_row_stats_kernel`   forward. Grid (token tiles, vocab splits): each program streams its vocab
  split for one token tile with an online max / sum-exp / entropy accumulator and writes one
  partial per (split, row); the caller merges splits with a log-sum-exp. Token tiles vary fastest
  in the grid, so the programs running together read the same weight tiles (L2 reuse).
- `_label_logits_kernel` forward. z[rows[m], labels[m]] for each (row, label) pair: a dot of two
  gathered rows, fp32.
- `_logit_grad_kernel`  backward. Recomputes one [token chunk x vocab chunk] block of logits and
  writes d loss / d logits for it; the caller turns that block into weight/hidden gradients with
  two matmuls (cuBLAS), then reuses the buffer for the next block.

Interpreter (TRITON_INTERPRET=1): tl.dot on bf16 is silently wrong there, so tiles are upcast to
fp32 after loading (UPCAST); autotuning gets one config. Works with triton 3.6 to 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import interpreter_enabled

_INTERPRET = interpreter_enabled()

# Vocab splits are multiples of this, so every autotuned BLOCK_V divides a split evenly.
SPLIT_GRANULE = 64 if _INTERPRET else 256


def _configs(gpu_configs: list[triton.Config], interp_config: triton.Config) -> list[triton.Config]:
    return [interp_config] if _INTERPRET else gpu_configs


_TILE_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bv, bk, w, s in [
            (128, 128, 64, 8, 3),
            (128, 128, 32, 8, 4),
            (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3),
            (64, 64, 64, 4, 4),
        ]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_K": 32}),
)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    offs_m,
    mask_m,
    offs_v,
    mask_v,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 z[BLOCK_M, BLOCK_V] = (h[offs_m] @ w[offs_v].T + b[offs_v]) * inv_temp."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    rows64 = offs_m.to(tl.int64)  # V * H can pass 2**31 (e.g. 152k x 16k)
    vocab64 = offs_v.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        a = tl.load(
            h_ptr + rows64[:, None] * stride_hm + offs_k[None, :] * stride_hk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + vocab64[:, None] * stride_wv + offs_k[None, :] * stride_wk,
            mask=mask_v[:, None] & mask_k[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.autotune(configs=_TILE_CONFIGS, key=["H", "V"])
@triton.jit
def _row_stats_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    max_ptr,
    sum_ptr,
    ent_ptr,
    U,
    V,
    H,
    split_size,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < U
    v_start = split * split_size
    v_end = tl.minimum(v_start + split_size, V)
    # Finite start so the first rescale is exp(-huge) * finite = 0, never inf * 0.
    run_max = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_ent = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            offs_m,
            mask_m,
            offs_v,
            mask_v,
            H,
            stride_hm,
            stride_hk,
            stride_wv,
            stride_wk,
            inv_temp,
            HAS_BIAS,
            UPCAST,
            IEEE_FP32,
            BLOCK_M,
            BLOCK_V,
            BLOCK_K,
        )
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        # Masked columns: shifted 0 and p 0, so no inf * 0 anywhere.
        shifted = tl.where(mask_v[None, :], z - new_max[:, None], 0.0)
        p = tl.where(mask_v[None, :], tl.exp(shifted), 0.0)
        if WITH_ENTROPY:
            # sum p * (z - max), re-based from the old max to the new one.
            tile_ent = tl.sum(p * shifted, axis=1)
            run_ent = rescale * (run_ent + (run_max - new_max) * run_sum) + tile_ent
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_max = new_max
    out = split * U + offs_m
    tl.store(max_ptr + out, run_max, mask=mask_m)
    tl.store(sum_ptr + out, run_sum, mask=mask_m)
    if WITH_ENTROPY:
        tl.store(ent_ptr + out, run_ent, mask=mask_m)


@triton.jit
def _label_logits_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    rows_ptr,
    labels_ptr,
    out_ptr,
    M,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = offs < M
    row = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    label = tl.load(labels_ptr + offs, mask=mask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = mask[:, None] & (offs_k < H)[None, :]
        a = tl.load(h_ptr + row[:, None] * stride_hm + offs_k[None, :] * stride_hk, mask=mk, other=0.0)
        b = tl.load(w_ptr + label[:, None] * stride_wv + offs_k[None, :] * stride_wk, mask=mk, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + label, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc * inv_temp, mask=mask)


@triton.autotune(configs=_TILE_CONFIGS, key=["H"])
@triton.jit
def _logit_grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    lse_ptr,
    gsum_ptr,
    ent_ptr,
    gent_ptr,
    dz_ptr,
    T,
    C,
    H,
    stride_hm,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dzm,
    stride_dzv,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < T
    mask_v = offs_v < C
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        offs_m,
        mask_m,
        offs_v,
        mask_v,
        H,
        stride_hm,
        stride_hk,
        stride_wv,
        stride_wk,
        inv_temp,
        HAS_BIAS,
        UPCAST,
        IEEE_FP32,
        BLOCK_M,
        BLOCK_V,
        BLOCK_K,
    )
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    log_p = z - lse[:, None]
    coeff = tl.load(gsum_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if WITH_ENTROPY_GRAD:
        ent = tl.load(ent_ptr + offs_m, mask=mask_m, other=0.0)
        gent = tl.load(gent_ptr + offs_m, mask=mask_m, other=0.0)
        coeff = coeff + gent[:, None] * (log_p + ent[:, None])
    dz = -tl.exp(log_p) * coeff * inv_temp
    tl.store(
        dz_ptr + offs_m.to(tl.int64)[:, None] * stride_dzm + offs_v[None, :] * stride_dzv,
        dz.to(dz_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_v[None, :],
    )


def _ieee_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs use full-precision dots unless torch itself allows TF32 matmuls."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _num_splits(n_used: int, vocab: int, device: torch.device) -> int:
    """Vocab splits: enough programs to fill the GPU without re-streaming the vocab per token tile."""
    max_splits = triton.cdiv(vocab, SPLIT_GRANULE)
    if _INTERPRET or device.type != "cuda":
        return min(max_splits, 8)
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(max_splits, triton.cdiv(target_programs, triton.cdiv(n_used, 128))))


def row_stats_partials_triton(h_used, weight, bias, inv_temp: float, with_entropy: bool, n_splits: int | None = None):
    """h_used [U, H], weight [V, H] -> (max, sum_exp, ent | None), each fp32 [S, U] (see the torch twin)."""
    n_used, hidden_size = h_used.shape
    vocab = weight.shape[0]
    if n_splits is None:
        n_splits = _num_splits(n_used, vocab, h_used.device)
    split_size = triton.cdiv(triton.cdiv(vocab, n_splits), SPLIT_GRANULE) * SPLIT_GRANULE
    n_splits = triton.cdiv(vocab, split_size)
    part_max = torch.empty((n_splits, n_used), dtype=torch.float32, device=h_used.device)
    part_sum = torch.empty_like(part_max)
    part_ent = torch.empty_like(part_max) if with_entropy else None
    grid = lambda meta: (triton.cdiv(n_used, meta["BLOCK_M"]), n_splits)
    _row_stats_kernel[grid](
        h_used,
        weight,
        bias if bias is not None else weight,
        part_max,
        part_sum,
        part_ent if with_entropy else part_max,
        n_used,
        vocab,
        hidden_size,
        split_size,
        h_used.stride(0),
        h_used.stride(1),
        weight.stride(0),
        weight.stride(1),
        inv_temp,
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=with_entropy,
        UPCAST=_INTERPRET,
        IEEE_FP32=_ieee_fp32(h_used.dtype),
    )
    return part_max, part_sum, part_ent


def label_logits_triton(hidden, weight, bias, rows, labels, inv_temp: float) -> torch.Tensor:
    """z[rows[m], labels[m]], fp32 [M]."""
    n_pairs = rows.shape[0]
    out = torch.empty(n_pairs, dtype=torch.float32, device=hidden.device)
    block_m, block_k = (16, 32) if _INTERPRET else (32, 128)
    _label_logits_kernel[(triton.cdiv(n_pairs, block_m),)](
        hidden,
        weight,
        bias if bias is not None else weight,
        rows,
        labels,
        out,
        n_pairs,
        hidden.shape[1],
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        inv_temp,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    return out


def logit_grad_tile_triton(h_tile, w_tile, b_tile, inv_temp: float, lse, grad_sum, entropy, grad_entropy, out=None):
    """Triton twin of `logit_grad_tile_torch`: dz [T, C] in h_tile's dtype (written into `out` if given)."""
    n_tok, vocab_chunk = h_tile.shape[0], w_tile.shape[0]
    dz = out if out is not None else torch.empty((n_tok, vocab_chunk), dtype=h_tile.dtype, device=h_tile.device)
    with_ent = grad_entropy is not None
    grid = lambda meta: (triton.cdiv(n_tok, meta["BLOCK_M"]), triton.cdiv(vocab_chunk, meta["BLOCK_V"]))
    _logit_grad_kernel[grid](
        h_tile,
        w_tile,
        b_tile if b_tile is not None else w_tile,
        lse,
        grad_sum,
        entropy if with_ent else lse,
        grad_entropy if with_ent else lse,
        dz,
        n_tok,
        vocab_chunk,
        h_tile.shape[1],
        h_tile.stride(0),
        h_tile.stride(1),
        w_tile.stride(0),
        w_tile.stride(1),
        dz.stride(0),
        dz.stride(1),
        inv_temp,
        HAS_BIAS=b_tile is not None,
        WITH_ENTROPY_GRAD=with_ent,
        UPCAST=_INTERPRET,
        IEEE_FP32=_ieee_fp32(h_tile.dtype),
    )
    return dz
