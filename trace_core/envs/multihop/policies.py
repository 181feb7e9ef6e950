"""Scripted multi-hop policies and success probabilities (anchors for training).

- `optimal_policy`: knows the knowledge base and follows the chain: looks up the entity it holds
  until the question's hops are followed (retrying after a tool failure), then answers. The
  observation-only `reactive_action` ("left 0 X" -> answer, else look up X) plays the same moves.
- `random_policy`: a uniformly random valid action ("answer", or a lookup of any entity e0..e7:
  nine actions).
- `exact_success_rate(task, "optimal")`: P(at least `hops` of the `max_turns - 1` lookups succeed),
  binomial in the tool's failure rate (`success_from`: the same from any turn prefix);
  `rollout_success_rate`: Monte Carlo through the env itself, so tests check the env's transitions
  against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from math import comb

import numpy as np

from trace_core.envs.base import scripted_success_rate
from trace_core.envs.multihop.env import MultiHopEnv
from trace_core.envs.multihop.tasks import ENTITIES, LEVELS, generate_hop_tasks, parse_hop_task

Policy = Callable[[MultiHopEnv, str, np.random.Generator], str]


def success_from(hops_left: int, turns_left: int, noise: float) -> float:
    """P(the optimal policy wins) holding the right entity with `hops_left` hops and `turns_left`
    turns to go: at least `hops_left` of the `turns_left - 1` lookups before the answer succeed."""
    n, q = turns_left - 1, 1.0 - noise
    return float(sum(comb(n, k) * q**k * noise ** (n - k) for k in range(hops_left, n + 1)))


def exact_success_rate(task: Mapping, policy: str = "optimal") -> float:
    """P(success) of the optimal policy on `task` from its start."""
    if policy != "optimal":
        raise ValueError(f"only the optimal policy has an exact rate, got {policy!r}")
    t = parse_hop_task(task)
    return success_from(t.hops, t.max_turns, t.noise)


def reactive_action(observation: str) -> str:
    """Observation-only: "... left 0 X" -> "answer", "... left H X" -> "lookup X"."""
    words = observation.split()
    left, entity = words[-2], words[-1]
    return "answer" if left == "0" else entity


def optimal_policy(env: MultiHopEnv, observation: str, rng: np.random.Generator) -> str:
    return "answer" if env.left == 0 else env.entity


def reactive_policy(env: MultiHopEnv, observation: str, rng: np.random.Generator) -> str:
    return reactive_action(observation)


def random_policy(env: MultiHopEnv, observation: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(len(ENTITIES) + 1))
    return "answer" if i == len(ENTITIES) else ENTITIES[i]


POLICIES: dict[str, Policy] = {"random": random_policy, "optimal": optimal_policy, "reactive": reactive_policy}


def rollout_success_rate(
    tasks: Sequence[Mapping], policy: Policy, *, episodes_per_task: int = 1, seed: int = 0
) -> float:
    """Fraction of episodes that end with reward 1 when `policy` plays `tasks` in the env."""
    return scripted_success_rate(MultiHopEnv(), tasks, policy, episodes_per_task=episodes_per_task, seed=seed)


def anchor_rates(
    num_tasks: int = 200, split: str = "eval", seed: int = 0, episodes_per_task: int = 5, levels=tuple(LEVELS)
) -> dict[str, dict[str, float]]:
    """Per level (and "mixed": the levels in round-robin, as a task source gives them): the exact
    optimal rate and Monte Carlo rates of the random / reactive / optimal policies through the env."""
    rates: dict[str, dict[str, float]] = {}
    groups = {str(level): [level] for level in levels} | {"mixed": list(levels)}
    for name, group in groups.items():
        tasks = generate_hop_tasks(num_tasks, split=split, seed=seed, levels=group)
        row = {"exact_optimal": float(np.mean([exact_success_rate(t) for t in tasks]))}
        for pname, policy in POLICIES.items():
            row[f"mc_{pname}"] = rollout_success_rate(tasks, policy, episodes_per_task=episodes_per_task, seed=seed + 1)
        rates[name] = row
    return rates


if __name__ == "__main__":  # python -m trace_core.envs.multihop.policies [num_tasks]
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    table = anchor_rates(n)
    columns = ["mc_random", "mc_reactive", "exact_optimal", "mc_optimal"]
    print(f"multi-hop success rates, eval split, {n} tasks per row (Monte Carlo: 5 episodes per task)")
    print("level  " + "  ".join(f"{c:>13}" for c in columns))
    for level, row in table.items():
        print(f"{level:>5}  " + "  ".join(f"{row[c]:>13.3f}" for c in columns))
