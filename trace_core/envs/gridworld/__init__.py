"""The embedded default env: a slippery grid world with short, word-level text (registered as "gridworld").

- env.py       `GridWorldEnv`: prompt, moves, observations, rewards; action parsing and the handling
               of malformed actions
- tasks.py     tasks as JSON-serialisable dicts: difficulty levels (`LevelSpec`), a seeded generator
               with train / eval splits (`generate_grid_tasks`), `GridTaskSource` for the trainer
- policies.py  scripted policies (random, greedy, optimal) and exact success probabilities: the
               anchors that tell how well a trained policy does

The trainer builds it by name through `trace_core.envs.make_env("gridworld", ...)`.
"""

from trace_core.envs.gridworld.env import GridWorldEnv
from trace_core.envs.gridworld.tasks import GridLayout, GridTaskSource, LevelSpec, generate_grid_tasks

__all__ = ["GridLayout", "GridTaskSource", "GridWorldEnv", "LevelSpec", "generate_grid_tasks"]
