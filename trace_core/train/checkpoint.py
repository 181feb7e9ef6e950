"""Atomic checkpoints in a run directory, and the RNG state that makes `--resume` exact.

    run_dir/checkpoints/step_00000040.pt     one file per saved step
    run_dir/checkpoints/step_00000040.json   its manifest: {"file", "step", "bytes", "sha256"}
    run_dir/checkpoints/latest               name of the newest complete checkpoint

A checkpoint is written to a temporary file, flushed to disk, then renamed into place; then its
manifest (the file's sha256), and only then is `latest` (itself replaced atomically) pointed at it:
a process killed at any moment leaves the previous checkpoint as `latest`, never a truncated file.
Loading verifies the checksum, so a checkpoint changed afterwards (truncated, emptied, appended to)
is refused; `resumable_checkpoint` falls back to the newest intact one and says what it skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from trace_core.errors import TraceError

LATEST = "latest"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
log = logging.getLogger("trace_core.train.checkpoint")


class CheckpointError(TraceError):
    """A checkpoint that cannot be trusted: missing, unreadable, or not the bytes that were written.
    `field` is the checkpoint's path, `detail` the reason."""


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
    manifest = {"file": path.name, "step": int(step), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    _atomic_write(manifest_path(path), lambda handle: handle.write(json.dumps(manifest).encode()))
    _atomic_write(folder / LATEST, lambda handle: handle.write(path.name.encode()))
    if keep > 0:
        prune(folder, keep=keep, current=path)
    return path


def prune(folder: Path, *, keep: int, current: Path) -> None:
    """Keep `current` and the newest keep - 1 checkpoints before it, ordered by step number (not by name);
    never the one just written. Checkpoints numbered above `current` are left alone."""
    current_step = step_of(current)
    older = sorted(
        (p for p in folder.glob("step_*.pt") if step_of(p) is not None and step_of(p) < current_step),
        key=step_of,
    )
    for old in older[: max(len(older) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
        manifest_path(old).unlink(missing_ok=True)


def step_of(path: Path) -> int | None:
    match = STEP_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has no `latest`; FileNotFoundError when it names a
    missing file. (No checksum check: `resumable_checkpoint` is what resume and evaluation use.)"""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing; the run directory was edited by hand?")
    return path


def verify(path: str | Path, *, require_manifest: bool = True) -> str | None:
    """None when the checkpoint at `path` is the bytes its manifest recorded, else why it is not.
    Without a manifest beside it: a reason when `require_manifest`, else None (unverified)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    manifest = manifest_path(path)
    if not manifest.is_file():
        return "no manifest (checksum) beside it" if require_manifest else None
    try:
        recorded = json.loads(manifest.read_text())
        expected_bytes, expected_sha = int(recorded["bytes"]), str(recorded["sha256"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"its manifest {manifest.name} is unreadable"
    if size != expected_bytes:
        how = "truncated" if size < expected_bytes else "appended to"
        return f"{how}: {size} bytes, {expected_bytes} were written"
    if _sha256(path) != expected_sha:
        return "checksum mismatch: the file changed after it was written"
    return None


def load_checkpoint(path: str | Path, *, verify_checksum: bool = True, require_manifest: bool = False) -> dict:
    """The state saved at `path`. Its checksum is verified when a manifest lies beside it (required with
    `require_manifest`); CheckpointError when the file is not what was written or cannot be read."""
    path = Path(path)
    if verify_checksum:
        reason = verify(path, require_manifest=require_manifest)
        if reason is not None:
            raise CheckpointError(str(path), reason)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(str(path), "missing") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, pickle / zip errors on damaged files
        raise CheckpointError(str(path), f"cannot be read ({type(err).__name__}: {err})") from None


def resumable_checkpoint(run_dir: str | Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest intact checkpoint of a run: (path, state, skipped), where `skipped` says, one line each,
    what was passed over and why (a bad or missing `latest`, damaged checkpoints). (None, None, skipped)
    when no checkpoint is intact. Reads only."""
    folder = Path(run_dir) / "checkpoints"
    skipped: list[str] = []
    candidates: list[Path] = []
    pointer = folder / LATEST
    found = sorted((p for p in folder.glob("step_*.pt") if step_of(p) is not None), key=step_of, reverse=True)
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if STEP_FILE.match(name) and (folder / name).is_file():
            candidates.append(folder / name)
        elif STEP_FILE.match(name):
            skipped.append(f"checkpoints/latest names {name}, which is missing")
        else:
            skipped.append(f"checkpoints/latest does not name a checkpoint ({name[:40]!r})")
    elif found:
        skipped.append("checkpoints/latest is missing")
    candidates += [p for p in found if p not in candidates]
    for path in candidates:
        try:
            state = load_checkpoint(path, require_manifest=True)
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err.detail}")
            continue
        return path, state, skipped
    return None, None, skipped


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
