"""Sharded checkpoints of a run over several processes (torch.distributed.checkpoint), atomic like the
single-process ones (trace_core/train/checkpoint.py, which one-process runs keep: one file that `trace eval`
and any torch.load read without a process group).

    run_dir/checkpoints/step_00000040/       one directory per saved step
        .metadata, __<rank>_0.distcp           model + optimizer state: each rank writes its own shards (DCP)
        trainer.pt                             step, leaves_sampled, config, predictor, grad scaler (rank 0:
                                               the predictor is replicated, the same on every rank)
        rank_00000.pt, rank_00001.pt, ...      each rank's RNG state (Python, NumPy, torch)
    run_dir/checkpoints/step_00000040.json   manifest: {"dir", "step", "world_size", "files": {name: {bytes, sha256}}}
    run_dir/checkpoints/latest               name of the newest complete checkpoint

Every rank writes into a temporary directory; when all have written (a barrier), rank 0 checksums the files,
renames the directory into place, writes the manifest and only then points `latest` at it. A process killed at
any moment leaves the previous checkpoint as `latest`. Resume needs the same world size: the manifest records
it, and a different one is a ConfigError saying which to launch. Several nodes need a shared filesystem for
run_dir (every rank writes its shards there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from trace_core.train import checkpoint as ckpt
from trace_core.train.config_loader import ConfigError
from trace_core.train.distributed import World

STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def save(
    run_dir: str | Path,
    step: int,
    world: World,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    *,
    keep: int = 2,
) -> Path:
    """Write the step's sharded checkpoint (a collective: every rank calls it). model: the DDP / FSDP2 module."""
    import torch.distributed.checkpoint as dcp  # here: one-process runs never import it
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    tmp = folder / f".{name}.tmp"
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before
        tmp.mkdir()
    world.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    ckpt._atomic_write(tmp / _rank_file(world.rank), lambda handle: torch.save({"rng": ckpt.rng_state()}, handle))
    if world.is_main:
        ckpt._atomic_write(tmp / "trainer.pt", lambda handle: torch.save(trainer_state, handle))
    world.barrier()
    final = folder / name
    if world.is_main:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": ckpt._sha256(p)} for p in sorted(tmp.iterdir())}
        if final.exists():  # the same step saved again (a resumed run): the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        manifest = {"dir": name, "step": int(step), "world_size": world.size, "files": files}
        ckpt._atomic_write(ckpt.manifest_path(final), lambda handle: handle.write(json.dumps(manifest).encode()))
        point_latest(final)
        if keep > 0:
            prune(folder, keep=keep, current=final)
    world.barrier()
    return final


def point_latest(path: Path) -> None:
    ckpt._atomic_write(path.parent / ckpt.LATEST, lambda handle: handle.write(path.name.encode()))


def prune(folder: Path, *, keep: int, current: Path) -> None:
    """Keep `current` and the newest keep - 1 sharded checkpoints before it (by step number)."""
    step = _step(current)
    older = sorted((p for p in folder.iterdir() if _step(p) is not None and _step(p) < step), key=_step)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
        ckpt.manifest_path(old).unlink(missing_ok=True)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` is one sharded checkpoint (checkpoints/step_N/ with its manifest beside it)."""
    return _step(Path(path)) is not None and ckpt.manifest_path(Path(path)).is_file()


def _step(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def verify(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when the checkpoint directory holds the files its manifest recorded, else (None, why)."""
    manifest_file = ckpt.manifest_path(path)
    if not manifest_file.is_file():
        return None, "no manifest (checksums) beside it"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        int(manifest["world_size"])
    except (ValueError, KeyError, TypeError, OSError):
        return None, f"its manifest {manifest_file.name} is unreadable"
    for name, recorded in files.items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != recorded["bytes"] or ckpt._sha256(file) != recorded["sha256"]:
            return None, f"{name} changed after it was written"
    return manifest, None


def resumable(run_dir: str | Path) -> tuple[Path | None, dict | None, list[str]]:
    """The newest intact sharded checkpoint: (path, manifest, skipped), newest `latest` first. Reads only."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None, None, []
    skipped: list[str] = []
    found = sorted((p for p in folder.iterdir() if _step(p) is not None), key=_step, reverse=True)
    pointer = folder / ckpt.LATEST
    if pointer.is_file():
        named = folder / pointer.read_text(errors="replace").strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    for path in found:
        manifest, why = verify(path)
        if manifest is not None:
            return path, manifest, skipped
        skipped.append(f"{path.name}: {why}")
    return None, None, skipped


def saved_world_size(run_dir: str | Path) -> int | None:
    """Processes that wrote the run's newest checkpoint (1 for a single file), None when it has none."""
    folder = Path(run_dir) / "checkpoints"
    manifests = sorted(folder.glob("step_*.json")) if folder.is_dir() else []
    for manifest in reversed(manifests):
        try:
            data = json.loads(manifest.read_text())
        except (ValueError, OSError):
            continue
        return int(data.get("world_size", 1))
    return None


def check_world_size(run_dir: str | Path, world_size: int, saved: int | None = None) -> None:
    """ConfigError when the run's checkpoints (`saved`: the resumed one's) were written by another number of
    processes."""
    saved = saved_world_size(run_dir) if saved is None else saved
    if saved is not None and saved != world_size:
        launch = "one process (no torchrun)" if saved == 1 else f"torchrun with {saved} processes in all"
        raise ConfigError(
            "resume",
            f"{run_dir}'s checkpoints were written by {saved} process(es) (world size {saved}), this run has "
            f"{world_size}; a sharded checkpoint resumes on the same world size only: resume with {launch}",
        )


def load(
    run_dir: str | Path, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[Path, dict, list[str]]:
    """Load the newest intact sharded checkpoint into `model` (the DDP / FSDP2 module) and `optimizer`, and this
    rank's RNG state (a collective). Returns (path, the trainer state of trainer.pt, what was skipped)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    choice = world.broadcast(resumable(run_dir) if world.is_main else None)  # every rank loads the same one
    path, manifest, skipped = choice
    if path is None:
        check_world_size(run_dir, world.size)
        detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise ConfigError("resume", f"{run_dir} has no checkpoint to resume from{detail}")
    check_world_size(run_dir, world.size, int(manifest["world_size"]))
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    ckpt.set_rng_state(torch.load(path / _rank_file(world.rank), weights_only=True)["rng"])
    trainer_state = torch.load(path / "trainer.pt", weights_only=True)
    return path, trainer_state, skipped


def read_trainer_state(path: Path) -> dict:
    """trainer.pt of the sharded checkpoint directory `path` (step, config, predictor), its files verified."""
    from trace_core.train.checkpoint import CheckpointError

    manifest, why = verify(path)
    if manifest is None:
        raise CheckpointError(str(path), why)
    return torch.load(path / "trainer.pt", weights_only=True)


def load_full_model(path: Path, model: torch.nn.Module) -> None:
    """The policy weights of a sharded checkpoint, read whole into an unwrapped `model` in one process (no process
    group: `trace eval`, export)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
