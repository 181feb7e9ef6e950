"""Slippery grid-world tasks: levels of difficulty, a seeded generator, train/eval splits.

A task is a JSON-serialisable dict:
    {"id": str, "level": int, "size": int, "slip": float, "max_turns": int,
     "start": [row, col], "goal": [row, col], "walls": [[row, col], ...], "holes": [[row, col], ...]}
Row 0 is the north edge, column 0 the west edge. Moving into a wall or off the grid leaves the
agent in place; entering a hole ends the episode with reward 0; reaching the goal gives reward 1.
A move slips with probability `slip`: it then goes to one of the two perpendicular directions.

Difficulty grows with level: longer shortest paths, fewer spare turns, more slip, walls and holes.
Success probability therefore differs between tasks (by level and layout) and between turn
prefixes of one task (a slip costs a turn or pushes the agent next to a hole).

Splits are disjoint by construction: a layout (size, walls, holes, start, goal, slip, turn limit)
belongs to "eval" iff a stable hash of it falls in the eval bucket, so no eval task ever appears
in training, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trace_core.envs.base import EnvError, check_positive_int, check_split, require_field, round_robin_tasks

DIRECTIONS = ("north", "south", "east", "west")
MOVES = {"north": (-1, 0), "south": (1, 0), "east": (0, 1), "west": (0, -1)}
PERPENDICULAR = {
    "north": ("east", "west"),
    "south": ("west", "east"),
    "east": ("south", "north"),
    "west": ("north", "south"),
}


@dataclass(frozen=True)
class LevelSpec:
    size: int  # grid is size x size
    slip: float  # probability that a move goes sideways
    walls: int  # interior wall cells
    holes: int  # hole cells (episode ends, reward 0)
    distance: tuple[int, int]  # inclusive range of the shortest start -> goal path length
    spare_turns: int  # max_turns = shortest path + spare_turns


LEVELS: dict[int, LevelSpec] = {
    0: LevelSpec(size=4, slip=0.0, walls=0, holes=0, distance=(1, 3), spare_turns=4),
    1: LevelSpec(size=5, slip=0.1, walls=2, holes=0, distance=(2, 5), spare_turns=2),
    2: LevelSpec(size=5, slip=0.2, walls=3, holes=1, distance=(3, 6), spare_turns=2),
    3: LevelSpec(size=6, slip=0.3, walls=4, holes=3, distance=(4, 8), spare_turns=1),
}
MAX_SIZE = max(spec.size for spec in LEVELS.values())
MAX_TURNS = max(spec.distance[1] + spec.spare_turns for spec in LEVELS.values())
EVAL_BUCKETS = 5  # one layout hash bucket in five is held out for evaluation


@dataclass(frozen=True)
class GridLayout:
    """A validated task record, with cells as tuples and walls/holes as frozensets."""

    task_id: str
    level: int
    size: int
    slip: float
    max_turns: int
    start: tuple[int, int]
    goal: tuple[int, int]
    walls: frozenset[tuple[int, int]]
    holes: frozenset[tuple[int, int]]

    def blocked(self, cell: tuple[int, int]) -> bool:
        r, c = cell
        return not (0 <= r < self.size and 0 <= c < self.size) or cell in self.walls

    def move(self, cell: tuple[int, int], direction: str) -> tuple[int, int]:
        dr, dc = MOVES[direction]
        target = (cell[0] + dr, cell[1] + dc)
        return cell if self.blocked(target) else target


def _cell(task: Mapping[str, Any], name: str, size: int) -> tuple[int, int]:
    value = require_field(task, name, (list, tuple))
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EnvError(name, f"task field {name!r} must be [row, col] integers, got {value!r}")
    if not all(0 <= v < size for v in value):
        raise EnvError(name, f"task field {name!r} = {list(value)} lies outside the {size}x{size} grid")
    return int(value[0]), int(value[1])


def parse_grid_task(task: Mapping[str, Any]) -> GridLayout:
    """Validate a task record; EnvError naming the bad field otherwise."""
    size = check_positive_int("task field 'size'", require_field(task, "size", int))
    slip = float(require_field(task, "slip", (int, float)))
    if not 0.0 <= slip <= 1.0:
        raise EnvError("slip", f"task field 'slip' must be in [0, 1], got {slip!r}")
    max_turns = check_positive_int("task field 'max_turns'", require_field(task, "max_turns", int))
    start, goal = _cell(task, "start", size), _cell(task, "goal", size)
    cells = {}
    for name in ("walls", "holes"):
        raw = task.get(name, [])
        if not isinstance(raw, (list, tuple)):
            raise EnvError(name, f"task field {name!r} must be a list of [row, col], got {type(raw).__name__}")
        cells[name] = frozenset(_cell({name: c}, name, size) for c in raw)
    if start == goal:
        raise EnvError("goal", f"task fields 'start' and 'goal' must differ, both are {list(start)}")
    for name in ("start", "goal"):
        cell = start if name == "start" else goal
        if cell in cells["walls"] or cell in cells["holes"]:
            raise EnvError(name, f"task field {name!r} = {list(cell)} is on a wall or hole")
    return GridLayout(
        str(task.get("id", "")),
        int(task.get("level", -1)),
        size,
        slip,
        max_turns,
        start,
        goal,
        cells["walls"],
        cells["holes"],
    )


def shortest_path_length(layout: GridLayout) -> int | None:
    """BFS distance from start to goal avoiding walls and holes; None if unreachable."""
    seen = {layout.start: 0}
    queue = deque([layout.start])
    while queue:
        cell = queue.popleft()
        if cell == layout.goal:
            return seen[cell]
        for direction in DIRECTIONS:
            nxt = layout.move(cell, direction)
            if nxt not in seen and nxt not in layout.holes:
                seen[nxt] = seen[cell] + 1
                queue.append(nxt)
    return None


def split_of(task: Mapping[str, Any]) -> str:
    """'eval' or 'train': a stable hash of the layout (not of the id) decides."""
    key = repr(
        (
            task["size"],
            task["slip"],
            task["max_turns"],
            tuple(task["start"]),
            tuple(task["goal"]),
            sorted(map(tuple, task["walls"])),
            sorted(map(tuple, task["holes"])),
        )
    )
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def _random_task(rng: np.random.Generator, level: int) -> dict[str, Any]:
    spec = LEVELS[level]
    while True:  # rejection sampling; every level accepts a large fraction of draws
        cells = rng.choice(spec.size * spec.size, size=2 + spec.walls + spec.holes, replace=False)
        rc = [[int(i) // spec.size, int(i) % spec.size] for i in cells]
        start, goal, walls, holes = rc[0], rc[1], rc[2 : 2 + spec.walls], rc[2 + spec.walls :]
        task = {
            "level": level,
            "size": spec.size,
            "slip": spec.slip,
            "max_turns": 1,
            "start": start,
            "goal": goal,
            "walls": sorted(walls),
            "holes": sorted(holes),
        }
        dist = shortest_path_length(parse_grid_task(task))
        if dist is not None and spec.distance[0] <= dist <= spec.distance[1]:
            task["max_turns"] = dist + spec.spare_turns
            task["shortest_path"] = dist
            return task


def generate_grid_tasks(
    num_tasks: int, *, split: str = "train", seed: int = 0, levels: Sequence[int] = tuple(LEVELS)
) -> list[dict[str, Any]]:
    """`num_tasks` tasks of `split`, levels in round-robin order, reproducible from `seed`."""
    check_positive_int("num_tasks", num_tasks)
    check_split(split)
    levels = tuple(levels)
    if not levels or any(level not in LEVELS for level in levels):
        raise EnvError("levels", f"levels must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    rng = np.random.default_rng([seed, 0x6A1D])
    return round_robin_tasks(num_tasks, split, levels, rng, _random_task, split_of, f"grid-{split}-s{seed}")


class GridTaskSource:
    """TaskSource for the grid world: `tasks("train")` / `tasks("eval")`, disjoint and seeded."""

    def __init__(
        self, num_train: int = 2000, num_eval: int = 200, seed: int = 0, levels: Sequence[int] = tuple(LEVELS)
    ):
        self.num = {
            "train": check_positive_int("num_train", num_train),
            "eval": check_positive_int("num_eval", num_eval),
        }
        self.seed, self.levels = seed, tuple(levels)

    def tasks(self, split: str) -> list[dict[str, Any]]:
        check_split(split)
        return generate_grid_tasks(self.num[split], split=split, seed=self.seed, levels=self.levels)

    def reference_success(self, tasks: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Exact mean success on `tasks` of the random-direction policy (each move uniform over the four) and
        of the map-aware optimal policy (an upper bound for a policy that sees only the observation)."""
        from trace_core.envs.gridworld.policies import exact_success_rate

        return {
            name: float(np.mean([exact_success_rate(task, policy) for task in tasks]))
            for name, policy in (("random policy", "random"), ("optimal policy", "optimal"))
        }
