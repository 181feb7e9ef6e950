"""Weights & Biases beside metrics.jsonl: `logging.wandb_project` set, rank 0 only (trace_core/train/ranks.py).

The W&B run lives in run_dir/wandb/ (offline runs are synced later with `wandb sync run_dir/wandb/offline-run-*`);
its id is kept in run_dir/wandb/trace-run-id, so `trace train --resume` continues the same W&B run. Rows are
logged against the trainer's own "step" metric (not W&B's internal step), so the steps a resumed run repeats
after its checkpoint are logged again instead of being dropped as out of order.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from trace_core.train.config_loader import ConfigError
from trace_core.train.ranks import is_main_process

log = logging.getLogger("trace_core.train.wandb_log")
ID_FILE = "trace-run-id"


def wandb_run(settings: Any, run_dir: Path, config: dict | None = None):
    """A started `wandb` run for the LoggingConfig `settings`, or None when W&B is not asked for (no
    wandb_project, wandb_mode=disabled) or this is not rank 0. A W&B that cannot start (online without a login,
    say) is a ConfigError naming logging.wandb_mode."""
    if settings is None or settings.wandb_project is None or settings.wandb_mode == "disabled":
        return None
    if not is_main_process():
        return None
    try:
        import wandb
    except ImportError:  # LoggingConfig checks this when the config is built; a process may still lack it
        raise ConfigError(
            "logging.wandb_project", "the wandb package is not installed: pip install 'trace-rl[wandb]'"
        ) from None
    folder = Path(run_dir) / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids: letters and digits
        id_file.write_text(run_id + "\n")
    try:
        run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            name=settings.wandb_run_name or Path(run_dir).name,
            mode=settings.wandb_mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
            reinit="create_new",  # several trainers in one process (tests, compare) each get their own run
            settings=wandb.Settings(console="off", silent=True),
        )
    except Exception as err:  # wandb raises its own UsageError / CommError types
        raise ConfigError(
            "logging.wandb_mode",
            f"Weights & Biases did not start in mode {settings.wandb_mode!r} ({type(err).__name__}: {err}); "
            "log in (`wandb login` or WANDB_API_KEY), or use logging.wandb_mode=offline and `wandb sync` later",
        ) from None
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def log_row(run, metrics: dict, step: int) -> None:
    """Log the numeric entries of one metrics row at the trainer's `step`."""
    row = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating, np.integer))}
    row["step"] = step
    run.log(row)
