"""tree_attention: attention over a packed rollout tree, forward and backward.

    out = tree_attention(q, k, v, end, *, scale=None, check_inputs=True, backend=None)

q [T, Hq, D], k / v [T, Hkv, D] (Hq a multiple of Hkv: GQA), float16 / bfloat16 / float32;
end int32 [T]: the nodes are laid out in DFS pre-order, so query i attends key j iff j <= i < end[j]
(end[j] = end of the subtree range of j's node; see trace_core/packing). out [T, Hq, D] in q's dtype,
differentiable in q, k, v.

Backends (`trace_kernels._runtime.select_backend`):
    triton.py  CUDA, or CPU tensors under TRITON_INTERPRET=1: FlashAttention-2 style kernels with
               O(T) block skipping (`TreeAttentionFunction`)
    cpu.py     anywhere else: the dense math per independent tree, padded into one batch
    naive.py   the dense [T, T]-mask oracle the tests and benches compare against
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .._runtime import Backend, select_backend
from .cpu import tree_attention_torch
from .triton import MAX_HEAD_DIM, block_skip_metadata, tree_attention_backward, tree_attention_forward

__all__ = ["TreeAttentionFunction", "block_skip_metadata", "check_tree_end", "tree_attention"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TreeAttentionFunction(torch.autograd.Function):
    """Triton tree attention; differentiable in q, k, v (not in end)."""

    @staticmethod
    def forward(ctx, q, k, v, end, scale):
        out, lse, kv_max_end, first_kv = tree_attention_forward(q, k, v, end, scale)
        ctx.save_for_backward(q, k, v, end, out, lse, kv_max_end, first_kv)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, end, out, lse, kv_max_end, first_kv = ctx.saved_tensors
        dq, dk, dv = tree_attention_backward(q, k, v, end, out, lse, kv_max_end, first_kv, dout, ctx.scale)
        return dq, dk, dv, None, None


def _check_inputs(q, k, v, end, *, triton_path: bool) -> torch.Tensor:
    """Raise a clear error naming the argument for every malformed input; returns end as int32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"tree_attention: {name} must have shape [T, heads, head_dim], got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"tree_attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"tree_attention: q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    devices = {t.device for t in (q, k, v, end)}
    if len(devices) > 1:
        raise ValueError(
            f"tree_attention: q, k, v, end must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}, end {end.device}"
        )
    T, Hq, D = q.shape
    if T == 0:
        raise ValueError("tree_attention: q has no tokens (T = 0)")
    if D < 1:
        raise ValueError(f"tree_attention: head_dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(
            f"tree_attention: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[0] != T:
        raise ValueError(f"tree_attention: k has {k.shape[0]} tokens but q has {T}")
    if k.shape[2] != D:
        raise ValueError(f"tree_attention: k has head_dim {k.shape[2]} but q has {D}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"tree_attention: q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (GQA)")
    if end.dim() != 1 or end.shape[0] != T:
        raise ValueError(f"tree_attention: end must have shape [T] = [{T}], got {tuple(end.shape)}")
    if end.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_attention: end must be int32 (or int64), got {end.dtype}")
    if triton_path:
        if D > MAX_HEAD_DIM:
            raise ValueError(f"tree_attention: head_dim {D} is larger than the kernel's maximum {MAX_HEAD_DIM}")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(2) != 1:
                raise ValueError(
                    f"tree_attention: {name} must have unit stride along head_dim, got strides {t.stride()}; "
                    f"pass {name}.contiguous()"
                )
        if T >= 2**31:
            raise ValueError(f"tree_attention: T = {T} tokens does not fit int32 positions")
    return end.to(torch.int32).contiguous()


def _checked_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"tree_attention: scale must be a real number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"tree_attention: scale must be finite and > 0 (or None: 1/sqrt(head_dim)), got {scale}")
    return float(scale)


def check_tree_end(end: torch.Tensor) -> None:
    """Raise unless every end[j] satisfies j < end[j] <= T (one host sync)."""
    T = end.shape[0]
    idx = torch.arange(T, device=end.device, dtype=end.dtype)
    too_small = end <= idx
    if bool(too_small.any()):
        j = int(too_small.nonzero()[0, 0])
        raise ValueError(
            f"tree_attention: end[{j}] = {int(end[j])} must be > {j}: the subtree range [j, end[j]) of a "
            f"token contains the token itself"
        )
    too_large = end > T
    if bool(too_large.any()):
        j = int(too_large.nonzero()[0, 0])
        raise ValueError(f"tree_attention: end[{j}] = {int(end[j])} is out of range (> T = {T})")


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    end: torch.Tensor,
    *,
    scale: float | None = None,
    check_inputs: bool = True,
    backend: Backend | str | None = None,
) -> torch.Tensor:
    """Attention of a packed tree (DFS pre-order): query i attends key j iff j <= i < end[j].

    q: [T, Hq, D]; k, v: [T, Hkv, D], Hq a multiple of Hkv; float16 / bfloat16 / float32.
    end: int32 [T] (int64 accepted), j < end[j] <= T.  scale: finite > 0, default 1/sqrt(D); D >= 1.
    check_inputs: validate end's values (reads the data: one host sync; callers that validated the tree
        once, e.g. per model forward, pass False for every layer). Shape / dtype / device checks always run.
    backend: "triton" / "cpu" to force a path; None: select_backend's choice.
    Returns out [T, Hq, D] in q's dtype, differentiable in q, k, v.

    Scores are fp32 on both paths; where they overflow, both give the same: a query row with a +inf
    score, or with -inf for every key it sees, is NaN (output and gradients), a -inf score among
    finite ones weighs 0, and keys a row does not see never affect it.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("end", end)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tree_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    chosen = select_backend("tree_attention", q, k, v, end, backend=backend)
    end = _check_inputs(q, k, v, end, triton_path=chosen is Backend.TRITON)
    if check_inputs:
        check_tree_end(end)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else _checked_scale(scale)
    if chosen is Backend.CPU:
        return tree_attention_torch(q, k, v, end, scale=scale)
    return TreeAttentionFunction.apply(q, k, v, end, scale)
