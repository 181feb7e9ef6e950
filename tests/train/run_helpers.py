"""Helpers of the run-directory, checkpoint and CLI tests: the toy config and `trace` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# a toy run (1-layer model, 16 leaves per step, 8 eval tasks): a step takes well under a second on CPU
TOY = [
    "model.hidden_size=32",
    "model.layers=1",
    "model.heads=2",
    "model.kv_heads=1",
    "model.attention_backend=reference",
    "allocation.candidates=4",
    "allocation.roots=8",
    "allocation.continuations_per_root=1",
    "allocation.m_min=2",
    "allocation.m_max=4",
    "eval_tasks=8",
    "eval_every=0",
    "eval_at_start=false",  # rows are training steps; test_cli_train_writes_run_directory covers the step-0 row
    "progress=false",
    "predictor.warmup_nodes=20",
    "env.tasks={num_train: 40, num_eval: 8}",
]


def trace(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    """`trace ARGS` in a fresh Python process; returns the CompletedProcess (stdout, stderr as text)."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "trace_core.train.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "trace_core.train.cli", *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder` (what "nothing was written" compares)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
