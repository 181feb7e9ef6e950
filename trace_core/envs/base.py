"""The environment protocol: multi-turn text tasks whose state can be resumed at any turn prefix.

An episode is text in, text out. `reset` returns the prompt text; each `step` takes the policy's
action text (one turn) and returns the observation appended after it. TRACE forks continuations at
turn prefixes, so an engine snapshots the env after every turn and restores it later, optionally
with a fresh seed so the continuation's environment randomness is resampled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable


@dataclass(frozen=True)
class Step:
    """Result of one turn.

    observation  text shown to the policy after its action ("" when the episode ended)
    done         the episode is over (answer given, goal reached, turn limit hit, ...)
    reward       outcome in [0, 1]; set exactly when done is True
    info         diagnostics (parsed action, tool latency, why the episode ended, ...)
    """

    observation: str
    done: bool
    reward: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Env(Protocol):
    """One episode of a task at a time."""

    max_turns: int

    def reset(self, task: Mapping[str, Any], *, seed: int | None = None) -> str:
        """Start an episode on `task`; returns the prompt text (the root of the rollout tree)."""

    def step(self, action: str) -> Step:
        """Apply one turn's action text; returns the observation (and reward when done)."""

    def snapshot(self) -> Any:
        """Opaque, picklable state after the turns played so far (RNG state included)."""

    def restore(self, snapshot: Any, *, seed: int | None = None) -> None:
        """Resume exactly at `snapshot`; with `seed`, reseed the randomness of future turns."""
