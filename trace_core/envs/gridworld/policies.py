"""Scripted grid-world policies and exact success probabilities (anchors for training).

- `success_table(layout, policy)`: exact P(reach goal) from every cell with t turns left, by
  finite-horizon dynamic programming over the task's transition model; "optimal" maximises it
  (the map-aware upper bound), "random" averages over the four directions.
- `optimal_action`: argmax of that table (ties broken in DIRECTIONS order).
- `greedy_action`: acts on the observation text only (what a learned policy sees): step along
  the larger goal offset unless that neighbour is a wall or hole.
- `rollout_success_rate`: Monte Carlo through the env itself, so tests can check the env's
  transitions against the exact tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import numpy as np

from trace_core.envs.base import scripted_success_rate
from trace_core.envs.gridworld.env import GridWorldEnv
from trace_core.envs.gridworld.tasks import DIRECTIONS, PERPENDICULAR, GridLayout, parse_grid_task

Policy = Callable[[GridWorldEnv, str, np.random.Generator], str]


def _transition(layout: GridLayout, cell: tuple[int, int], direction: str) -> list[tuple[float, tuple[int, int]]]:
    side_a, side_b = PERPENDICULAR[direction]
    outcomes = [(1.0 - layout.slip, layout.move(cell, direction))]
    if layout.slip > 0:
        outcomes += [(layout.slip / 2, layout.move(cell, side_a)), (layout.slip / 2, layout.move(cell, side_b))]
    return outcomes


@lru_cache(maxsize=4096)
def success_table(layout: GridLayout, policy: str = "optimal") -> np.ndarray:
    """V[t, r, c] = P(success) from non-terminal cell (r, c) with t turns left; shape (max_turns+1, size, size).

    Cached per layout (layouts are frozen); the returned array is read-only.
    """
    if policy not in ("optimal", "random"):
        raise ValueError(f"policy must be 'optimal' or 'random', got {policy!r}")
    n = layout.size
    table = np.zeros((layout.max_turns + 1, n, n))
    for t in range(1, layout.max_turns + 1):
        prev = table[t - 1]

        def value(cell: tuple[int, int], prev=prev) -> float:
            if cell == layout.goal:
                return 1.0
            return 0.0 if cell in layout.holes else prev[cell]

        for r in range(n):
            for c in range(n):
                if (r, c) in layout.walls or (r, c) in layout.holes or (r, c) == layout.goal:
                    continue
                q = [sum(p * value(nxt) for p, nxt in _transition(layout, (r, c), d)) for d in DIRECTIONS]
                table[t, r, c] = max(q) if policy == "optimal" else float(np.mean(q))
    table.setflags(write=False)
    return table


def exact_success_rate(task: Mapping, policy: str = "optimal") -> float:
    """P(success) of `policy` on `task` from its start, computed exactly."""
    layout = parse_grid_task(task)
    return float(success_table(layout, policy)[layout.max_turns][layout.start])


def optimal_action(layout: GridLayout, cell: tuple[int, int], turns_left: int, table: np.ndarray | None = None) -> str:
    table = success_table(layout) if table is None else table
    prev = table[turns_left - 1]

    def q(direction: str) -> float:
        total = 0.0
        for p, nxt in _transition(layout, cell, direction):
            total += p * (1.0 if nxt == layout.goal else 0.0 if nxt in layout.holes else prev[nxt])
        return total

    return max(DIRECTIONS, key=q)  # max keeps the first of equal values: deterministic ties


def greedy_action(observation: str) -> str:
    """Observation-only heuristic: move along the larger goal offset, avoiding walls and holes."""
    words = observation.split()
    offsets: dict[str, int] = {}
    blocked: set[str] = set()
    for i, word in enumerate(words):
        if word.isdigit() and i + 1 < len(words) and words[i + 1] in DIRECTIONS:
            offsets[words[i + 1]] = int(word)
        elif word in ("wall", "hole") and i + 1 < len(words):
            blocked.add(words[i + 1])
    towards = sorted(offsets, key=lambda d: -offsets[d])
    for direction in towards + list(DIRECTIONS):
        if direction not in blocked:
            return direction
    return DIRECTIONS[0]


def random_policy(env: GridWorldEnv, observation: str, rng: np.random.Generator) -> str:
    return DIRECTIONS[int(rng.integers(4))]


def optimal_policy(env: GridWorldEnv, observation: str, rng: np.random.Generator) -> str:
    return optimal_action(env.layout, env.position, env.turns_left)


def greedy_policy(env: GridWorldEnv, observation: str, rng: np.random.Generator) -> str:
    return greedy_action(observation)


POLICIES: dict[str, Policy] = {"random": random_policy, "optimal": optimal_policy, "greedy": greedy_policy}


def rollout_success_rate(
    tasks: Sequence[Mapping], policy: Policy, *, episodes_per_task: int = 1, seed: int = 0
) -> float:
    """Fraction of episodes that end with reward 1 when `policy` plays `tasks` in the env."""
    return scripted_success_rate(GridWorldEnv(), tasks, policy, episodes_per_task=episodes_per_task, seed=seed)


def anchor_rates(
    num_tasks: int = 200, split: str = "eval", seed: int = 0, episodes_per_task: int = 2
) -> dict[int, dict[str, float]]:
    """Per level: exact success of the optimal and random policies, and Monte Carlo success of
    random / greedy (observation-only) / optimal policies played through the env."""
    from trace_core.envs.gridworld.tasks import LEVELS, generate_grid_tasks

    rates: dict[int, dict[str, float]] = {}
    for level in LEVELS:
        tasks = generate_grid_tasks(num_tasks, split=split, seed=seed, levels=[level])
        row = {
            f"exact_{name}": float(np.mean([exact_success_rate(t, name) for t in tasks]))
            for name in ("random", "optimal")
        }
        for name, policy in POLICIES.items():
            row[f"mc_{name}"] = rollout_success_rate(tasks, policy, episodes_per_task=episodes_per_task, seed=seed + 1)
        rates[level] = row
    return rates


if __name__ == "__main__":  # python -m trace_core.envs.gridworld.policies [num_tasks]
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    table = anchor_rates(n)
    columns = ["exact_random", "mc_random", "mc_greedy", "exact_optimal", "mc_optimal"]
    print(f"grid world success rates, eval split, {n} tasks per level (Monte Carlo: 2 episodes per task)")
    print("level  " + "  ".join(f"{c:>13}" for c in columns))
    for level, row in table.items():
        print(f"{level:>5}  " + "  ".join(f"{row[c]:>13.3f}" for c in columns))
