"""The CPU path of tree attention: the dense math of naive.py, one padded batch of independent trees.

A packed micro-batch holds several trees, and no pair across two trees is visible, so a dense
[T, T] mask wastes most of its work (k trees of equal size: a factor k). Here each independent
range gets its own [L, L] block, batched with padding to the longest: S * L_max^2 pairs instead
of T^2. Pure PyTorch, differentiable through autograd, runs on any device.
"""

from __future__ import annotations

import math

import torch

# One tree (or one range much longer than the rest): batching saves under half, and what remains is
# exactly the oracle's dense math, so that case calls it rather than a copy of it.
from .naive import masked_attention, tree_attention_reference


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
    """Tree attention of q [T, Hq, D], k / v [T, Hkv, D] over end [T], one padded batch of the
    independent ranges; where that would not save half it is the dense oracle. Same signature, values
    and gradients as `naive.tree_attention_reference` (tested). Returns [T, Hq, D] in q's dtype.
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
    out = masked_attention(qf, kf, vf, mask[:, None], scale)
    return out.transpose(1, 2)[real].to(q.dtype)  # the real rows, in token order: [T, Hq, D]
