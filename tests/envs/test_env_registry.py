"""Registry by name, EnvConfig, and tool timeouts."""

import time

import pytest

from trace_core.envs import EnvConfig, EnvError, available_envs, make_env, make_task_source, register_env
from trace_core.envs.gridworld.env import GridWorldEnv
from trace_core.envs.search_qa.env import SearchQAEnv
from trace_core.envs.tools import ToolTimeout, call_with_timeout


def test_builtins_are_registered_and_configurable():
    assert {"gridworld", "search_qa"} <= set(available_envs())
    env = make_env("gridworld", max_turns=6, on_invalid="end")
    assert isinstance(env, GridWorldEnv) and env.turn_cap == 6 and env.on_invalid == "end"
    tasks = make_task_source("gridworld", num_train=5, num_eval=3, seed=2).tasks("eval")
    assert len(tasks) == 3 and env.reset(tasks[0], seed=0).startswith("level ")
    qa = make_env("search_qa", top_k=2, max_turns=3)
    assert isinstance(qa, SearchQAEnv) and qa.top_k == 2 and qa.max_turns == 3


def test_env_config_from_dict():
    cfg = EnvConfig.from_dict({"name": "gridworld", "env": {"max_turns": 5}, "tasks": {"num_train": 4, "num_eval": 2}})
    assert cfg.make_env().turn_cap == 5
    assert len(cfg.make_task_source().tasks("train")) == 4


@pytest.mark.parametrize(
    "data,message",
    [
        ({"env": {}}, "missing the field 'name'"),
        ({"name": "gridworld", "envs": {}}, r"unknown field\(s\) \['envs'\]"),
        ({"name": "gridworld", "env": [1]}, "field 'env' must be a mapping"),
        ([1], "must be a mapping"),
    ],
)
def test_env_config_errors(data, message):
    with pytest.raises(EnvError, match=message):
        EnvConfig.from_dict(data)


def test_registry_errors_name_what_is_wrong():
    with pytest.raises(EnvError, match="unknown env name 'nope'.*gridworld"):
        make_env("nope")
    with pytest.raises(EnvError, match=r"unknown option\(s\) \['max_turn'\]"):
        make_env("gridworld", max_turn=3)
    with pytest.raises(EnvError, match=r"unknown option\(s\) \['num_test'\]"):
        make_task_source("gridworld", num_test=3)
    with pytest.raises(EnvError, match="already registered"):
        register_env("gridworld", GridWorldEnv)
    with pytest.raises(EnvError, match="env_factory"):
        register_env("broken", 42)
    register_env("no_tasks", GridWorldEnv, overwrite=True)
    with pytest.raises(EnvError, match="no registered task source"):
        make_task_source("no_tasks")
    register_env("bad_path", "trace_core.envs.gridworld.env:Missing", overwrite=True)
    with pytest.raises(EnvError, match="cannot import factory"):
        make_env("bad_path")


def test_user_registered_env_and_kwargs_factory():
    register_env("custom_grid", lambda **kw: GridWorldEnv(**kw), overwrite=True)
    assert make_env("custom_grid", max_turns=3).turn_cap == 3


def test_call_with_timeout():
    assert call_with_timeout(lambda x: x + 1, 1, timeout_s=5)[0] == 2
    assert call_with_timeout(lambda x: x * 2, 4, timeout_s=None)[0] == 8
    with pytest.raises(ToolTimeout, match="timeout_s=0.05"):
        call_with_timeout(time.sleep, 2, timeout_s=0.05)
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 / 0, timeout_s=5)
    with pytest.raises(ValueError, match="timeout_s"):
        call_with_timeout(print, timeout_s=0)


def test_step_all_batches_envs_that_define_step_batch_and_keeps_order():
    from trace_core.envs.base import Step, step_all

    class Plain:
        def __init__(self, tag):
            self.tag = tag

        def step(self, action):
            return Step(f"{self.tag}:{action}", False)

    class Batched(Plain):
        batches: list[int] = []  # noqa: RUF012  (a test double's call log)

        @staticmethod
        def step_batch(envs, actions):
            Batched.batches.append(len(envs))
            return [Step(f"{e.tag}:{a}!", False) for e, a in zip(envs, actions)]

    envs = [Plain("a"), Batched("b"), Plain("c"), Batched("d")]
    steps = step_all(envs, ["1", "2", "3", "4"])
    assert [s.observation for s in steps] == ["a:1", "b:2!", "c:3", "d:4!"]
    assert Batched.batches == [2]
    with pytest.raises(ValueError, match="actions: 1 actions for 2 envs"):
        step_all(envs[:2], ["x"])
