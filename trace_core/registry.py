"""Things selectable by name (allocation strategies and modes, envs, advantage estimators, models), and plugins.

    STRATEGIES = Registry("root strategy", field="allocation.root_strategy")

    @STRATEGIES.register("mine")                   # a decorator ...
    class Mine: ...
    STRATEGIES.register("other", Other)             # ... or a call
    STRATEGIES.register("lazy", "my_pkg.mod:Cls")   # a "module:attribute" path, imported on first get()
    STRATEGIES.get("mine")                          # unknown names raise a TraceError naming the field
    STRATEGIES.names()                              # sorted

Plugins are user modules whose import registers things: `load_plugins(["my_pkg.my_module",
"path/to/file.py"])` imports each (a module path or a .py file), and the first call also loads every Python
entry point of the group "trace_rl.plugins" (a package declares `[project.entry-points."trace_rl.plugins"]
mine = "my_pkg.register"`). A config's `plugins` list is loaded before any name in it is resolved.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Generic, TypeVar

from trace_core.errors import TraceError

T = TypeVar("T")
_MISSING: Any = object()

ENTRY_POINT_GROUP = "trace_rl.plugins"


def is_lazy_path(value: Any) -> bool:
    """Whether `value` is a "package.module:attribute" path (the form lazy entries take)."""
    return isinstance(value, str) and value.count(":") == 1 and all(value.split(":"))


def import_path(path: str) -> Any:
    """The object a "package.module:attribute" path names (attribute may be dotted)."""
    module_name, attr = path.split(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what an entry is, for messages ("root strategy", "env", ...).
        field: the config key that selects an entry; errors of get() name it (get(name, field=...) overrides).
        error: the TraceError subclass raised (constructed as error(field, message)).
        callable_only: entries must be callable (factories) or lazy paths.
        unknown: message of an unknown name, formatted with name, kind, kinds (plural), names (comma-separated).
    """

    def __init__(
        self,
        kind: str,
        *,
        field: str,
        error: type[TraceError] = TraceError,
        callable_only: bool = False,
        unknown: str = "{name!r} is not one of the registered {kinds}: {names}",
    ):
        self.kind, self.field, self.error, self.callable_only, self.unknown = kind, field, error, callable_only, unknown
        self.plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
        self._entries: dict[str, Any] = {}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, obj: Any = _MISSING, *, replace: bool = False) -> Any:
        """Register `obj` under `name`; without `obj`, a decorator that does so and returns the object.

        `obj` may be a "module:attribute" path, imported on first get(). A name already taken raises
        unless replace=True.
        """
        if not isinstance(name, str) or not name:
            raise self.error("name", f"name must be a non-empty str, got {name!r}")

        def add(value: Any) -> Any:
            if self.callable_only and not (callable(value) or is_lazy_path(value)):
                raise self.error(
                    "name",
                    f"{self.kind} {name!r}: the registered object must be callable (a class or "
                    f"factory) or a 'module:attribute' path, got {value!r}",
                )
            if name in self._entries and not replace:
                raise self.error(
                    "name", f"a {self.kind} named {name!r} is already registered; pass replace=True to override it"
                )
            self._entries[name] = value
            return value

        return add if obj is _MISSING else add(obj)

    def unregister(self, name: str) -> None:
        """Remove `name` (no error if it is not registered)."""
        self._entries.pop(name, None)

    def pop(self, name: str, default: Any = None) -> Any:
        return self._entries.pop(name, default)

    # ------------------------------------------------------------------ lookup
    def get(self, name: str, *, field: str | None = None) -> T:
        """The entry registered as `name` (a lazy path is imported now, once)."""
        if isinstance(name, str) and name not in self._entries:
            load_entry_point_plugins()  # a plugin package may register it
        if not isinstance(name, str) or name not in self._entries:
            raise self.error(
                field or self.field,
                self.unknown.format(
                    name=name, kind=self.kind, kinds=self.plural, names=", ".join(self.names()) or "(none)"
                ),
            )
        value = self._entries[name]
        if is_lazy_path(value):
            try:
                value = import_path(value)
            except (ImportError, AttributeError) as exc:
                raise self.error(
                    field or self.field, f"{self.kind} {name!r}: cannot import factory {value!r} ({exc})"
                ) from exc
            self._entries[name] = value
        return value

    def check(self, name: str, *, field: str | None = None) -> None:
        """Raise get()'s error for an unknown name, without importing a lazy entry."""
        if isinstance(name, str) and name not in self._entries:
            load_entry_point_plugins()
        if not isinstance(name, str) or name not in self._entries:
            self.get(name, field=field)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


# ---------------------------------------------------------------------- plugins

_loaded_files: dict[Path, ModuleType] = {}
_entry_points_loaded = False


def load_plugins(plugins: Iterable[str] = (), *, field: str = "plugins") -> list[ModuleType]:
    """Import user modules so their register calls run; load the "trace_rl.plugins" entry points once.

    Each plugin is a module path ("my_pkg.my_module", importable from sys.path or the current directory) or
    a .py file path. Loading the same one twice runs it once. Errors are TraceErrors naming `field[i]`.
    """
    if isinstance(plugins, str):
        raise TraceError(field, f"must be a list of module paths or .py files, got the string {plugins!r}")
    load_entry_point_plugins()
    return [_load_plugin(spec, f"{field}[{i}]") for i, spec in enumerate(plugins)]


def _load_plugin(spec: str, field: str) -> ModuleType:
    if not isinstance(spec, str) or not spec.strip():
        raise TraceError(field, f"must be a module path or a .py file, got {spec!r}")
    spec = spec.strip()
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        return _load_file(Path(spec), field)
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not (spec == missing or spec.startswith(missing + ".")):
            raise TraceError(field, f"plugin {spec!r} failed to import: {exc}") from exc
        # `trace train plugins=[my_strategies]` from the folder holding my_strategies.py
        cwd = os.getcwd()
        if cwd in sys.path:
            raise TraceError(field, f"no module named {spec!r} (a module path on sys.path or a .py file)") from exc
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(spec)
        except ModuleNotFoundError:
            raise TraceError(
                field, f"no module named {spec!r} (a module path on sys.path, the current directory, or a .py file)"
            ) from exc
        finally:
            sys.path.remove(cwd)
    except TraceError:
        raise
    except Exception as exc:  # the plugin's own code failed: say which plugin
        raise TraceError(field, f"plugin {spec!r} failed to import: {type(exc).__name__}: {exc}") from exc


def _load_file(path: Path, field: str) -> ModuleType:
    if not path.is_file():
        raise TraceError(field, f"no such plugin file {str(path)!r}")
    resolved = path.resolve()
    if resolved in _loaded_files:
        return _loaded_files[resolved]
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"trace_rl_plugin_{''.join(c if c.isalnum() else '_' for c in resolved.stem)}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise TraceError(field, f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        if isinstance(exc, TraceError):
            raise
        raise TraceError(field, f"plugin {str(path)!r} failed to import: {type(exc).__name__}: {exc}") from exc
    _loaded_files[resolved] = module
    return module


def load_entry_point_plugins() -> None:
    """Load every entry point of the group "trace_rl.plugins", once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:
            raise TraceError(
                "plugins",
                f"entry point {entry.name!r} ({entry.value}) of group "
                f"{ENTRY_POINT_GROUP!r} failed to load: {type(exc).__name__}: {exc}",
            ) from exc


def call_with_options(factory: Callable[..., T], options: dict[str, Any]) -> T:
    """factory(**the options its signature accepts); all of them if it takes **kwargs."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**options)
    accepted = {
        k: v
        for k, v in options.items()
        if k in params and params[k].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    return factory(**accepted)


__all__ = [
    "ENTRY_POINT_GROUP",
    "Registry",
    "call_with_options",
    "import_path",
    "is_lazy_path",
    "load_entry_point_plugins",
    "load_plugins",
]
