"""Allocation as a pair of strategies: a Stage-1 root strategy and a Stage-2 prefix strategy.

Each strategy says what it needs (`uses_predictor`) and does (`expands`, its `cold_start`), so a trainer
runs any pair without branching on a mode name:

    allocation = build_allocation("trace", options={"root_method": "ranked"})
    step = allocation if predictor_ready else allocation.cold()
    counts = step.root(v, step.bare_budget(M, N), m_min=.., m_max=.., eps=.., rng=rng)        # Stage 1
    budget = step.continuation_budget(counts, N)                                            # per prompt
    k = step.prefix(p, r, group, budget[active], k_max=.., eps=.., rng=rng) if step.expands else None

Both stages come from registries of factories: `register_root_strategy(name)` / `register_prefix_strategy(name)`
decorate a class (or any callable) whose call builds the strategy; options a factory's signature accepts
are passed to it (e.g. count_per_prompt, root_method), so a factory without parameters works too. A mode is
a named pair: `register_mode(name, root=..., prefix=...)`. Built-in modes: trace = active/active,
uniform = uniform/none, random_tree = uniform/random, pcl = pcl/none (docs/method.md's baselines).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trace_core.allocation.checks import AllocationError
from trace_core.registry import Registry, call_with_options


@runtime_checkable
class RootStrategy(Protocol):
    """Stage 1: bare rollouts per candidate prompt."""

    uses_predictor: bool  # reads Vhat of the prompts
    cold_start: str | None  # registered root strategy to run while the predictor is untrained (None: run on v = 0.5)

    def __call__(
        self, v: np.ndarray, budget: int, *, m_min: int, m_max: int | None, eps: float, rng: np.random.Generator
    ) -> np.ndarray:
        """(B,) int64 counts in {0} U [m_min, m_max], summing to budget."""
        ...


@runtime_checkable
class PrefixStrategy(Protocol):
    """Stage 2: continuations per anchor (turn prefix) within each prompt."""

    uses_predictor: bool
    expands: bool  # False: samples no continuation (the pair's bare budget is then every leaf)
    cold_start: str | None

    def __call__(
        self,
        p: np.ndarray,
        r: np.ndarray,
        group: np.ndarray,
        budget_per_group: np.ndarray,
        *,
        k_max: int | None,
        eps: float,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """(N,) int64 counts in [0, k_max], summing to budget_per_group[g] over each group g."""
        ...


ROOT_STRATEGIES: Registry[Callable[..., RootStrategy]] = Registry(
    "root strategy", field="allocation.root_strategy", error=AllocationError, callable_only=True
)
PREFIX_STRATEGIES: Registry[Callable[..., PrefixStrategy]] = Registry(
    "prefix strategy", field="allocation.prefix_strategy", error=AllocationError, callable_only=True
)
MODES: Registry[tuple[str, str]] = Registry("mode", field="allocation.mode", error=AllocationError)


def register_root_strategy(name: str, factory: Any = None, *, replace: bool = False) -> Any:
    """Register a root-strategy factory (decorator without `factory`); a "module:attribute" path is lazy."""
    return (
        ROOT_STRATEGIES.register(name, replace=replace)
        if factory is None
        else ROOT_STRATEGIES.register(name, factory, replace=replace)
    )


def register_prefix_strategy(name: str, factory: Any = None, *, replace: bool = False) -> Any:
    """Register a prefix-strategy factory (decorator without `factory`); a "module:attribute" path is lazy."""
    return (
        PREFIX_STRATEGIES.register(name, replace=replace)
        if factory is None
        else PREFIX_STRATEGIES.register(name, factory, replace=replace)
    )


def register_mode(name: str, *, root: str, prefix: str, replace: bool = False) -> None:
    """Name a pair of registered strategies (they are resolved when the mode is built, so order is free)."""
    for key, value in (("root", root), ("prefix", prefix)):
        if not isinstance(value, str) or not value:
            raise AllocationError(key, f"{key} must name a registered {key} strategy, got {value!r}")
    MODES.register(name, (root, prefix), replace=replace)


def available_root_strategies() -> list[str]:
    return ROOT_STRATEGIES.names()


def available_prefix_strategies() -> list[str]:
    return PREFIX_STRATEGIES.names()


def available_modes() -> list[str]:
    return MODES.names()


@dataclass(frozen=True)
class Allocation:
    """A Stage-1 strategy and a Stage-2 strategy, with their registered names and the options they were built with."""

    root: RootStrategy
    prefix: PrefixStrategy
    root_name: str
    prefix_name: str
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_predictor(self) -> bool:
        """Either stage reads the predictor."""
        return bool(self.root.uses_predictor or self.prefix.uses_predictor)

    @property
    def expands(self) -> bool:
        return bool(self.prefix.expands)

    def bare_budget(self, roots: int, continuations_per_root: int) -> int:
        """Bare rollouts of a step: `roots` if the pair expands, else every leaf roots * (1 + N), so every
        pair samples the same number of leaves per step."""
        return int(roots) if self.expands else int(roots) * (1 + int(continuations_per_root))

    def continuation_budget(self, counts: np.ndarray, continuations_per_root: int) -> np.ndarray:
        """(B,) continuations per prompt: counts * N if the pair expands, else zeros."""
        counts = np.asarray(counts, dtype=np.int64)
        return counts * int(continuations_per_root) if self.expands else np.zeros_like(counts)

    def cold(self) -> Allocation:
        """The pair to run while the predictor is not ready: each stage that uses the predictor is replaced by
        its cold_start strategy (a stage whose cold_start is None stays, and runs on v = 0.5)."""
        changes: dict[str, Any] = {}
        if self.root.uses_predictor and self.root.cold_start is not None:
            name = self.root.cold_start
            changes.update(root=_build_root(name, self.options, "allocation.root_strategy"), root_name=name)
        if self.prefix.uses_predictor and self.prefix.cold_start is not None:
            name = self.prefix.cold_start
            changes.update(prefix=_build_prefix(name, self.options, "allocation.prefix_strategy"), prefix_name=name)
        return replace(self, **changes) if changes else self

    def describe(self) -> str:
        return f"{self.root_name}/{self.prefix_name}"


def build_allocation(
    mode: str,
    *,
    root_strategy: str | None = None,
    prefix_strategy: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Allocation:
    """The pair `mode` names, with either stage replaced by `root_strategy` / `prefix_strategy` when given.

    `options` go to every strategy factory whose signature accepts them (count_per_prompt, root_method, ...).
    Unknown names raise AllocationError naming allocation.mode / allocation.root_strategy /
    allocation.prefix_strategy and listing the registered names.
    """
    root_name, prefix_name = MODES.get(mode)
    root_name = root_strategy if root_strategy is not None else root_name
    prefix_name = prefix_strategy if prefix_strategy is not None else prefix_name
    options = MappingProxyType(dict(options or {}))
    root = _build_root(
        root_name, options, "allocation.root_strategy" if root_strategy is not None else "allocation.mode"
    )
    prefix = _build_prefix(
        prefix_name, options, "allocation.prefix_strategy" if prefix_strategy is not None else "allocation.mode"
    )
    allocation = Allocation(root, prefix, root_name, prefix_name, options)
    # the cold-start strategies must exist too: a typo there would otherwise surface at the first step
    allocation.cold()
    return allocation


def _build_root(name: str, options: Mapping[str, Any], field: str) -> RootStrategy:
    strategy = _build(ROOT_STRATEGIES, name, options, field)
    _check_attributes(strategy, name, field, ("uses_predictor", "cold_start"))
    return strategy


def _build_prefix(name: str, options: Mapping[str, Any], field: str) -> PrefixStrategy:
    strategy = _build(PREFIX_STRATEGIES, name, options, field)
    _check_attributes(strategy, name, field, ("uses_predictor", "expands", "cold_start"))
    return strategy


def _build(registry: Registry, name: str, options: Mapping[str, Any], field: str) -> Any:
    factory = registry.get(name, field=field)
    return call_with_options(factory, dict(options))  # a bad option raises an AllocationError naming it


def _check_attributes(strategy: Any, name: str, field: str, attributes: tuple[str, ...]) -> None:
    missing = [a for a in attributes if not hasattr(strategy, a)]
    if missing or not callable(strategy):
        lacks = ", ".join(missing + ([] if callable(strategy) else ["__call__"]))
        raise AllocationError(
            field,
            f"{name!r} builds a {type(strategy).__name__}, which lacks {lacks} "
            f"(see trace_core.allocation.modes for the strategy protocol)",
        )


register_mode("trace", root="active", prefix="active")
register_mode("uniform", root="uniform", prefix="none")
register_mode("random_tree", root="uniform", prefix="random")
register_mode("pcl", root="pcl", prefix="none")

__all__ = [
    "MODES",
    "PREFIX_STRATEGIES",
    "ROOT_STRATEGIES",
    "Allocation",
    "PrefixStrategy",
    "RootStrategy",
    "available_modes",
    "available_prefix_strategies",
    "available_root_strategies",
    "build_allocation",
    "register_mode",
    "register_prefix_strategy",
    "register_root_strategy",
]
