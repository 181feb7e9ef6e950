"""The clipped policy-gradient loss, computed exactly on a packed tree.

Over flattened leaf paths the loss is

    L = sum_l w_l sum_{t in path l, model token} [ -min(r_t A_lt, clip(r_t) A_lt) + beta k3_t ]

with r_t = exp(logp_t - old_t), clip to [1 - eps_low, 1 + eps_high], k3 the KL estimate to a
reference policy, and w_l the aggregation weight of leaf l (token-mean: w_l = 1 / total model tokens
over all leaf paths). A packed token is shared by every leaf below it and has one ratio r, and
min(r A, clip(r) A) is A min(r, clip(r)) for A >= 0 and A max(r, clip(r)) for A < 0, so the sum over
those leaves is

    S+_t min(r_t, clip(r_t)) + S-_t max(r_t, clip(r_t)),   S+- = sum_{l ∋ t} w_l A_lt^{+-}

and the KL term gets weight W_t = sum_{l ∋ t} w_l. `packed_loss_weights` computes S+, S-, W per
packed token (numpy); `packed_policy_loss` is the torch loss on them. `leaf_path_policy_loss` is the
flattened reference (tests prove the two equal, values and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trace_core.advantage import LEAF, NODE
from trace_core.forest import ForestError, RolloutForest
from trace_core.packing.forest import PackedTree

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
# exp(80) ~ 5.5e34: far above any clip range, with room below fp32's max (~3.4e38, exp(88.7)) for
# the weighted sum of many such terms
LOG_RATIO_MAX = 80.0


@dataclass(frozen=True)
class PackedLossWeights:
    """Per packed token [N] float64: positive / negative advantage sums and the KL weight, each
    already multiplied by the aggregation weights; zero on tokens without loss."""

    adv_pos: np.ndarray
    adv_neg: np.ndarray
    kl_weight: np.ndarray

    def to_torch(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        adv_pos, adv_neg, kl_weight = (
            torch.as_tensor(x, dtype=dtype, device=device) for x in (self.adv_pos, self.adv_neg, self.kl_weight)
        )
        return adv_pos, adv_neg, kl_weight


def leaf_weights(
    forest: RolloutForest, packed: PackedTree, loss_agg: str = "token-mean", *, total: float | None = None
) -> np.ndarray:
    """[n] aggregation weight w_l of each leaf (0 elsewhere).

    token-mean:           1 / (model tokens summed over all leaf paths)
    seq-mean-token-mean:  1 / (number of leaves * model tokens on the leaf's own path)

    total: the denominator's count over the whole step when `forest` is one rank's part of it (model tokens for
    token-mean, leaves with model tokens for seq-mean-token-mean; `loss_denominator` of every rank, summed)."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ForestError("loss_agg", f"unknown aggregation {loss_agg!r}; choose one of {LOSS_AGGREGATIONS}")
    model_tokens_per_leaf = _model_tokens_per_leaf(packed)
    if (model_tokens_per_leaf.sum() if total is None else total) == 0:
        raise ForestError("forest", "no leaf path has a model token: there is nothing to train on")
    weights = np.zeros(forest.num_nodes)
    if loss_agg == "token-mean":
        weights[packed.leaf_nodes] = 1.0 / (model_tokens_per_leaf.sum() if total is None else total)
    else:
        has_tokens = model_tokens_per_leaf > 0
        leaves = has_tokens.sum() if total is None else total
        weights[packed.leaf_nodes[has_tokens]] = 1.0 / (leaves * model_tokens_per_leaf[has_tokens])
    return weights


def loss_denominator(packed: PackedTree, loss_agg: str = "token-mean") -> int:
    """This packed forest's share of the loss's denominator (see `leaf_weights`'s total)."""
    tokens = _model_tokens_per_leaf(packed)
    return int(tokens.sum()) if loss_agg == "token-mean" else int((tokens > 0).sum())


def packed_loss_weights(
    forest: RolloutForest,
    packed: PackedTree,
    advantages: np.ndarray,
    kind: str = LEAF,
    *,
    loss_agg: str = "token-mean",
    leaf_weight: np.ndarray | None = None,
) -> PackedLossWeights:
    """Per-token S+, S-, W of the module docstring.

    advantages [n]: leaf advantages (kind LEAF, e.g. advantage.tree_grpo) or node advantages
    (kind NODE, e.g. advantage.segment), over the forest's nodes.
    leaf_weight [n]: aggregation weights from `leaf_weights` over the whole step's forest; pass
    them when `packed` is one micro-batch, so the micro-batch losses add up to the full loss.
    """
    adv = np.asarray(advantages, dtype=np.float64)
    if adv.shape != (forest.num_nodes,):
        raise ForestError(
            "advantages", f"has shape {adv.shape}, expected ({forest.num_nodes},): one value per forest node"
        )
    if not np.isfinite(adv).all():
        raise ForestError("advantages", f"contains {int((~np.isfinite(adv)).sum())} non-finite values")
    if kind not in (LEAF, NODE):
        raise ForestError("kind", f"must be {LEAF!r} or {NODE!r}, got {kind!r}")
    if leaf_weight is None:
        w = leaf_weights(forest, packed, loss_agg)
    else:
        w = np.asarray(leaf_weight, dtype=np.float64)
        if w.shape != (forest.num_nodes,):
            raise ForestError("leaf_weight", f"has shape {w.shape}, expected ({forest.num_nodes},)")
    weight_below = forest.subtree_sum(w)  # W per node: sum of w_l over leaves under it
    if kind == LEAF:
        pos = forest.subtree_sum(w * np.maximum(adv, 0.0))
        neg = forest.subtree_sum(w * np.minimum(adv, 0.0))
    else:
        pos = weight_below * np.maximum(adv, 0.0)
        neg = weight_below * np.minimum(adv, 0.0)
    node, mask = packed.node_of_token, packed.loss_mask
    return PackedLossWeights(
        adv_pos=np.where(mask, pos[node], 0.0),
        adv_neg=np.where(mask, neg[node], 0.0),
        kl_weight=np.where(mask, weight_below[node], 0.0),
    )


def packed_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    adv_pos: torch.Tensor,
    adv_neg: torch.Tensor,
    kl_weight: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate on packed tokens; all inputs [N]. Returns (loss, metrics).

    A token carries loss where any of its weights is non-zero; elsewhere its logprobs are ignored
    (they may be anything, NaN included: the forest's "not recorded" is NaN on tokens without loss).
    On weighted tokens old_logprobs (and ref_logprobs when kl_coef != 0) must be finite: a NaN there
    means the sampling logprob was never recorded, and the loss raises ValueError naming the argument
    rather than fall back to anything (for an on-policy update pass `logprobs.detach()`).

    The loss is finite for any log-ratio: log-ratios (and the KL estimate's log-ratio) above
    LOG_RATIO_MAX = 80 count as 80, so exp never overflows and a zero weight never meets an inf
    (0 x inf). Only the unclipped branch of a negative advantage (ratio > 1 + eps_high) and the KL
    term grow that far; there value and gradient saturate. Everywhere else, and for every log-ratio
    up to 80, values and gradients are exactly those of the formula in the module docstring.
    """
    _check_loss_inputs(
        logprobs,
        old_logprobs=old_logprobs,
        adv_pos=adv_pos,
        adv_neg=adv_neg,
        kl_weight=kl_weight,
        ref_logprobs=ref_logprobs,
    )
    active = (kl_weight != 0) | (adv_pos != 0) | (adv_neg != 0)
    _check_recorded("old_logprobs", old_logprobs, active)
    zeros = torch.zeros_like(logprobs)
    log_ratio = torch.where(active, logprobs - old_logprobs, zeros).clamp(max=LOG_RATIO_MAX)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = adv_pos * torch.minimum(ratio, clipped) + adv_neg * torch.maximum(ratio, clipped)
    loss = -surrogate.sum()
    deviation = (ratio - 1.0).abs()  # zero at inactive tokens (log ratio 0)
    metrics = {
        "clip_fraction": _weighted_mean((ratio != clipped).to(ratio.dtype), kl_weight),
        "ratio_mean": _weighted_mean(ratio, kl_weight),
        "ratio_abs_dev": _weighted_mean(deviation, kl_weight),
        "ratio_max_dev": deviation.max() if deviation.numel() else deviation.new_zeros(()),
    }
    if ref_logprobs is not None and kl_coef != 0.0:
        _check_recorded("ref_logprobs", ref_logprobs, active)
        kl = _k3(logprobs, ref_logprobs, active)
        loss = loss + kl_coef * (kl_weight * kl).sum()
        metrics["kl"] = _weighted_mean(kl, kl_weight)
    return loss, {k: v.detach() for k, v in metrics.items()}


def leaf_path_policy_loss(
    logprobs: list[torch.Tensor],
    old_logprobs: list[torch.Tensor],
    advantages: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    *,
    loss_agg: str = "token-mean",
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    ref_logprobs: list[torch.Tensor] | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Reference: the same loss over flattened leaf paths. Per leaf l, tensors [L_l]: the token's
    logprob, its sampling logprob, its advantage A_lt, and the loss mask (model tokens)."""
    if loss_agg not in LOSS_AGGREGATIONS:
        raise ForestError("loss_agg", f"unknown aggregation {loss_agg!r}; choose one of {LOSS_AGGREGATIONS}")
    counts = [int(m.sum()) for m in loss_masks]
    total = sum(counts)
    per_leaf = []
    for k, (lp, old, adv, mask) in enumerate(zip(logprobs, old_logprobs, advantages, loss_masks, strict=True)):
        ratio = torch.exp(torch.where(mask, lp - old, torch.zeros_like(lp)))
        clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        token_loss = -torch.minimum(ratio * adv, clipped * adv)
        if ref_logprobs is not None and kl_coef != 0.0:
            token_loss = token_loss + kl_coef * _k3(lp, ref_logprobs[k], mask)
        per_leaf.append(torch.where(mask, token_loss, torch.zeros_like(token_loss)).sum())
    if loss_agg == "token-mean":
        return torch.stack(per_leaf).sum() / total
    nonempty = [(s, c) for s, c in zip(per_leaf, counts) if c > 0]
    return torch.stack([s / c for s, c in nonempty]).sum() / len(nonempty)


def gather_token_logprobs(pair_logprobs: torch.Tensor, packed: PackedTree) -> torch.Tensor:
    """Scatter label-pair logprobs [M] (from linear_logprob over packed.label_rows / labels) onto the
    packed tokens they predict: [N], 0 at each prompt's first token (which nothing predicts)."""
    if pair_logprobs.shape != (packed.label_pos.size,):
        raise ForestError(
            "pair_logprobs", f"has shape {tuple(pair_logprobs.shape)}, expected ({packed.label_pos.size},)"
        )
    out = pair_logprobs.new_zeros(packed.num_tokens)
    return out.index_copy(0, torch.as_tensor(packed.label_pos, device=pair_logprobs.device), pair_logprobs)


def _k3(logprobs, ref_logprobs, active):
    """KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased); the
    log-ratio is capped at LOG_RATIO_MAX like the policy ratio's, so exp cannot overflow."""
    delta = torch.where(active, ref_logprobs - logprobs, torch.zeros_like(logprobs)).clamp(max=LOG_RATIO_MAX)
    return torch.exp(delta) - delta - 1.0


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def _model_tokens_per_leaf(packed: PackedTree) -> np.ndarray:
    """[L] model tokens on each leaf's root-to-leaf path (summed per node, not per token)."""
    cumulative = np.concatenate([[0], np.cumsum(packed.loss_mask, dtype=np.int64)])
    nodes = packed.leaf_path_nodes
    per_path_node = cumulative[packed.node_end[nodes]] - cumulative[packed.node_start[nodes]]
    return np.add.reduceat(per_path_node, packed.leaf_path_offsets[:-1]) if nodes.size else np.zeros(0, np.int64)


def _check_loss_inputs(logprobs: torch.Tensor, **others: torch.Tensor | None) -> None:
    if logprobs.ndim != 1:
        raise ValueError(f"logprobs: expected a 1-D tensor [N], got shape {tuple(logprobs.shape)}")
    for name, t in others.items():
        if t is None:
            continue
        if t.shape != logprobs.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logprobs {tuple(logprobs.shape)}")
        if t.device != logprobs.device:
            raise ValueError(f"{name}: on {t.device}, logprobs on {logprobs.device}")
    if not torch.isfinite(logprobs).all():
        raise ValueError("logprobs: contains non-finite values")
    for name in ("adv_pos", "adv_neg", "kl_weight"):
        weight = others.get(name)
        if weight is not None and not torch.isfinite(weight).all():
            raise ValueError(f"{name}: contains non-finite values")


def _check_recorded(name: str, values: torch.Tensor, active: torch.Tensor) -> None:
    """Raise unless `values` is finite on every token that carries loss."""
    bad = active & ~torch.isfinite(values)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{name}: {int(bad.sum())} token(s) that carry loss have a non-finite value (first: token {first}, "
            f"{float(values[first])}); NaN means it was never recorded. Pass the logprobs recorded at sampling "
            "(for an on-policy update, the current logprobs detached)"
        )
