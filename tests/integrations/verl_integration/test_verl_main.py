"""The run_ppo entry point: the presets compose into verl configs that verl's own classes accept, bad
combinations are refused naming the field, and TraceTaskRunner registers the driver pieces before
verl's TaskRunner.run. (run_ppo itself needs vLLM / SGLang rollouts on GPUs: not run here.)

Needs `verl` (scripts/setup_verl_env.sh)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("verl", reason="verl is not installed (make its venv with scripts/setup_verl_env.sh)")

from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

from trace_core.errors import TraceError
from trace_core.integrations.verl import main as trace_main
from trace_core.integrations.verl.actor import SharedPrefixFSDPEngineConfig
from trace_core.integrations.verl.agent_loop import TraceAgentLoop, TraceLoopConfig


def preset(name: str, *overrides: str):
    with initialize_config_dir(config_dir=trace_main.CONFIG_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("name", ["trace_ppo", "trace_searchr1"])
def test_presets_compose_into_verl_configs(name):
    cfg = preset(name, "actor_rollout_ref.model.path=unused")
    # verl's own defaults are underneath (a key the presets never set)
    assert cfg.actor_rollout_ref.actor.clip_ratio == 0.2
    assert cfg.algorithm.adv_estimator == "tree_grpo" and cfg.trainer.use_v1 is False
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "trace_agent"
    # the config objects verl's workers and trainer build
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.engine, SharedPrefixFSDPEngineConfig)
    assert actor.engine.shared_prefix is True and actor.engine.strategy == "fsdp2"
    assert omega_conf_to_dataclass(cfg.algorithm, AlgoConfig).adv_estimator == "tree_grpo"
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    trace_main.check_trace_config(cfg)
    loop = TraceLoopConfig.from_trainer_config(cfg)  # the section the agent loop reads
    if name == "trace_searchr1":
        assert loop.env == "search_qa" and "{question}" in loop.env_kwargs["prompt_template"]
        assert cfg.actor_rollout_ref.rollout.name == "vllm"
        assert cfg.actor_rollout_ref.rollout.n % (1 + loop.continuations_per_root) == 0


def test_agent_loop_file_is_filled_in_and_names_the_loop():
    cfg = preset("trace_ppo")
    assert not cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path
    trace_main.prepare_trace_config(cfg)
    path = cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path
    assert os.path.isabs(path)
    [entry] = OmegaConf.load(path)  # as verl's AgentLoopWorker reads it
    assert entry.name == "trace_agent" and get_class(entry._target_) is TraceAgentLoop
    cfg = preset("trace_ppo", "actor_rollout_ref.rollout.agent.agent_loop_config_path=mine.yaml")
    trace_main.prepare_trace_config(cfg)
    assert cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path == "mine.yaml"  # a user's file is kept


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("trainer.use_v1=true", "trainer.use_v1"),
        ("algorithm.use_kl_in_reward=true", "algorithm.use_kl_in_reward"),
        ("algorithm.adv_estimator=grpo", "algorithm.adv_estimator"),
        ("actor_rollout_ref.actor.strategy=fsdp", "actor_rollout_ref.actor.strategy"),
    ],
)
def test_bad_combinations_name_the_field(override, field):
    with pytest.raises(TraceError) as error:
        trace_main.check_trace_config(preset("trace_ppo", override))
    assert error.value.field == field and str(error.value).startswith(field)


def test_task_runner_registers_the_driver_pieces_before_verls_run(monkeypatch):
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    seen = {}

    def verls_run(self, config):  # stands in for main_ppo_v0.TaskRunner.run (it would start the workers)
        seen["estimator"] = get_adv_estimator_fn("tree_grpo")
        seen["hook"] = getattr(ray_trainer.compute_advantage, "_trace_adopts_uids", False)
        seen["config"] = config

    parent = trace_main.TraceTaskRunner.__mro__[1]
    assert parent.__qualname__ == "TaskRunner" and parent.__module__ == "verl.trainer.main_ppo_v0"
    monkeypatch.setattr(parent, "run", verls_run)
    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)  # undo the hook after
    cfg = preset("trace_ppo")
    trace_main.TraceTaskRunner().run(cfg)
    assert seen["estimator"] is not None and seen["hook"] is True and seen["config"] is cfg
