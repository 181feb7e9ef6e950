"""Where a run's metrics go: metrics.jsonl (one JSON object per step or evaluation), TensorBoard
events when `tensorboard` is installed, Weights & Biases when `logging.wandb_project` is set
(trace_core/train/wandb_log.py, rank 0 only), and metrics.png drawn from the jsonl at the end of a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("trace_core.train.metrics_log")


class MetricsLog:
    """fresh=True starts an empty metrics.jsonl; fresh=False (resume) keeps it, repairing what a crash can
    leave: a missing file is recreated empty, a partial or unreadable line is dropped (each with a warning).
    logging_cfg: the run's LoggingConfig (W&B settings); None or no wandb_project: no W&B."""

    def __init__(self, run_dir: Path, *, fresh: bool, logging_cfg: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if fresh:
            self.path.write_text("")
        else:
            self.repair()
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard")
        self._wandb = None
        if logging_cfg is not None and logging_cfg.wandb_project is not None:
            from trace_core.train.wandb_log import wandb_run

            self._wandb = wandb_run(logging_cfg, Path(run_dir), _saved_config(Path(run_dir)))

    def repair(self) -> list[str]:
        """Make metrics.jsonl whole lines of JSON objects again; returns the warnings it gave."""
        warnings = []
        if not self.path.is_file():
            self.path.write_text("")
            warnings.append(f"{self.path} was missing; recreated it empty (the rows of earlier steps are lost)")
        else:
            text = self.path.read_text(errors="replace")
            lines = text.split("\n")
            tail = lines.pop()  # "" when the file ends with a newline, else a line the writer never finished
            kept, dropped = [], []
            for number, line in enumerate(lines, start=1):
                if line.strip() and _row(line) is not None:
                    kept.append(line)
                elif line.strip():
                    dropped.append(number)
            if tail.strip():
                if _row(tail) is not None:
                    kept.append(tail)  # complete but unterminated: keep it
                else:
                    warnings.append(f"{self.path}: dropped a partial last line ({len(tail)} characters)")
            if dropped:
                warnings.append(f"{self.path}: dropped unreadable line(s) {', '.join(map(str, dropped))}")
            if warnings:
                self.path.write_text("".join(line + "\n" for line in kept))
        for warning in warnings:
            log.warning(warning)
        return warnings

    def write(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                    self._tensorboard.add_scalar(key, float(value), step)
            self._tensorboard.flush()
        if self._wandb is not None:
            from trace_core.train.wandb_log import log_row

            log_row(self._wandb, metrics, step)

    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after `step` (a resumed run runs them again)."""
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (row := _row(line)) is not None and row.get("step", 0) <= step]
        if len(kept) != len(lines):
            self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def plot(self, label: str, *, seed: int) -> None:
        """metrics.png of this one run (`label`: its allocation, `seed`: its seed)."""
        from trace_core.train.report import plot_runs

        rows = self.rows()
        if rows:
            title = f"one run: {label}, seed {seed}; per-step curves: raw (faint) and moving average"
            plot_runs({label: [rows]}, self.path.with_name("metrics.png"), title=title)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file (unreadable lines skipped), without opening it for writing."""
    return [row for line in Path(path).read_text().splitlines() if (row := _row(line)) is not None]


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _saved_config(run_dir: Path) -> dict | None:
    """The run's config.yaml as a mapping (what W&B shows as the run's config), None when absent."""
    import yaml

    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _plain(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


def _tensorboard_writer(folder: Path):
    """TensorBoard event writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))
