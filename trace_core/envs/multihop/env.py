"""A multi-hop lookup env with a flaky tool, in short word-level text (registered as "multihop").

A small Search-R1-style task a from-scratch tiny model can learn: follow `hops` facts of a small
random knowledge base from a start entity, one tool call per turn, then answer.

Prompt (root of the tree):   "level 1 turns 4 left 2 e3"
Action (one turn, one word):  "e3"  (look e3 up: the tool call)   or   "answer"  (ends the episode)
Observation after a lookup:  "left 1 e7"        the fact e3 -> e7 was found: one hop fewer left
                             "fail left 2 e3"   the tool failed (probability `noise` per lookup)
                             "none left 2 e3"   no fact about e3 in the knowledge base

Every prompt and observation ends with "left H X": H counts the hops still to follow (the
question's hops minus the lookups that returned a fact, whichever entity was looked up; never
below 0) and X is the entity the agent holds (the last fact's object, or the entity it just looked
up when that lookup failed or found nothing). So the observation tells the agent what it asked
and how many facts it has followed; whether it followed the right ones it must keep track of
itself. "answer" submits X, the entity held. The optimal policy looks up X while H > 0 and
answers at H = 0; only tool failures with too few turns left make it fail.

Why this format (one word per action, the answer bound to the held entity): the tiny model learns
from scratch by RL, so a random-init policy must sometimes succeed. With "answer eJ" naming any
entity it learnt in 250 steps to guess an entity at once (1 in 8 right, the random level) and never
to look up; with two-word actions ("lookup e3" / "answer") a random-init policy almost never
completes a lookup (1 in ~900 turns) and nothing was learnt in 80 steps.

Action parsing and malformed actions (policy `on_invalid`, see base.INVALID_ACTION_POLICIES):
    The action text is lower-cased and end-of-turn / eos markers ("<eot>", "<eos>", "</s>") are
    removed. The first word must be an entity e0..e7 (a lookup) or "answer"; "lookup e3" is read as
    "e3" too (readable scripts). Further words are ignored (reported in info["ignored_text"]).
    Anything else is invalid.
    on_invalid="continue" (default): the turn is used, no randomness is drawn, the observation is
        "invalid " followed by the previous "left H X".
    on_invalid="end": the episode ends with reward 0 (info["end_reason"] == "invalid_action").
Episode end: an answer (reward 1 iff the entity held is the task's answer: "correct" / "wrong"), or a turn that
is not an answer when the task's `max_turns` turns are used up (reward 0, "turn_limit").
Randomness: one uniform draw per valid lookup, so a continuation's tool failures are resampled
when it is restored with a fresh seed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trace_core.envs.base import (
    EpisodeStateError,
    Step,
    TurnEpisode,
)
from trace_core.envs.multihop.tasks import ENTITIES, MAX_TURNS, HopTask, parse_hop_task

END_MARKERS = ("<eot>", "<eos>", "</s>")
_END_MARKER_RE = re.compile("|".join(re.escape(m) for m in END_MARKERS))


def parse_hop_action(text: str) -> tuple[tuple[str, str | None] | None, str | None]:
    """(("lookup", entity) or ("answer", None), None) for a valid action, (None, reason) otherwise.
    See the module docstring."""
    if not isinstance(text, str):
        return None, f"action must be text, got {type(text).__name__}"
    words = _END_MARKER_RE.sub(" ", text.lower()).split()
    if not words:
        return None, "empty action"
    if words[0] == "answer":
        return ("answer", None), None
    if words[0] in ENTITIES:
        return ("lookup", words[0]), None
    if words[0] != "lookup":
        return None, f"unknown action {words[0]!r}; expected an entity e0..e{len(ENTITIES) - 1} or 'answer'"
    if len(words) < 2 or words[1] not in ENTITIES:
        got = repr(words[1]) if len(words) > 1 else "nothing"
        return None, f"lookup needs an entity e0..e{len(ENTITIES) - 1}, got {got}"
    return ("lookup", words[1]), None


def render_state(left: int, entity: str) -> str:
    return f"left {left} {entity}"


def render_prompt(task: HopTask) -> str:
    return f"level {task.level} turns {task.max_turns} " + render_state(task.hops, task.start)


class MultiHopEnv(TurnEpisode):
    """Env protocol implementation; one episode at a time, resumable at any turn.

    max_turns  cap on any task's turn limit; after `reset` it holds the current task's limit
               (min of the task's `max_turns` and this cap).
    on_invalid "continue" | "end": what a malformed action does (module docstring).
    """

    def __init__(self, max_turns: int = MAX_TURNS, on_invalid: str = "continue"):
        self._configure(max_turns, on_invalid)
        self._task: HopTask | None = None
        self._record: dict[str, Any] | None = None

    # --- protocol ---------------------------------------------------------------------------
    def reset(self, task: Mapping[str, Any], *, seed: int | None = None) -> str:
        self._task = parse_hop_task(task)
        self._record = dict(task)
        self._begin(self._task.max_turns, seed)
        self.left, self.entity = self._task.hops, self._task.start
        return render_prompt(self._task)

    def step(self, action: str) -> Step:
        task = self._require_running()
        self.turn += 1
        parsed, error = parse_hop_action(action)
        info: dict[str, Any] = {"turn": self.turn, "action": None if parsed is None else parsed[0]}
        if parsed is None:
            return self._invalid(error, info, render_state(self.left, self.entity))
        verb, entity = parsed
        words = _END_MARKER_RE.sub(" ", action.lower()).split()
        ignored = words[2 if words[0] == "lookup" else 1 :]
        if ignored:
            info["ignored_text"] = " ".join(ignored)
        if verb == "answer":
            info["answer"] = self.entity
            correct = self.entity == task.answer
            return self._finish(1.0 if correct else 0.0, "correct" if correct else "wrong", info)

        u = float(self._rng.random())  # one draw per valid lookup, always
        if u < task.noise:
            result, self.entity = "fail", entity
        elif entity not in task.facts:
            result, self.entity = "none", entity
        else:
            result, self.entity = "found", task.facts[entity]
            self.left = max(self.left - 1, 0)
        info["lookup"], info["result"], info["left"], info["entity"] = entity, result, self.left, self.entity
        if self.turn >= self.max_turns:
            return self._finish(0.0, "turn_limit", info)
        prefix = "" if result == "found" else result + " "
        return Step(prefix + render_state(self.left, self.entity), False, None, info)

    def snapshot(self) -> dict[str, Any]:
        self._require_reset()
        return {"task": dict(self._record), "left": self.left, "entity": self.entity, **self._episode_state()}

    def restore(self, snapshot: Any, *, seed: int | None = None) -> None:
        self._restore_episode(snapshot, seed)
        self._record = dict(snapshot["task"])
        self._task = parse_hop_task(self._record)
        self.left, self.entity = snapshot["left"], snapshot["entity"]

    # --- helpers ----------------------------------------------------------------------------
    @property
    def task(self) -> HopTask:
        return self._require_reset()

    def _require_reset(self) -> HopTask:
        if self._task is None:
            raise EpisodeStateError("MultiHopEnv: call reset(task) (or restore) before using the env")
        return self._task
