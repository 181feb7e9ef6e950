"""The embedded default env: a slippery grid world with short, word-level text.

Prompt (root of the tree):  "level 2 turns 7 goal 2 north 1 east wall south"
Action (one turn):          one of "north" "south" "east" "west"
Observation after a move:   "goal 1 north 1 east hole west"

The observation gives the goal's offset (rows north/south, columns east/west) and which of the
four neighbours are blocked ("wall": a wall or the grid edge) or holes. It does not show the
rest of the map, so the policy acts on local information; the scripted optimal policy in
`grid_policies` sees the whole map and gives the upper anchor.

Action parsing and malformed actions (policy `on_invalid`, see base.INVALID_ACTION_POLICIES):
    The action text is lower-cased and end-of-turn / eos markers ("<eot>", "<eos>", "</s>") are
    removed. The FIRST word is the move and must be a direction; any further words are ignored
    (reported in info["ignored_text"]), so a policy that rambles after its move still moves.
    Empty text or a first word that is not a direction ("up", "goal") is invalid.
    on_invalid="continue" (default): the turn is used, the agent does not move, no randomness is
        drawn, the observation is "invalid " followed by the usual observation.
    on_invalid="end": the episode ends with reward 0 (info["end_reason"] == "invalid_action").
Episode end: reaching the goal (reward 1, "goal"), entering a hole (reward 0, "hole"), or using
the task's `max_turns` turns without reaching the goal (reward 0, "turn_limit").
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
from trace_core.envs.gridworld.tasks import DIRECTIONS, MAX_TURNS, PERPENDICULAR, GridLayout, parse_grid_task

END_MARKERS = ("<eot>", "<eos>", "</s>")
_END_MARKER_RE = re.compile("|".join(re.escape(m) for m in END_MARKERS))


def parse_grid_action(text: str) -> tuple[str | None, str | None]:
    """(direction, None) for a valid action, (None, reason) otherwise. See the module docstring."""
    if not isinstance(text, str):
        return None, f"action must be text, got {type(text).__name__}"
    words = _END_MARKER_RE.sub(" ", text.lower()).split()
    if not words:
        return None, "empty action"
    if words[0] not in DIRECTIONS:
        return None, f"unknown action {words[0]!r}; expected one of {list(DIRECTIONS)}"
    return words[0], None


def render_observation(layout: GridLayout, cell: tuple[int, int]) -> str:
    """Goal offset and blocked/hole neighbours of `cell`, as a few words."""
    dr, dc = layout.goal[0] - cell[0], layout.goal[1] - cell[1]
    words = ["goal"]
    if dr:
        words += [str(abs(dr)), "north" if dr < 0 else "south"]
    if dc:
        words += [str(abs(dc)), "west" if dc < 0 else "east"]
    for direction in DIRECTIONS:
        nxt = layout.move(cell, direction)
        if nxt == cell:
            words += ["wall", direction]
        elif nxt in layout.holes:
            words += ["hole", direction]
    return " ".join(words)


def render_prompt(layout: GridLayout) -> str:
    return f"level {layout.level} turns {layout.max_turns} " + render_observation(layout, layout.start)


class GridWorldEnv(TurnEpisode):
    """Env protocol implementation; one episode at a time, resumable at any turn.

    max_turns  cap on any task's turn limit; after `reset` it holds the current task's limit
               (min of the task's `max_turns` and this cap).
    on_invalid "continue" | "end": what a malformed action does (module docstring).
    """

    def __init__(self, max_turns: int = MAX_TURNS, on_invalid: str = "continue"):
        self._configure(max_turns, on_invalid)
        self._layout: GridLayout | None = None
        self._task: dict[str, Any] | None = None

    # --- protocol ---------------------------------------------------------------------------
    def reset(self, task: Mapping[str, Any], *, seed: int | None = None) -> str:
        self._layout = parse_grid_task(task)
        self._task = dict(task)
        self._begin(self._layout.max_turns, seed)
        self.position = self._layout.start
        return render_prompt(self._layout)

    def step(self, action: str) -> Step:
        layout = self._require_running()
        self.turn += 1
        direction, error = parse_grid_action(action)
        info: dict[str, Any] = {"turn": self.turn, "action": direction}
        ignored = _END_MARKER_RE.sub(" ", action).split()[1:] if direction is not None else []
        if ignored:
            info["ignored_text"] = " ".join(ignored)
        if direction is None:
            return self._invalid(error, info, render_observation(layout, self.position))

        # One uniform draw per valid move, always, so the RNG stream depends only on the turn count.
        u = float(self._rng.random())
        moved = direction
        if u < layout.slip:
            moved = PERPENDICULAR[direction][0 if u < layout.slip / 2 else 1]
        info["moved"], info["slipped"] = moved, moved != direction
        self.position = layout.move(self.position, moved)
        info["position"] = list(self.position)
        if self.position == layout.goal:
            return self._finish(1.0, "goal", info)
        if self.position in layout.holes:
            return self._finish(0.0, "hole", info)
        if self.turn >= self.max_turns:
            return self._finish(0.0, "turn_limit", info)
        return Step(render_observation(layout, self.position), False, None, info)

    def snapshot(self) -> dict[str, Any]:
        self._require_reset()
        return {"task": dict(self._task), "position": self.position, **self._episode_state()}

    def restore(self, snapshot: Any, *, seed: int | None = None) -> None:
        self._restore_episode(snapshot, seed)
        self._task = dict(snapshot["task"])
        self._layout = parse_grid_task(self._task)
        self.position = tuple(snapshot["position"])

    # --- helpers ----------------------------------------------------------------------------
    @property
    def layout(self) -> GridLayout:
        return self._require_reset()

    def _require_reset(self) -> GridLayout:
        if self._layout is None:
            raise EpisodeStateError("GridWorldEnv: call reset(task) (or restore) before using the env")
        return self._layout
