"""trace_core.registry (Registry, plugins) and trace_core.errors (TraceError and the errors built on it)."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest

import trace_core.registry as registry_module
from trace_core.allocation import AllocationError, allocate_roots
from trace_core.envs import EnvError, make_env
from trace_core.errors import TraceError
from trace_core.forest import ForestError
from trace_core.registry import Registry, load_plugins
from trace_core.train.config_loader import ConfigError

# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [TraceError, ConfigError, ForestError, EnvError, AllocationError])
def test_every_user_error_names_its_field_and_is_a_value_error(cls):
    err = cls("allocation.mode", "'best' is not registered")
    assert isinstance(err, TraceError) and isinstance(err, ValueError)
    assert err.field == "allocation.mode" and err.detail == "'best' is not registered"
    assert str(err) == "allocation.mode: 'best' is not registered"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and back.field == err.field and str(back) == str(err)
    qualified = cls("mode", "bad").under("allocation")
    assert type(qualified) is cls and qualified.field == "allocation.mode" and str(qualified) == "allocation.mode: bad"


def test_one_argument_form_reads_the_field():
    err = ConfigError("generation.num_pages: 'auto' needs a GPU")
    assert err.field == "generation.num_pages" and err.detail == "'auto' needs a GPU"
    assert str(err) == "generation.num_pages: 'auto' needs a GPU"
    assert ConfigError("--config: no such file").field == "--config"
    plain = ConfigError("candidates and roots must be >= 1")  # no field prefix: kept as given
    assert plain.field == "" and str(plain) == "candidates and roots must be >= 1"
    spaced = ConfigError("unknown env name 'x'; registered: a: b")  # not a field before ": "
    assert spaced.field == "" and str(spaced) == "unknown env name 'x'; registered: a: b"


def test_a_message_that_starts_with_its_field_is_not_prefixed_twice():
    assert str(TraceError("budget", "budget=9 cannot be spent")) == "budget=9 cannot be spent"
    assert str(TraceError("v", "v[1] = nan")) == "v[1] = nan"
    assert str(TraceError("v", "values are bad")) == "v: values are bad"  # "values" is not the field "v"


def test_library_errors_carry_fields():
    with pytest.raises(AllocationError) as info:
        allocate_roots([0.5, float("nan")], 4)
    assert info.value.field == "v"
    with pytest.raises(AllocationError) as info:
        allocate_roots([0.5, 0.5], 9, m_max=4)
    assert info.value.field == "budget"
    with pytest.raises(EnvError) as env_info:
        make_env("gridworld", max_turns=0)
    assert env_info.value.field == "max_turns"
    with pytest.raises(EnvError) as env_info:
        make_env("no_such_env")
    assert env_info.value.field == "env.name" and "gridworld" in str(env_info.value)


# ---------------------------------------------------------------------------- Registry


def test_register_get_names_and_duplicates():
    things = Registry("thing", field="section.thing")
    assert things.register("b", 2) == 2

    @things.register("a")
    def make_a():
        return "a"

    assert things.get("a") is make_a and things["b"] == 2 and things.names() == ["a", "b"] == list(things)
    assert "a" in things and "c" not in things and len(things) == 2
    with pytest.raises(TraceError, match="a thing named 'a' is already registered; pass replace=True"):
        things.register("a", 3)
    assert things.get("a") is make_a  # the refused registration changed nothing
    things.register("a", 3, replace=True)
    assert things.get("a") == 3
    with pytest.raises(TraceError, match="name must be a non-empty str"):
        things.register("", 1)
    things.unregister("a")
    assert things.names() == ["b"]


def test_unknown_names_name_the_field_and_list_the_registered():
    things = Registry("strategy", field="section.thing")
    things.register("x", 1)
    things.register("y", 2)
    with pytest.raises(TraceError) as info:
        things.get("z")
    assert info.value.field == "section.thing"
    assert str(info.value) == "section.thing: 'z' is not one of the registered strategies: x, y"
    with pytest.raises(TraceError) as info:
        things.get("z", field="other.key")
    assert info.value.field == "other.key"
    with pytest.raises(TraceError):
        things.check("z")
    things.check("x")
    errors = Registry("item", field="f", error=ConfigError, unknown="no {kind} {name!r} ({names})")
    with pytest.raises(ConfigError, match=r"f: no item 'q' \(\(none\)\)"):
        errors.get("q")


def test_lazy_entries_are_imported_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_registry_target.py").write_text("IMPORTED = True\ndef factory():\n    return 'built'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_registry_target", raising=False)
    things = Registry("thing", field="f", callable_only=True)
    things.register("lazy", "lazy_registry_target:factory")
    things.check("lazy")  # checking a name does not import it
    assert "lazy_registry_target" not in sys.modules
    factory = things.get("lazy")
    assert "lazy_registry_target" in sys.modules and factory() == "built" and things.get("lazy") is factory
    things.register("broken", "lazy_registry_target:missing")
    with pytest.raises(TraceError, match="thing 'broken': cannot import factory 'lazy_registry_target:missing'"):
        things.get("broken")
    with pytest.raises(TraceError, match="must be callable"):
        things.register("number", 42)


# ---------------------------------------------------------------------------- plugins


def _plugin(path, name, body=""):
    path.write_text(
        textwrap.dedent(f"""
        from trace_core.registry import Registry
        import trace_core.registry as r
        COUNT = getattr(r, "_test_plugin_count", 0) + 1
        r._test_plugin_count = COUNT
        REGISTRY = getattr(r, "_test_registry", None) or Registry("thing", field="f")
        r._test_registry = REGISTRY
        REGISTRY.register({name!r}, COUNT)
    """)
        + body
    )
    return path


@pytest.fixture
def plugin_state(monkeypatch):
    monkeypatch.setattr(registry_module, "_test_plugin_count", 0, raising=False)
    monkeypatch.setattr(registry_module, "_test_registry", None, raising=False)
    monkeypatch.setattr(registry_module, "_loaded_files", {})
    return registry_module


def test_a_plugin_file_registers_once(tmp_path, plugin_state):
    path = _plugin(tmp_path / "my_plugin.py", "from_file")
    (module,) = load_plugins([str(path)])
    assert module.COUNT == 1 and plugin_state._test_registry.get("from_file") == 1
    load_plugins([str(path), str(tmp_path / "." / "my_plugin.py")])  # the same file again: not re-run
    assert plugin_state._test_plugin_count == 1


def test_a_plugin_module_from_sys_path_or_the_current_directory(tmp_path, plugin_state, monkeypatch):
    _plugin(tmp_path / "cwd_plugin_mod.py", "from_cwd")
    monkeypatch.delitem(sys.modules, "cwd_plugin_mod", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    load_plugins(["cwd_plugin_mod"])
    assert plugin_state._test_registry.get("from_cwd") == 1
    assert str(tmp_path) not in sys.path  # the directory was added for the import only
    monkeypatch.delitem(sys.modules, "cwd_plugin_mod")


def test_plugin_errors_name_the_entry(tmp_path, plugin_state):
    with pytest.raises(TraceError, match=r"no module named 'no_such_plugin_mod'") as info:
        load_plugins(["trace_core.errors", "no_such_plugin_mod"])
    assert info.value.field == "plugins[1]"
    with pytest.raises(TraceError, match="no such plugin file") as info:
        load_plugins([str(tmp_path / "missing.py")])
    assert info.value.field == "plugins[0]"
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TraceError, match="failed to import: RuntimeError: boom"):
        load_plugins([str(broken)])
    with pytest.raises(TraceError, match="must be a list"):
        load_plugins("trace_core.errors")


def test_entry_points_are_loaded_once(monkeypatch):
    loaded = []

    class FakeEntryPoint:
        name, value = "fake", "fake_pkg:register"

        def load(self):
            loaded.append(self.name)

    groups = []

    def entry_points(*, group):
        groups.append(group)
        return [FakeEntryPoint()]

    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry_module, "_entry_points_loaded", False)
    load_plugins([])
    load_plugins([])
    assert loaded == ["fake"] and groups == ["trace_rl.plugins"]
    with pytest.raises(TraceError):  # already loaded: not again
        Registry("thing", field="f").get("missing")
    assert loaded == ["fake"]
    # before any load_plugins call, an unknown name tries the entry points first (they may register it)
    monkeypatch.setattr(registry_module, "_entry_points_loaded", False)
    things = Registry("thing", field="f")

    class Registering(FakeEntryPoint):
        def load(self):
            loaded.append("registering")
            things.register("from_entry_point", 7)

    monkeypatch.setattr(registry_module.importlib.metadata, "entry_points", lambda *, group: [Registering()])
    assert things.get("from_entry_point") == 7 and loaded == ["fake", "registering"]
