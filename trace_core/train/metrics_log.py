"""Where a run's metrics go: metrics.jsonl (one JSON object per step or evaluation), TensorBoard
events when `tensorboard` is installed, and metrics.png drawn from the jsonl at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsLog:
    def __init__(self, run_dir: Path, *, fresh: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        if fresh:
            self.path.write_text("")
        self._tensorboard = _tensorboard_writer(Path(run_dir) / "tensorboard")

    def write(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in metrics.items()}) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                    self._tensorboard.add_scalar(key, float(value), step)
            self._tensorboard.flush()

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def truncate_after(self, step: int) -> None:
        """Drop rows of steps after `step` (a resumed run runs them again)."""
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def plot(self, label: str) -> None:
        from trace_core.train.report import plot_runs

        rows = self.rows()
        if rows:
            plot_runs({label: [rows]}, self.path.with_name("metrics.png"))


def _plain(value):
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


def _tensorboard_writer(folder: Path):
    """TensorBoard event writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))
