"""Config loading: YAML + dotted overrides, type conversion, and errors that name the key."""
from dataclasses import dataclass, field
from typing import Literal

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
