"""Multi-turn environments (Env protocol, registry) and the built-in envs.

Importing this package is cheap: concrete envs live in submodules (gridworld, search_qa, ...)
and registered envs are imported when first built with `make_env`.
"""

from trace_core.envs import builtin  # noqa: F401  (registers "gridworld" and "search_qa")
from trace_core.envs.base import INVALID_ACTION_POLICIES, Env, EnvError, EpisodeStateError, Step, TaskSource
from trace_core.envs.registry import ENVS, EnvConfig, available_envs, make_env, make_task_source, register_env

__all__ = [
    "ENVS",
    "INVALID_ACTION_POLICIES",
    "Env",
    "EnvConfig",
    "EnvError",
    "EpisodeStateError",
    "Step",
    "TaskSource",
    "available_envs",
    "make_env",
    "make_task_source",
    "register_env",
]
