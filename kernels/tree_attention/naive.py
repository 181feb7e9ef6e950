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
    # [T, H, D] -> [H, T, D]; a boolean mask (True = attend), fp32 throughout
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=0), vf.repeat_interleave(group, dim=0)
    return masked_attention(qf, kf, vf, tree_visibility_mask(end), scale).transpose(0, 1).to(q.dtype)


def masked_attention(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, mask: torch.Tensor, scale: float):
    """softmax(q k^T scale over the keys where mask) v, fp32 [..., L, D], with the overflow rule of
    the Triton path: a row whose visible scores overflow (a +inf, or all -inf) gives NaN (output
    and gradients), a -inf among finite scores weighs 0, and an invisible key never affects a row.

    SDPA when no score can overflow (|q.k| <= |q| |k|: then it is exact); otherwise the explicit
    softmax, because SDPA adds its mask to the scores (an invisible +inf score + -inf = NaN) and
    gives 0, not NaN, for a row with no finite score.
    """
    norms = [torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64).amax() for t in (qf, kf)]
    bound = norms[0] * norms[1] * abs(scale)
    if bool(bound < _SAFE_SCORE):  # False for inf / NaN inputs
        return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)  # NaN rows stay NaN on visible keys only
    return weights @ vf


# far below fp32's max (3.4e38), which the Triton path's scores scaled by log2(e) must stay under
_SAFE_SCORE = 1e30
