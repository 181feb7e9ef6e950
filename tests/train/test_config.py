"""Config loading: YAML + dotted overrides, type conversion, and errors that name the key."""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest

from trace_core.train.config_loader import ConfigError, from_dict, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-5
    steps: int = 10
    schedule: Literal["constant", "cosine"] = "constant"
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


@dataclass
class Train:
    seed: int = 0
    name: str = "run"
    resume: bool = False
    checkpoint: str | None = None
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 2.0e-4\n  schedule: cosine\n")
    cfg = load_config(Train, path, ["optim.steps=7", "optim.lr=1e-3", "tags=[a, b]", "checkpoint=null", "name=42"])
    assert cfg.seed == 3 and cfg.optim.lr == 1e-3 and cfg.optim.steps == 7 and cfg.optim.schedule == "cosine"
    assert cfg.tags == ["a", "b"] and cfg.checkpoint is None and cfg.name == "42"
    assert cfg.optim.betas == (0.9, 0.999)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Train, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["optim"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
        (["sed=1"], "unknown key 'sed'; did you mean 'seed'"),
        (["zzz=1"], "unknown key 'zzz'; known keys: seed, name"),
        (["seed=1.5"], "seed: expected an integer, got 1.5"),
        (["seed=abc"], "seed: expected an integer, got 'abc'"),
        (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        (["resume=maybe"], "resume: expected true or false, got 'maybe'"),
        (["optim.schedule=linear"], "optim.schedule: 'linear' is not one of 'constant', 'cosine'"),
        (["optim.betas=[0.9]"], r"optim.betas: expected 2 values, got 1"),
        (["optim=3"], "optim: expected a mapping"),
        (["optim.lr=-1"], "optim: lr: must be > 0, got -1.0"),
        (["seed"], "override 'seed': expected key=value"),
        (["seed.x=1"], r"seed: expected an integer, got \{'x': 1\}"),
        (["seed=1", "seed.x=1"], "override 'seed.x': 'seed' is a value, not a section"),
        (["tags=a"], "tags: expected a list"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Train, None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(Train, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(Train, bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Train, bad)
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        from_dict(Train, [1])


# ---------------------------------------------------------------- the trainer's config: allocation, plugins


def _train(*overrides):
    from trace_core.train.config import TrainConfig

    return load_config(TrainConfig, None, list(overrides))


@pytest.mark.parametrize(
    "mode, pair",
    [
        ("trace", ("active", "active")),
        ("uniform", ("uniform", "none")),
        ("random_tree", ("uniform", "random")),
        ("pcl", ("pcl", "none")),
    ],
)
def test_allocation_modes_build_their_pairs(mode, pair):
    cfg = _train(f"allocation.mode={mode}")
    allocation = cfg.allocation.build()
    assert (allocation.root_name, allocation.prefix_name) == pair
    # the bare budget of a step: every leaf for the pairs that expand nothing
    a = cfg.allocation
    expected = a.leaves_per_step if pair[1] == "none" else a.roots
    assert allocation.bare_budget(a.roots, a.continuations_per_root) == expected


def test_allocation_stage_overrides_and_options():
    allocation = _train("allocation.root_strategy=uniform", "allocation.prefix_strategy=active").allocation.build()
    assert (allocation.root_name, allocation.prefix_name) == ("uniform", "active")
    assert _train().allocation.build().root.root_method == "ranked"  # the fast exact solver by default
    assert _train("allocation.root_method=dp").allocation.build().root.root_method == "dp"
    assert _train("allocation.mode=pcl", "allocation.pcl_count=8").allocation.build().root.count_per_prompt == 8


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (
            ["allocation.mode=best"],
            "allocation.mode",
            "allocation.mode: 'best' is not one of the registered modes: pcl, random_tree, trace, uniform",
        ),
        (
            ["allocation.root_strategy=greedy"],
            "allocation.root_strategy",
            "allocation.root_strategy: 'greedy' is not one of the registered root strategies: active, pcl, uniform",
        ),
        (
            ["allocation.prefix_strategy=all"],
            "allocation.prefix_strategy",
            "allocation.prefix_strategy: 'all' is not one of the registered prefix strategies: active, none, random, uniform",
        ),
        (
            ["allocation.root_method=fast"],
            "allocation.root_method",
            "allocation.root_method: 'fast' is not one of 'dp', 'ranked'",
        ),
        (["env.name=nowhere"], "env.name", "env.name: unknown env name 'nowhere'; registered: "),  # lists the envs
        (["optim.advantage=ppo"], "optim.advantage", "optim.advantage: unknown estimator 'ppo'; choose one of grpo"),
        (["plugins=[no_such_plugin_module]"], "plugins[0]", "plugins[0]: no module named 'no_such_plugin_module'"),
        # pcl keeps budget // pcl_count prompts of the step's M (1 + N) = 64 bare rollouts
        (
            ["allocation.mode=pcl", "allocation.pcl_count=2"],
            "allocation.pcl_count",
            "allocation.pcl_count: 2 bare rollouts per kept prompt does not fit the step's 64 bare rollouts",
        ),
        (
            ["allocation.mode=uniform", "allocation.candidates=2"],
            "allocation.candidates",
            "allocation.candidates: candidates * m_max = 32 cannot hold the 64 bare rollouts",
        ),
        (
            ["allocation.expansion_rounds=0"],
            "allocation.expansion_rounds",
            "allocation.expansion_rounds: must be >= 1, got 0",
        ),
        (["optim.warmup_steps=500"], "optim.warmup_steps", "optim.warmup_steps: 500 is more than the run's 250 steps"),
    ],
)
def test_trainer_config_errors_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as info:
        _train(*overrides)
    assert info.value.field == key and message in str(info.value) and isinstance(info.value, ValueError)


def test_pcl_budget_counts_every_leaf():
    # 16 candidates * m_max 16 hold M (1 + N) = 64 bare rollouts; with m_max = 3 they cannot
    assert _train("allocation.mode=pcl").allocation.build().bare_budget(32, 1) == 64
    with pytest.raises(ConfigError, match="cannot hold the 64 bare rollouts"):
        _train("allocation.mode=pcl", "allocation.m_max=3", "allocation.m_min=2", "allocation.pcl_count=2")
    # the same m_max suffices for a mode that expands (32 bare rollouts)
    _train("allocation.mode=trace", "allocation.m_max=3", "allocation.m_min=2")


PLUGIN = """
import numpy as np

from trace_core.advantage import grpo, register_advantage
from trace_core.allocation import register_mode, register_root_strategy


@register_root_strategy("{name}")
class FirstPrompts:
    uses_predictor = False
    cold_start = None

    def __call__(self, v, budget, *, m_min, m_max, eps, rng):
        counts = np.zeros(len(v), dtype=np.int64)
        counts[: budget // m_min] = m_min
        counts[0] += budget - counts.sum()
        return counts


register_mode("{name}_mode", root="{name}", prefix="uniform")
register_advantage("{name}_adv", grpo)
"""


def test_a_plugin_file_registers_strategies_the_config_names(tmp_path):
    from trace_core.advantage import ADVANTAGES
    from trace_core.allocation import MODES, ROOT_STRATEGIES

    path = tmp_path / "my_strategies.py"
    path.write_text(PLUGIN.format(name="test_plugin_roots"))
    try:
        with pytest.raises(ConfigError, match=r"allocation\.root_strategy: 'test_plugin_roots' is not one of"):
            _train("allocation.root_strategy=test_plugin_roots")  # without the plugin
        cfg = _train(
            f"plugins=[{path}]", "allocation.root_strategy=test_plugin_roots", "optim.advantage=test_plugin_roots_adv"
        )
        allocation = cfg.allocation.build()
        assert (allocation.root_name, allocation.prefix_name) == ("test_plugin_roots", "active")
        counts = allocation.root(np.full(16, 0.5), 32, m_min=4, m_max=16, eps=0.02, rng=np.random.default_rng(0))
        assert counts.tolist()[:9] == [4] * 8 + [0]
        assert cfg.plugins == [str(path)]
        # a saved config loads its plugins again (the second load does not re-register, which would fail)
        save_config(cfg, tmp_path / "saved.yaml")
        again = load_config(
            type(cfg),
            tmp_path / "saved.yaml",
            ["allocation.mode=test_plugin_roots_mode", "allocation.root_strategy=null"],
        )
        assert again.allocation.build().describe() == "test_plugin_roots/uniform"
    finally:
        ROOT_STRATEGIES.unregister("test_plugin_roots")
        MODES.unregister("test_plugin_roots_mode")
        ADVANTAGES.unregister("test_plugin_roots_adv")


def test_setting_one_key_of_a_section_keeps_that_sections_defaults(tmp_path):
    """TrainConfig builds its predictor section with its own arguments (hidden_dim=64, warmup_nodes=1000);
    setting another predictor key, on the command line or in a file, must not reset those to the
    PredictorConfig class defaults."""
    from trace_core.predictor_config import PredictorConfig
    from trace_core.train.config import TrainConfig

    default = TrainConfig().predictor
    assert (default.hidden_dim, default.warmup_nodes) != (PredictorConfig().hidden_dim, PredictorConfig().warmup_nodes)
    for cfg in (
        load_config(TrainConfig, overrides=["predictor.backend=oracle"]),
        load_config(TrainConfig, overrides=["predictor.ngram_buckets=0"]),
    ):
        assert (cfg.predictor.hidden_dim, cfg.predictor.warmup_nodes) == (default.hidden_dim, default.warmup_nodes)
    # a section built by its class (env) resolves its derived keys again from the given ones
    assert load_config(TrainConfig, overrides=["env.name=multihop"]).env.tasks == {}
    path = tmp_path / "run.yaml"
    path.write_text("predictor:\n  lr: 0.01\n  hidden_dim: 32\n")
    cfg = load_config(TrainConfig, path)
    assert (cfg.predictor.lr, cfg.predictor.hidden_dim, cfg.predictor.warmup_nodes) == (0.01, 32, default.warmup_nodes)
