"""The environment protocol: multi-turn text tasks whose state can be resumed at any turn prefix.

An episode is text in, text out. `reset` returns the prompt text; each `step` takes the policy's
action text (one turn) and returns the observation appended after it. TRACE forks continuations at
turn prefixes, so an engine snapshots the env after every turn and restores it later, optionally
with a fresh seed so the continuation's environment randomness is resampled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from trace_core.errors import TraceError


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


def step_all(envs: Sequence[Env], actions: Sequence[str]) -> list[Step]:
    """One turn of several episodes at once (an engine calls this once per decode round).

    Envs whose class defines `step_batch(envs, actions) -> list[Step]` (a staticmethod or
    classmethod) take their turns in one call, so a tool can serve every branch of the round
    together (e.g. one retrieval request for all searches); other envs step one by one. Results come
    back in input order."""
    if len(envs) != len(actions):
        raise TraceError("actions", f"{len(actions)} actions for {len(envs)} envs")
    steps: list[Step | None] = [None] * len(envs)
    by_class: dict[type, list[int]] = {}
    for i, env in enumerate(envs):
        by_class.setdefault(type(env), []).append(i)
    for cls, rows in by_class.items():
        batch = getattr(cls, "step_batch", None)
        if batch is None:
            for i in rows:
                steps[i] = envs[i].step(actions[i])
            continue
        results = list(batch([envs[i] for i in rows], [actions[i] for i in rows]))
        if len(results) != len(rows):
            raise TraceError(f"{cls.__name__}.step_batch", f"returned {len(results)} steps for {len(rows)} envs")
        for i, step in zip(rows, results):
            steps[i] = step
    return [s for s in steps if s is not None]


# --- additions shared by the concrete environments -------------------------------------------

INVALID_ACTION_POLICIES = ("continue", "end")
"""What an env does with an action its parser rejects (set per env with `on_invalid`):

continue  the turn is used up, the observation says the action was invalid (and repeats what the
          policy needs to go on), the episode goes on; the turn limit still applies.
end       the episode ends at once with reward 0 and info["end_reason"] == "invalid_action".
"""


class EnvError(TraceError):
    """A user-caused error in an env's configuration or task record: EnvError(field, message), `field` names it."""


class EpisodeStateError(RuntimeError):
    """An env method was called in the wrong state (step before reset, step after done)."""


@runtime_checkable
class TaskSource(Protocol):
    """Where an env's task records come from, by split ("train" / "eval")."""

    def tasks(self, split: str) -> list[dict[str, Any]]:
        """All task records of `split`, each a JSON-serialisable dict accepted by the env's `reset`."""

    # Optional: `reference_success(tasks) -> {"random policy": p, ...}`, the success of scripted policies on
    # `tasks` (exact or Monte Carlo). The trainer logs it with the step-0 evaluation (`reference/<name>`) and
    # the plots draw it, so a reader sees what "learned something" means on this env.


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise EnvError naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise EnvError(name, f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive_int(name: str, value: Any) -> int:
    """Raise EnvError naming `name` unless `value` is an int >= 1; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EnvError(name, f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_split(split: Any) -> str:
    check_choice("split", split, ("train", "eval"))
    return split


def require_field(task: Mapping[str, Any], field_name: str, kind: type | tuple[type, ...], where: str = "task") -> Any:
    """task[field_name], checked to be of `kind`; EnvError naming the field otherwise."""
    if not isinstance(task, Mapping):
        raise EnvError(where, f"{where} must be a mapping (dict), got {type(task).__name__}")
    if field_name not in task:
        raise EnvError(where, f"{where} is missing the field {field_name!r}")
    value = task[field_name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    bool_as_number = isinstance(value, bool) and bool not in kinds  # True is an int to Python, not to us
    if not isinstance(value, kinds) or bool_as_number:
        names = "/".join(k.__name__ for k in kinds)
        raise EnvError(
            field_name, f"{where} field {field_name!r} must be {names}, got {type(value).__name__}: {value!r}"
        )
    return value


def check_seed(seed: Any) -> int | None:
    """Raise EnvError naming `seed` unless it is None or a non-negative integer."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise EnvError("seed", f"seed must be None or an integer >= 0, got {seed!r}")
    return seed


class TurnEpisode:
    """Bookkeeping shared by the embedded turn-based envs (grid world, multihop): the turn cap and the policy
    for malformed actions, the turn counter, the end of an episode, and the random stream that `snapshot`
    carries and `restore` resumes or reseeds. A subclass calls `_configure` in `__init__`, `_begin` in `reset`,
    puts `_episode_state()` in its snapshot and calls `_restore_episode` first in `restore`, and defines
    `_require_reset()` (its parsed task, or EpisodeStateError before the first reset)."""

    turn_cap: int
    on_invalid: str
    turn: int
    max_turns: int
    done: bool
    reward: float | None
    _rng: np.random.Generator

    def _configure(self, max_turns: int, on_invalid: str) -> None:
        """max_turns: cap on any task's turn limit; on_invalid: "continue" | "end" (INVALID_ACTION_POLICIES)."""
        self.turn_cap = check_positive_int("max_turns", max_turns)
        check_choice("on_invalid", on_invalid, INVALID_ACTION_POLICIES)
        self.on_invalid = on_invalid
        self.max_turns = self.turn_cap
        self._rng = np.random.default_rng()

    def _begin(self, task_max_turns: int, seed: int | None) -> None:
        """A new episode: the task's turn limit (capped), a stream seeded by `seed`, no turn taken yet."""
        self.max_turns = min(task_max_turns, self.turn_cap)
        self._rng = np.random.default_rng(check_seed(seed))
        self.turn = 0
        self.done = False
        self.reward = None

    def _require_reset(self) -> Any:
        raise NotImplementedError

    @property
    def turns_left(self) -> int:
        return self.max_turns - self.turn

    def _require_running(self) -> Any:
        task = self._require_reset()
        if self.done:
            raise EpisodeStateError(
                f"{type(self).__name__}: the episode is over; reset or restore before stepping again"
            )
        return task

    def _finish(self, reward: float, reason: str, info: dict[str, Any]) -> Step:
        self.done, self.reward = True, reward
        info["end_reason"] = reason
        return Step("", True, reward, info)

    def _invalid(self, error: str | None, info: dict[str, Any], observation: str) -> Step:
        """A malformed action: the episode ends (on_invalid "end") or the turn is used with no move and no
        random draw, the observation prefixed by "invalid"."""
        info["invalid_reason"] = error
        if self.on_invalid == "end":
            return self._finish(0.0, "invalid_action", info)
        if self.turn >= self.max_turns:
            return self._finish(0.0, "turn_limit", info)
        return Step("invalid " + observation, False, None, info)

    def _episode_state(self) -> dict[str, Any]:
        """The snapshot entries every turn-based env has: turn limit, counter, end, reward, random stream."""
        return {
            "max_turns": self.max_turns,
            "turn": self.turn,
            "done": self.done,
            "reward": self.reward,
            "rng": self._rng.bit_generator.state,
        }

    def _restore_episode(self, snapshot: Any, seed: int | None) -> None:
        """Check that `snapshot` came from this env's `snapshot()`, then restore what `_episode_state` saved:
        the snapshot's random stream continues (seed None), or a fresh one starts from `seed`."""
        if not isinstance(snapshot, Mapping) or "task" not in snapshot or "rng" not in snapshot:
            name = type(self).__name__
            raise EnvError("snapshot", f"snapshot must be a value returned by {name}.snapshot()")
        check_seed(seed)
        self.max_turns = snapshot["max_turns"]
        self.turn, self.done, self.reward = snapshot["turn"], snapshot["done"], snapshot["reward"]
        if seed is None:
            self._rng = np.random.default_rng()
            self._rng.bit_generator.state = snapshot["rng"]
        else:
            self._rng = np.random.default_rng(seed)


def round_robin_tasks(
    num_tasks: int,
    split: str,
    levels: Sequence[int],
    rng: np.random.Generator,
    draw: Callable[[np.random.Generator, int], dict[str, Any]],
    split_of: Callable[[Mapping[str, Any]], str],
    id_prefix: str,
) -> list[dict[str, Any]]:
    """`num_tasks` tasks of `split` for a leveled task generator: levels in round-robin order, each task
    drawn by `draw(rng, level)` until one falls in `split` (`split_of`), ids `<id_prefix>-<k>`."""
    tasks: list[dict[str, Any]] = []
    while len(tasks) < num_tasks:
        task = draw(rng, levels[len(tasks) % len(levels)])
        if split_of(task) == split:
            task["id"] = f"{id_prefix}-{len(tasks)}"
            tasks.append(task)
    return tasks


def scripted_success_rate(
    env: Any, tasks: Sequence[Mapping[str, Any]], policy: Any, *, episodes_per_task: int = 1, seed: int = 0
) -> float:
    """Fraction of episodes that end with reward 1 when `policy(env, observation, rng) -> action` plays `tasks`
    in `env`, each episode reset with a seed drawn from one stream seeded by `seed` (the embedded envs'
    Monte-Carlo anchors: their `policies.rollout_success_rate`)."""
    rng = np.random.default_rng(seed)
    wins = total = 0
    for task in tasks:
        for _ in range(episodes_per_task):
            obs = env.reset(task, seed=int(rng.integers(2**31)))
            step = None
            while step is None or not step.done:
                step = env.step(policy(env, obs, rng))
                obs = step.observation
            wins += step.reward == 1.0
            total += 1
    return wins / total
