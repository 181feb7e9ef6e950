"""Atomic checkpoints in a run directory, and the RNG state that makes `--resume` exact.

    run_dir/checkpoints/step_00000040.pt     one file per saved step
    run_dir/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is written to a temporary file, flushed to disk, then renamed into place, and only
then is `latest` (itself replaced atomically) pointed at it: a process killed at any moment leaves
the previous checkpoint as `latest`, never a truncated file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, *, keep: int = 2) -> Path:
    """Write `state` (tensors, numbers, strings, lists, dicts) for `step`; keep the newest `keep`."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    _atomic_write(path, lambda handle: torch.save(state, handle))
    _atomic_write(folder / LATEST, lambda handle: handle.write(path.name.encode()))
    for old in sorted(folder.glob("step_*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing; the run directory was edited by hand?")
    return path


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """States of Python's, NumPy's global and torch's generators (plain types only)."""
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)  # MT19937: key array + position
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    return {"python": [py[0], list(py[1]), py[2]], "numpy": np_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.asarray(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
