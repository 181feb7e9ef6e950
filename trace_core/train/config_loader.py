"""Dataclass configs from YAML files and `key=value` overrides, with errors that name the key.

    cfg = load_config(TrainConfig, "configs/smollm2_qa.yaml", ["optim.lr=3e-6", "allocation.mode=uniform"])
    save_config(cfg, run_dir / "config.yaml")

Nested dataclasses map to nested YAML mappings and dotted override keys. Values are converted to
the field's annotated type (int, float, bool, str, Literal[...], Optional[...], list/tuple/dict of
those); anything that does not fit raises ConfigError naming the dotted key. A dataclass's __post_init__
may raise ConfigError(field, message) with `field` relative to its section (the loader qualifies it,
e.g. "mode" in the allocation section becomes "allocation.mode") or a plain ValueError (then named by
the section). A field whose metadata has "load_first" (a callable) is converted before the others and
the callable is called with its value: the trainer's `plugins` are imported that way, so every section
can name what they register.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from trace_core.errors import TraceError

T = TypeVar("T")


class ConfigError(TraceError):
    """A configuration problem a user can fix: ConfigError(key, message), `field` is the (dotted) key.

    The one-argument form ConfigError("key: message") still works (the key is read before the first ": ").
    """


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from defaults, then the YAML file at `path`, then `key=value` overrides."""
    return from_dict(cls, read_settings(path, overrides))


def read_settings(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The nested mapping the YAML file at `path` and the `key=value` overrides set (nothing converted yet)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", f"no such file {str(path)!r}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError("--config", f"{path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of keys, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}", "expected key=value, e.g. optim.lr=1e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            problem = str(getattr(err, "problem", "") or err).strip()
            raise ConfigError(
                key.strip(), f"{raw!r} is not valid YAML ({problem}); quote strings, e.g. {key.strip()}='\"...\"'"
            ) from None
        _set_dotted(data, key.strip(), value)
    return data


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied key by key into nested sections (neither is modified)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1} (dataclass sections and mappings alike)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a (possibly partial) nested mapping."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix}{key}", f"unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    first = [f for f in dataclasses.fields(cls) if f.init and "load_first" in f.metadata]
    for f in first:  # e.g. plugins: imported before the other keys are converted and checked
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{prefix}{f.name}")
            try:
                f.metadata["load_first"](kwargs[f.name])
            except TraceError as err:
                raise ConfigError(f"{prefix}{err.field or f.name}", err.detail) from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs.update(
        {
            name: _convert(_section_defaults(fields[name], data[name]), hints[name], f"{prefix}{name}")
            for name in names
            if name in data and name not in kwargs
        }
    )
    section = prefix.rstrip(".") or cls.__name__
    try:
        return cls(**kwargs)
    except ConfigError as err:  # its field is relative to this section
        raise ConfigError(f"{prefix}{err.field}" if err.field else section, err.detail) from None
    except (TypeError, ValueError) as err:  # __post_init__ checks of the dataclass itself
        raise ConfigError(section, str(err)) from None


def _section_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A partial mapping for a dataclass section whose default is built with its own arguments (e.g.
    `predictor = PredictorConfig(hidden_dim=64)`): those defaults under the given keys, so that setting one
    key (`predictor.lr=...`) keeps the section's other defaults instead of the dataclass's."""
    if not (isinstance(value, dict) and f.default_factory is not dataclasses.MISSING):
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    # only the keys the factory sets apart from the class's own defaults: a key the section resolves from
    # others (env.tasks from env.name) must be resolved again from the given ones, not copied
    plain = to_dict(type(default)())
    own = {k: v for k, v in to_dict(default).items() if plain.get(k) != v}
    return merge(own, value)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML-safe) of a config dataclass."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}", f"{part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{key}.")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"{value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, f"expected null, got {value!r}")
    raise ConfigError(key, f"unsupported config type {_type_name(tp)}")


__all__ = ["ConfigError", "flatten", "from_dict", "load_config", "merge", "read_settings", "save_config", "to_dict"]
