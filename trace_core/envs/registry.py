"""Environments by name, so a trainer config can say `env: {name: gridworld, ...}`.

An entry pairs an env factory (keyword arguments -> a fresh `Env`) with a task-source factory
(keyword arguments -> a `TaskSource`). A factory is a callable or a "package.module:attribute"
path imported on first use (trace_core.registry.Registry's lazy entries). Built-in envs register
themselves when `trace_core.envs` is imported (builtin.py); users add theirs with `register_env`,
in their code or in a plugin (`plugins: [my_envs]` in a trainer config).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trace_core.envs.base import Env, EnvError, TaskSource
from trace_core.registry import Registry, is_lazy_path

EnvFactory = Callable[..., Env] | str
TaskSourceFactory = Callable[..., TaskSource] | str

ENVS: Registry[Callable[..., Env]] = Registry(
    "env",
    field="env.name",
    error=EnvError,
    callable_only=True,
    unknown="unknown env name {name!r}; registered: {names}",
)
# keyed by env name: the task source registered with that env (absent: none)
TASK_SOURCES: Registry[Callable[..., TaskSource]] = Registry(
    "task source",
    field="env.name",
    error=EnvError,
    callable_only=True,
    unknown="env {name!r} has no registered task source; pass task records yourself",
)


def register_env(
    name: str,
    env_factory: EnvFactory,
    task_source_factory: TaskSourceFactory | None = None,
    *,
    overwrite: bool = False,
    replace: bool = False,
) -> None:
    """Register `env_factory` (and optionally its task source) under `name`; a taken name raises unless
    overwrite=True (or replace=True, the spelling of the other registries)."""
    if not isinstance(name, str) or not name:
        raise EnvError("name", f"name must be a non-empty string, got {name!r}")
    if not (callable(env_factory) or is_lazy_path(env_factory)):
        raise EnvError(
            "env_factory",
            f"env_factory for {name!r} must be callable or a 'module:attribute' path, got {env_factory!r}",
        )
    if task_source_factory is not None and not (callable(task_source_factory) or is_lazy_path(task_source_factory)):
        raise EnvError(
            "task_source_factory",
            f"task_source_factory for {name!r} must be callable, a 'module:attribute' path, or None",
        )
    ENVS.register(name, env_factory, replace=overwrite or replace)
    if task_source_factory is None:
        TASK_SOURCES.unregister(name)
    else:
        TASK_SOURCES.register(name, task_source_factory, replace=True)


def available_envs() -> list[str]:
    return ENVS.names()


def _call(factory: Any, kwargs: dict[str, Any], what: str) -> Any:
    """Call `factory(**kwargs)`, turning an unknown keyword into an EnvError that names it."""
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise EnvError(what, f"unknown option(s) {unknown}; accepted: {sorted(params)}")
    return factory(**kwargs)


def make_env(name: str, **kwargs: Any) -> Env:
    """A fresh env registered as `name`, configured by `kwargs`."""
    return _call(ENVS.get(name), kwargs, f"env {name!r}")


def make_task_source(name: str, **kwargs: Any) -> TaskSource:
    """The task source registered with env `name`, configured by `kwargs`."""
    ENVS.get(name)  # an unknown env is named as such
    return _call(TASK_SOURCES.get(name), kwargs, f"task source of env {name!r}")


@dataclass
class EnvConfig:
    """The `env` section of a trainer config.

    name   registered env name
    env    keyword arguments of the env factory (one env per rollout; envs are cheap)
    tasks  keyword arguments of the task-source factory
    """

    name: str
    env: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> EnvConfig:
        if not isinstance(data, dict):
            raise EnvError("env", f"env config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "env", "tasks"})
        if unknown:
            raise EnvError("env", f"env config: unknown field(s) {unknown}; accepted: ['env', 'name', 'tasks']")
        if "name" not in data:
            raise EnvError("env.name", "env config is missing the field 'name'")
        for key in ("env", "tasks"):
            if not isinstance(data.get(key, {}), dict):
                raise EnvError(
                    f"env.{key}", f"env config field {key!r} must be a mapping, got {type(data[key]).__name__}"
                )
        return cls(name=data["name"], env=dict(data.get("env", {})), tasks=dict(data.get("tasks", {})))

    def make_env(self) -> Env:
        return make_env(self.name, **self.env)

    def make_task_source(self) -> TaskSource:
        return make_task_source(self.name, **self.tasks)
