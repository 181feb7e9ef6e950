"""Pure-PyTorch tree attention: the oracle for the Triton kernel and its CPU fallback.

Same signature and semantics as `trace_kernels.tree_attention.tree_attention`. It builds the dense
[T, T] visibility mask, so it is meant for tests and small CPU runs, not for long packed trees.
"""
from __future__ import annotations

import math

import torch


def tree_visibility_mask(end: torch.Tensor) -> torch.Tensor:
    """Dense mask [T, T], True where query i (row) may attend key j (column): j <= i < end[j]."""
    idx = torch.arange(end.shape[0], device=end.device)
    return (idx[None, :] <= idx[:, None]) & (idx[:, None] < end.to(idx.dtype)[None, :])


def tree_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """Attention over a packed tree, computed densely in fp32.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (grouped-query attention);
    end: integer [T], key j is visible to query i iff j <= i < end[j].
    scale: softmax scale, default 1/sqrt(D). Returns out [T, Hq, D] in q's dtype.
    Differentiable in q, k, v through ordinary autograd.
    """
    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf, kf, vf = q.float(), k.float(), v.float()
    kf = kf.repeat_interleave(group, dim=1)  # [T, Hq, D]
    vf = vf.repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", qf, kf) * scale  # [Hq, T(query), T(key)]
    scores = scores.masked_fill(~tree_visibility_mask(end)[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hij,jhd->ihd", probs, vf)
    return out.to(q.dtype)
