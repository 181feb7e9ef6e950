"""Pure-PyTorch tree attention: the oracle for the Triton kernel and its CPU fallback.

Same signature and semantics as `trace_kernels.tree_attention.tree_attention`. It builds the dense
[T, T] visibility mask and hands it to PyTorch's SDPA in fp32, so it is meant for tests and CPU
runs of modest length, not for long packed trees on a GPU. `tree_attention_torch`, the CPU path of
the op, does the same math per independent tree (padded into one batch), skipping the pairs across
trees that the dense mask computes and throws away.
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


def independent_ranges(end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, stops) of the ranges [a, b) that share no visible pair with the rest: the trees of a
    packed forest (or finer, where a tree's tokens split cleanly). A cut after token i is valid iff no
    key up to i reaches a query past i: max(end[:i+1]) == i + 1 (end[j] > j always)."""
    reach = torch.cummax(end.long(), dim=0).values
    stops = torch.nonzero(reach == torch.arange(1, end.shape[0] + 1, device=end.device)).flatten() + 1
    starts = torch.cat([stops.new_zeros(1), stops[:-1]])
    return starts, stops


def tree_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """The CPU path: `tree_attention_reference`'s math, one padded batch of independent ranges.

    A packed micro-batch holds several trees, and no pair across two trees is visible, so the dense
    [T, T] mask wastes most of its work (k trees of equal size: a factor k). Here each range gets its
    own [L, L] block, batched with padding to the longest: S * L_max^2 pairs instead of T^2. Where that
    would not save half (one tree, or one range much longer than the rest) it is the dense reference.
    Same signature, values and gradients as `tree_attention_reference` (tested).
    """
    T = end.shape[0]
    if T == 0:
        return tree_attention_reference(q, k, v, end, scale=scale)
    starts, stops = independent_ranges(end)
    lengths = stops - starts
    width = int(lengths.max())
    if lengths.numel() * width * width * 2 > T * T:
        return tree_attention_reference(q, k, v, end, scale=scale)
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    offsets = torch.arange(width, device=end.device)
    real = offsets[None, :] < lengths[:, None]  # [S, L]
    pos = torch.where(real, starts[:, None] + offsets[None, :], starts[:, None])  # padding repeats a real token
    local_end = end.long()[pos] - starts[:, None]
    i, j = offsets[:, None], offsets[None, :]
    mask = (j <= i) & (i < local_end[:, None, :]) & real[:, None, :]  # [S, L(query), L(key)]
    # a padded query row attends its range's first key, so it stays finite (its output is dropped)
    mask |= ~real[:, :, None] & (j == 0)
    # [T, H, D] -> [S, H, L, D] in fp32, as the reference computes
    qf, kf, vf = (t.float()[pos].transpose(1, 2) for t in (q, k, v))
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)[real].to(q.dtype)  # the real rows, in token order: [T, Hq, D]
