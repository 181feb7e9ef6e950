"""Entry point: verl's `run_ppo` with TRACE wired in (docs/verl.md).

    python -m trace_core.integrations.verl.main [--config-name trace_ppo | trace_searchr1] key=value ...

The config is verl's own `ppo_trainer` (its Hydra defaults, found through `pkg://verl.trainer.config`)
with the preset `config/trace_ppo.yaml` on top: tree advantages (`algorithm.adv_estimator=tree_grpo`),
the `trace_agent` loop and the shared-prefix FSDP2 actor. What goes where, across verl's processes:

- the driver (this process): `check_trace_config` (errors that name the field), then
  `prepare_trace_config` points `rollout.agent.agent_loop_config_path` at `config/trace_agent_loop.yaml`
  when it is unset, so every agent-loop worker (a Ray process of its own) registers `trace_agent`;
- the TaskRunner (a Ray actor that builds verl's `RayPPOTrainer` and runs its fit loop):
  `TraceTaskRunner.run` registers `tree_grpo` / `segment` and installs the tree-uid hook there, where
  `compute_advantage` runs, then runs verl's own `TaskRunner.run` (main_ppo_v0);
- the actor workers: Hydra builds `SharedPrefixFSDPEngineConfig` from the `_target_` in the preset,
  which imports `trace_core.integrations.verl.actor` and so registers the shared-prefix engine.

Plain verl users get the same with a few config lines (docs/verl.md) and verl's own `main_ppo`,
except for the two driver-side calls TraceTaskRunner makes.
"""

from __future__ import annotations

import os
from typing import Any

import hydra
import ray
from omegaconf import open_dict
from verl.trainer.main_ppo_v0 import TaskRunner

from trace_core.errors import TraceError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")
AGENT_LOOP_CONFIG = os.path.join(CONFIG_DIR, "trace_agent_loop.yaml")
TREE_ESTIMATORS = ("tree_grpo", "segment")


def check_trace_config(config: Any) -> None:
    """Combinations the TRACE pieces cannot run with: raise TraceError naming the field."""
    agent = config.actor_rollout_ref.rollout.agent.get("default_agent_loop")
    estimator = config.algorithm.adv_estimator
    if config.trainer.get("use_v1", False):
        raise TraceError(
            "trainer.use_v1",
            "must be false: the tree-uid hook wraps the legacy RayPPOTrainer's compute_advantage "
            "(verl's v1 trainer also needs transfer_queue)",
        )
    if estimator in TREE_ESTIMATORS and config.algorithm.get("use_kl_in_reward", False):
        raise TraceError(
            "algorithm.use_kl_in_reward",
            f"must be false with adv_estimator={estimator}: the tree estimators read each row's reward "
            "as the env's success in [0, 1]",
        )
    if agent == "trace_agent" and estimator not in TREE_ESTIMATORS:
        raise TraceError(
            "algorithm.adv_estimator",
            f"is {estimator!r}, but trace_agent's rows are tree leaves: use one of {list(TREE_ESTIMATORS)} "
            "(a flat estimator would treat each prompt's leaves as independent samples)",
        )
    fsdp_config = config.actor_rollout_ref.actor.get("fsdp_config", {})
    if fsdp_config.get("shared_prefix", False) and config.actor_rollout_ref.actor.strategy != "fsdp2":
        raise TraceError(
            "actor_rollout_ref.actor.strategy",
            f"must be fsdp2 with fsdp_config.shared_prefix=true, got {config.actor_rollout_ref.actor.strategy!r}",
        )


def prepare_trace_config(config: Any) -> None:
    """Fill what the preset cannot hold: the absolute path of the agent-loop file."""
    agent = config.actor_rollout_ref.rollout.agent
    if agent.get("default_agent_loop") == "trace_agent" and not agent.get("agent_loop_config_path"):
        with open_dict(agent):
            agent.agent_loop_config_path = AGENT_LOOP_CONFIG


def register_driver_pieces() -> None:
    """What the process that runs RayPPOTrainer.fit needs: the estimators and the tree-uid hook."""
    from trace_core.integrations.verl.advantage import install_tree_uid_hook, register_estimators

    register_estimators()
    install_tree_uid_hook()


class TraceTaskRunner(TaskRunner.__ray_actor_class__):  # verl's TaskRunner class, under its @ray.remote
    """verl's (main_ppo_v0) TaskRunner that registers TRACE's driver-side pieces first."""

    def run(self, config):
        register_driver_pieces()
        return super().run(config)


def run(config: Any) -> None:
    """Check and complete `config`, then verl's run_ppo with TraceTaskRunner."""
    from verl.trainer.main_ppo import run_ppo
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    check_trace_config(config)
    prepare_trace_config(config)
    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(TraceTaskRunner))


@hydra.main(config_path="config", config_name="trace_ppo", version_base=None)
def main(config) -> None:
    run(config)


if __name__ == "__main__":
    main()
