"""Weights & Biases beside metrics.jsonl (logging.wandb_*): used only when set, refused at config build when the
package is missing, rank 0 only, and (with the real package, offline) every row logged and one W&B run per
trainer run across --resume."""

import importlib.util

import pytest
from run_helpers import TOY, rows

from trace_core.train import wandb_log
from trace_core.train.cli import main
from trace_core.train.config import LoggingConfig, TrainConfig
from trace_core.train.config_loader import ConfigError, load_config
from trace_core.train.trainer import Trainer


def test_wandb_without_the_package_is_a_config_error_before_any_run_directory(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    run_dir = tmp_path / "run"
    assert main(["train", *TOY, f"run_dir={run_dir}", "steps=1", "logging.wandb_project=trace"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: logging.wandb_project: 'trace' asks for Weights & Biases, but the wandb package")
    assert "pip install 'trace-rl[wandb]'" in err and not run_dir.exists()
    assert load_config(TrainConfig).logging == LoggingConfig()  # unset: W&B is not needed


def test_wandb_settings_errors():
    with pytest.raises(ConfigError, match=r"logging\.wandb_mode: 'cloud' is not one of"):
        load_config(TrainConfig, None, ["logging.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match=r"logging\.wandb_run_name: must be null or a non-empty string"):
        load_config(TrainConfig, None, ["logging.wandb_run_name=' '"])


def test_wandb_runs_on_rank_0_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    # a plain namespace: LoggingConfig would check that wandb is installed, and rank 1 never imports it
    settings = SimpleNamespace(wandb_project="trace", wandb_mode="offline", wandb_run_name=None, wandb_entity=None)
    monkeypatch.setenv("RANK", "1")
    assert wandb_log.wandb_run(settings, tmp_path) is None
    assert not (tmp_path / "wandb").exists()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logged = []
    log_row = wandb_log.log_row
    monkeypatch.setattr(
        wandb_log, "log_row", lambda run, metrics, step: (logged.append((run.id, step)), log_row(run, metrics, step))
    )
    return logged


def test_wandb_offline_logs_every_row_and_resume_continues_the_same_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = [
        *TOY,
        f"run_dir={run_dir}",
        "checkpoint_every=1",
        "logging.wandb_project=trace-test",
        "logging.wandb_mode=offline",
    ]
    with Trainer(load_config(TrainConfig, None, [*cfg, "steps=2"])) as trainer:
        trainer.fit()
    run_id = (run_dir / "wandb" / wandb_log.ID_FILE).read_text().strip()
    assert offline_wandb == [(run_id, 1), (run_id, 2)] and [r["step"] for r in rows(run_dir)] == [1, 2]
    files = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    # W&B's own offline log exists (its records are written by wandb's service process, asynchronously: under
    # load the file can still hold only its header here, so the rows are checked at log_row above)
    assert len(files) == 1

    with Trainer(load_config(TrainConfig, None, [*cfg, "steps=3"]), resume=True) as trainer:
        trainer.fit()
    assert offline_wandb[-1] == (run_id, 3)  # the same W&B run goes on
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_wandb_that_cannot_start_names_the_mode(tmp_path, offline_wandb, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(
        ConfigError, match=r"logging\.wandb_mode: Weights & Biases did not start in mode 'online'.*wandb login"
    ):
        wandb_log.wandb_run(LoggingConfig(wandb_project="trace-test", wandb_mode="online"), tmp_path)
