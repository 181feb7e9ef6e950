"""The oracle of tree attention: the dense [T, T] visibility mask, handed to PyTorch's SDPA in fp32.

Same semantics as `trace_kernels.tree_attention` (the tests compare the Triton and CPU paths with
it, values and gradients). It spends T^2 work and memory, so it is for checking, not for long
packed trees; the CPU path (cpu.py) runs the same math per independent tree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    # [T, H, D] -> [H, T, D]; SDPA with a boolean mask (True = attend), fp32 throughout
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=0), vf.repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=tree_visibility_mask(end), scale=scale)
    return out.transpose(0, 1).to(q.dtype)
