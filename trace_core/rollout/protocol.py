"""What the trainer asks of a rollout engine, and what it gets back.

    engine.rollout(tasks, counts)   -> bare rollouts: counts[i] episodes of tasks[i]
    engine.expand(anchors, counts)  -> counts[a] continuations forked after turn t of rollout uid
                                       (anchors[a] = Anchor(uid, t)), sharing that prefix
    engine.release_all()            -> forget retained prefixes (KV pages, env snapshots)

Every result is an `EngineTrajectory` with a unique `uid`; a continuation records the anchor it
forks from in `branch_from = (uid, t)`. `to_forest_trajectories` turns a batch into the
`trace_core.forest.Trajectory` list that `RolloutForest.from_trajectories` builds a forest from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from trace_core.forest import Trajectory


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one turn.

    temperature     0 = greedy; logprobs are then those of the untempered model
    top_p           nucleus mass in (0, 1]; the recorded logprob is the tempered model's, before
                    the nucleus cut (the distribution a trainer recomputes)
    max_tokens      hard cap on model tokens in one turn (the turn ends there, marked truncated)
    stop_strings    the turn ends at the token that completes one of these (kept in the turn)
    stop_token_ids  the turn ends at one of these tokens (kept); the codec's EOS ids are added
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature: must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop_strings, str) or any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings: must be a tuple of non-empty strings, got {self.stop_strings!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")


@dataclass(frozen=True)
class Anchor:
    """A turn prefix to continue from: the prompt and turns 1..turn of trajectory `uid`."""

    uid: int
    turn: int


@dataclass(frozen=True)
class EngineTrajectory:
    """One finished episode.

    token_ids    [L] prompt, then every turn (model tokens followed by observation tokens)
    model_mask   [L] True where the policy sampled the token
    logprobs     [L] sampling logprob at model tokens, 0.0 at observation tokens
    turn_starts  [T] offset of each turn's first token (the prompt is token_ids[:turn_starts[0]])
    reward       the env's outcome when it ended the episode; None if the episode was cut off
    finished     the env said done (False: cut at env.max_turns)
    branch_from  (uid, t) for a continuation of trajectory uid after turn t; None for a bare rollout
    turn_info    the env's `Step.info` of each turn
    """

    uid: int
    prompt_id: int
    token_ids: list[int]
    model_mask: list[bool]
    logprobs: list[float]
    turn_starts: list[int]
    reward: float | None
    finished: bool
    branch_from: tuple[int, int] | None = None
    turn_info: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        return len(self.turn_starts)

    def turn_tokens(self, t: int) -> list[int]:
        """Tokens of turn t (1-based): its model tokens and then its observation."""
        bounds = [*self.turn_starts, len(self.token_ids)]
        return self.token_ids[bounds[t - 1] : bounds[t]]


@runtime_checkable
class RolloutEngine(Protocol):
    def rollout(self, tasks: Sequence[Mapping[str, Any]], counts: Sequence[int], *,
                prompt_ids: Sequence[int] | None = None) -> list[EngineTrajectory]:
        """counts[i] bare rollouts of tasks[i] (prompt_id defaults to i)."""

    def expand(self, anchors: Sequence[Anchor], counts: Sequence[int]) -> list[EngineTrajectory]:
        """counts[a] continuations of each anchor's prefix, with fresh env seeds."""

    def release_all(self) -> None:
        """Drop every retained prefix; anchors of earlier results can no longer be expanded."""


def to_forest_trajectories(trajectories: Sequence[EngineTrajectory]) -> list[Trajectory]:
    """Engine output -> `trace_core.forest.Trajectory` list (branch_from re-indexed by position).

    A continuation must come after the trajectory it branches from."""
    position: dict[int, int] = {}
    out = []
    for i, traj in enumerate(trajectories):
        branch = None
        if traj.branch_from is not None:
            uid, turn = traj.branch_from
            if uid not in position:
                raise ValueError(f"trajectories[{i}].branch_from: trajectory uid {uid} is not earlier in the list")
            branch = (position[uid], turn)
        position[traj.uid] = i
        out.append(Trajectory(prompt_id=traj.prompt_id, token_ids=traj.token_ids, model_mask=traj.model_mask,
                              turn_starts=traj.turn_starts, reward=traj.reward, logprobs=traj.logprobs,
                              branch_from=branch))
    return out
