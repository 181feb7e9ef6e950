"""Input validation shared by every rollout allocator (fast, reference and baselines).

Each check turns user input into the exact array type the solvers expect, or raises an AllocationError
(a ValueError) that names the offending argument and, where it helps, the first bad element.
"""

from __future__ import annotations

import numbers

import numpy as np

from trace_core.errors import TraceError


class AllocationError(TraceError):
    """Bad input to an allocation strategy; `field` names the argument (v, budget, group, ...)."""


def as_count(value, name: str, *, minimum: int = 0) -> int:
    """A Python int >= minimum from an int-like scalar (bool and float are rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise AllocationError(name, f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise AllocationError(name, f"{name} must be >= {minimum}, got {value}")
    return value


def as_optional_count(value, name: str, *, minimum: int) -> int | None:
    return None if value is None else as_count(value, name, minimum=minimum)


def as_eps(eps) -> float:
    """The clipping margin: probabilities are clipped to [eps, 1 - eps], so eps lies in [0, 0.5]."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise AllocationError("eps", f"eps must be a float in [0, 0.5], got {eps!r}")
    eps = float(eps)
    if not (0.0 <= eps <= 0.5):  # also rejects NaN
        raise AllocationError("eps", f"eps must be a float in [0, 0.5], got {eps}")
    return eps


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise AllocationError(name, f"{name} must be a 1-D array, got shape {array.shape}")
    return array


def as_probabilities(values, name: str) -> np.ndarray:
    """Contiguous float64 1-D array of probabilities (the input itself when it already is one).

    NaN or values outside [0, 1] are errors.
    """
    array = _as_1d(values, name)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise AllocationError(name, f"{name} must hold real numbers (probabilities), got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float64)  # no copy when it already is
    # Two reductions instead of boolean masks (NaN makes min/max NaN): no temporaries on valid input.
    if array.size == 0 or (array.min() >= 0.0 and array.max() <= 1.0):
        return array
    bad = np.flatnonzero(~((array >= 0.0) & (array <= 1.0)))  # NaN fails both comparisons
    i = int(bad[0])
    raise AllocationError(
        name,
        f"{name} must hold probabilities in [0, 1] (no NaN); {name}[{i}] = {array[i].item()!r}"
        f" ({bad.size} bad value{'s' if bad.size > 1 else ''})",
    )


def as_binary_outcomes(values, name: str) -> np.ndarray:
    """Contiguous int64 1-D array of 0/1 outcomes (bool, int, or float 0.0/1.0 accepted; no copy if int64)."""
    array = _as_1d(values, name)
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise AllocationError(name, f"{name} must hold 0/1 outcomes, got dtype {array.dtype}")
    if not _is_binary(array):
        bad = np.flatnonzero(~((array == 0) | (array == 1)))
        i = int(bad[0])
        raise AllocationError(name, f"{name} must hold outcomes in {{0, 1}}; {name}[{i}] = {array[i].item()!r}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _is_binary(array: np.ndarray) -> bool:
    if array.dtype == bool or array.size == 0:
        return True
    if np.issubdtype(array.dtype, np.integer):  # two reductions, no boolean temporaries
        return bool(array.min() >= 0 and array.max() <= 1)
    return bool(((array == 0) | (array == 1)).all())


def as_nonnegative_ints(values, name: str) -> np.ndarray:
    """Contiguous int64 1-D integer array with no negative entry (no copy if it already is one)."""
    array = _as_1d(values, name)
    if array.size == 0:  # np.asarray([]) is float64; an empty list is a fine empty id array
        return np.zeros(0, dtype=np.int64)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise AllocationError(name, f"{name} must hold integers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.min() >= 0:
        return array
    i = int(np.flatnonzero(array < 0)[0])
    raise AllocationError(name, f"{name} must be >= 0 everywhere; {name}[{i}] = {array[i].item()}")


def check_same_length(reference_name: str, reference: np.ndarray, **others: np.ndarray) -> None:
    for name, array in others.items():
        if array.shape[0] != reference.shape[0]:
            raise AllocationError(
                name,
                f"{name} has length {array.shape[0]} but {reference_name} has length {reference.shape[0]};"
                " they must describe the same items",
            )


def as_group_ids(group, n_groups: int) -> np.ndarray:
    """int64 group ids, each in [0, n_groups) where n_groups = len(budget_per_group)."""
    group = as_nonnegative_ints(group, "group")
    if group.size and int(group.max()) >= n_groups:
        i = int(np.argmax(group >= n_groups))
        raise AllocationError(
            "group",
            f"group[{i}] = {group[i].item()} but budget_per_group has {n_groups} entries (one per group id"
            f" 0..{n_groups - 1}); budget_per_group must have length > max(group)",
        )
    return group


def check_root_caps(m_min: int, m_max: int | None) -> None:
    if m_max is not None and m_max < m_min:
        raise AllocationError("m_min", f"m_min ({m_min}) must be <= m_max ({m_max})")


def effective_root_cap(budget: int, m_max: int | None) -> int:
    """m_max=None means no cap beyond the budget itself."""
    return budget if m_max is None else min(m_max, budget)


def check_root_budget_reachable(n_prompts: int, budget: int, m_min: int, m_max: int | None) -> None:
    """Some k <= n_prompts active prompts must hold the whole budget: k*m_min <= budget <= k*cap."""
    if budget == 0:
        return
    cap = effective_root_cap(budget, m_max)
    # k active prompts hold between k*m_min and k*cap rollouts; the smallest k with k*cap >= budget
    # is the one most likely to also satisfy k*m_min <= budget.
    k = -(-budget // cap) if cap >= m_min else None
    if k is not None and k <= n_prompts and k * m_min <= budget:
        return
    raise AllocationError(
        "budget",
        f"budget={budget} cannot be spent exactly with counts in {{0}} U [m_min={m_min}, {cap}] over"
        f" {n_prompts} prompt(s): k active prompts take between k*{m_min} and k*{cap} rollouts and no"
        f" k in 0..{n_prompts} covers {budget}"
        + (f" (at most {n_prompts * cap} in total)" if n_prompts * cap < budget else ""),
    )


def group_sizes(group: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(group, minlength=n_groups).astype(np.int64, copy=False)


def check_prefix_budget_reachable(sizes: np.ndarray, budget_per_group: np.ndarray, k_max: int | None) -> None:
    """Every group must be able to absorb its budget: anchors * k_max >= budget (k_max=None: any anchor)."""
    capacity = sizes * k_max if k_max is not None else np.where(sizes > 0, np.iinfo(np.int64).max, 0)
    bad = np.flatnonzero(budget_per_group > capacity)
    if bad.size:
        g = int(bad[0])
        cap_text = f"k_max={k_max}, so at most {int(capacity[g])} continuations" if k_max is not None else "no anchor"
        raise AllocationError(
            "budget_per_group",
            f"budget_per_group[{g}] = {int(budget_per_group[g])} is not reachable: group {g} has"
            f" {int(sizes[g])} anchor(s) ({cap_text}); {bad.size} group(s) affected",
        )


def clipped(values: np.ndarray, eps: float) -> np.ndarray:
    """The method clips predicted probabilities to [eps, 1 - eps] (docs/method.md steps 1 and 3)."""
    return np.clip(values, eps, 1.0 - eps)
