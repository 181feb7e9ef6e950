"""What an allocation is expected to buy: the stage objectives and the effective ratio they imply.

The effective ratio (docs/method.md step 7) is the fraction of active prompts whose tree has both a 0
and a 1 leaf. These helpers give its expectation under the predictor's probabilities (clipped to
[eps, 1 - eps] like the allocators do), treating outcomes as independent given the prefix.
"""

from __future__ import annotations

import numpy as np

from trace_core.allocation import checks
from trace_core.allocation.exact import repeat_probability


def root_mixed_probability(v, counts, *, eps: float = 0.02) -> np.ndarray:
    """(B,) chance that prompt i's m_i bare rollouts are mixed: 1 - v^m - (1-v)^m, 0 when m <= 1."""
    v, counts = _check_counts_for("v", checks.as_probabilities(v, "v"), counts)
    v = checks.clipped(v, checks.as_eps(eps))
    mixed = 1.0 - v**counts - (1.0 - v) ** counts
    return np.where(counts >= 2, mixed, 0.0)


def expected_root_objective(v, counts, *, eps: float = 0.02) -> float:
    """Stage-1 objective of a root allocation: expected number of prompts with mixed bare rollouts."""
    return float(root_mixed_probability(v, counts, eps=eps).sum())


def root_effective_ratio_estimate(v, counts, *, eps: float = 0.02) -> float:
    """Expected effective ratio before prefix expansion: mean mixed chance over prompts with m_i > 0.

    NaN when no prompt is active (budget 0): the ratio is undefined, not zero.
    """
    mixed = root_mixed_probability(v, counts, eps=eps)
    active = np.asarray(counts) > 0
    return float(mixed[active].mean()) if active.any() else float("nan")


def expected_prefix_objective(p, r, counts, *, eps: float = 0.02) -> float:
    """Stage-2 objective of a prefix allocation: sum over anchors of 1 - q^k (chance some continuation flips)."""
    p = checks.as_probabilities(p, "p")
    r = checks.as_binary_outcomes(r, "r")
    checks.check_same_length("p", p, r=r)
    p, counts = _check_counts_for("p", p, counts)
    return float((1.0 - repeat_probability(p, r, checks.as_eps(eps)) ** counts).sum())


def tree_mixed_probability(p, r, group, counts, bare_mixed, *, eps: float = 0.02) -> np.ndarray:
    """(G,) chance that each prompt's tree ends with both outcomes, given its bare rollouts and expansion.

    Args:
        p, r, group: anchors as for allocate_prefixes.
        counts: (N,) continuations per anchor (e.g. the output of allocate_prefixes).
        bare_mixed: (G,) bool, whether group g's bare rollouts already hold both outcomes
            (then its tree is mixed for sure). len(bare_mixed) defines the group ids.

    A group whose bare rollouts all agree becomes mixed iff some continuation flips:
    1 - prod over its anchors of q^k.
    """
    bare_mixed = np.asarray(bare_mixed)
    if bare_mixed.ndim != 1 or bare_mixed.dtype != bool:
        raise checks.AllocationError(
            "bare_mixed",
            f"bare_mixed must be a 1-D bool array (one entry per group), got {bare_mixed.dtype} {bare_mixed.shape}",
        )
    p = checks.as_probabilities(p, "p")
    r = checks.as_binary_outcomes(r, "r")
    group = checks.as_group_ids(group, bare_mixed.shape[0])
    checks.check_same_length("p", p, r=r, group=group)
    p, counts = _check_counts_for("p", p, counts)
    q = repeat_probability(p, r, checks.as_eps(eps))
    # log q^k summed per group; q >= eps > 0 keeps the log finite unless eps = 0 and q = 0 with k > 0.
    with np.errstate(divide="ignore"):
        log_no_flip = np.where(counts > 0, counts * np.log(q), 0.0)
    no_flip = np.exp(np.bincount(group, weights=log_no_flip, minlength=bare_mixed.shape[0]))
    return np.where(bare_mixed, 1.0, 1.0 - no_flip)


def tree_effective_ratio_estimate(p, r, group, counts, bare_mixed, *, eps: float = 0.02) -> float:
    """Expected effective ratio after prefix expansion: mean of tree_mixed_probability over the groups.

    NaN when there is no group.
    """
    mixed = tree_mixed_probability(p, r, group, counts, bare_mixed, eps=eps)
    return float(mixed.mean()) if mixed.size else float("nan")


def _check_counts_for(reference_name: str, reference: np.ndarray, counts) -> tuple[np.ndarray, np.ndarray]:
    counts = checks.as_nonnegative_ints(counts, "counts")
    checks.check_same_length(reference_name, reference, counts=counts)
    return reference, counts
