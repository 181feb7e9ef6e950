"""Environments by name, so a trainer config can say `env: {name: gridworld, ...}`.

An entry pairs an env factory (keyword arguments -> a fresh `Env`) with a task-source factory
(keyword arguments -> a `TaskSource`). A factory is a callable or a "package.module:attribute"
path imported on first use. Built-in envs register themselves when `trace_core.envs` is
imported (builtin.py); users add theirs with `register_env`.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from trace_core.envs.base import Env, EnvError, TaskSource

EnvFactory = Callable[..., Env] | str
TaskSourceFactory = Callable[..., TaskSource] | str

_REGISTRY: dict[str, tuple[EnvFactory, TaskSourceFactory | None]] = {}


def register_env(name: str, env_factory: EnvFactory, task_source_factory: TaskSourceFactory | None = None,
                 *, overwrite: bool = False) -> None:
    """Register `env_factory` (and optionally its task source) under `name`."""
    if not isinstance(name, str) or not name:
        raise EnvError(f"name must be a non-empty string, got {name!r}")
    if not (callable(env_factory) or _is_path(env_factory)):
        raise EnvError(f"env_factory for {name!r} must be callable or a 'module:attribute' path, got {env_factory!r}")
    if task_source_factory is not None and not (callable(task_source_factory) or _is_path(task_source_factory)):
        raise EnvError(f"task_source_factory for {name!r} must be callable, a 'module:attribute' path, or None")
    if name in _REGISTRY and not overwrite:
        raise EnvError(f"an env named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = (env_factory, task_source_factory)


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[EnvFactory, TaskSourceFactory | None]:
    if name not in _REGISTRY:
        raise EnvError(f"unknown env name {name!r}; registered: {available_envs()}")
    return _REGISTRY[name]


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value.count(":") == 1 and all(value.split(":"))


def _resolve(factory: Any, what: str) -> Callable[..., Any]:
    if not isinstance(factory, str):
        return factory
    module_name, attr = factory.split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise EnvError(f"{what}: cannot import factory {factory!r} ({exc})") from exc


def _call(factory: Any, kwargs: dict[str, Any], what: str) -> Any:
    """Call `factory(**kwargs)`, turning an unknown keyword into an EnvError that names it."""
    factory = _resolve(factory, what)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise EnvError(f"{what}: unknown option(s) {unknown}; accepted: {sorted(params)}")
    return factory(**kwargs)


def make_env(name: str, **kwargs: Any) -> Env:
    """A fresh env registered as `name`, configured by `kwargs`."""
    env_factory, _ = _lookup(name)
    return _call(env_factory, kwargs, f"env {name!r}")


def make_task_source(name: str, **kwargs: Any) -> TaskSource:
    """The task source registered with env `name`, configured by `kwargs`."""
    _, source_factory = _lookup(name)
    if source_factory is None:
        raise EnvError(f"env {name!r} has no registered task source; pass task records yourself")
    return _call(source_factory, kwargs, f"task source of env {name!r}")


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
    def from_dict(cls, data: Any) -> "EnvConfig":
        if not isinstance(data, dict):
            raise EnvError(f"env config must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"name", "env", "tasks"})
        if unknown:
            raise EnvError(f"env config: unknown field(s) {unknown}; accepted: ['env', 'name', 'tasks']")
        if "name" not in data:
            raise EnvError("env config is missing the field 'name'")
        for key in ("env", "tasks"):
            if not isinstance(data.get(key, {}), dict):
                raise EnvError(f"env config field {key!r} must be a mapping, got {type(data[key]).__name__}")
        return cls(name=data["name"], env=dict(data.get("env", {})), tasks=dict(data.get("tasks", {})))

    def make_env(self) -> Env:
        return make_env(self.name, **self.env)

    def make_task_source(self) -> TaskSource:
        return make_task_source(self.name, **self.tasks)
