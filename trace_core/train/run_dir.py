"""A run directory belongs to one run, and to one trainer at a time.

    run_dir/config.yaml, metrics.jsonl, metrics.png, checkpoints/, tensorboard/, wandb/   the run's own files
    run_dir/.lock                                                                 held (flock) by the trainer

- `check_path(run_dir)` (config time, touches nothing): run_dir names a directory that is not the current
  one (nor one above it), is not blocked by a file, and can be written.
- `default_run_dir(mode)`: `runs/<mode>-<YYYYmmdd-HHMMSS>` (a numeric suffix on collision), claimed with an
  atomic mkdir, and `runs/latest` pointed at it: every run without a run_dir gets a fresh directory.
- `RunLock`: an exclusive `fcntl.flock` on run_dir/.lock for the trainer's lifetime; a second trainer on the
  same directory fails at start with the holder's pid. The kernel drops the lock when the process exits.
- `prepare_new(run_dir, overwrite)`: a new run refuses a directory that holds anything (`--resume` continues
  it, `--overwrite` deletes the run's own files and nothing else, or choose a fresh run_dir).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import time
import weakref
from pathlib import Path

from trace_core.train.config_loader import ConfigError

LOCK = ".lock"
LATEST_LINK = "latest"  # runs/latest -> the newest run started with a default name
# what --overwrite may delete: a run's own files (the trainer writes nothing else)
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.png")
RUN_FOLDERS = ("checkpoints", "tensorboard", "wandb")
OVERWRITE_DELETES = "config.yaml, metrics.jsonl, metrics.png, checkpoints/, tensorboard/ and wandb/"


def check_path(value: str) -> None:
    """ConfigError naming run_dir unless `value` can be a run directory; creates nothing."""
    if not value.strip() or Path(value) == Path("."):
        raise ConfigError(
            "run_dir",
            f"{value!r} names the current directory; name the run's own directory, e.g. run_dir=runs/my-run "
            "(or leave run_dir unset for a fresh runs/<mode>-<date>-<time>)",
        )
    path = Path(value).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ConfigError("run_dir", f"{value!r} is the current directory or one above it; name a run directory")
    if path.exists() and not path.is_dir():
        raise ConfigError("run_dir", f"{value!r} is a file, not a directory")
    # the nearest existing ancestor must be a directory we can write into
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError("run_dir", f"{value!r} cannot be created: {str(probe)!r} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created: {str(probe)!r} is not writable"
        raise ConfigError("run_dir", f"{value!r} {what}")


def default_run_dir(
    mode: str, root: str | Path = "runs", now: datetime.datetime | None = None, *, link_latest: bool = True
) -> Path:
    """Claim a fresh `root/<mode>-<YYYYmmdd-HHMMSS>[-N]` (atomic mkdir: two runs never get the same one) and
    point `root/latest` at it (with `link_latest`)."""
    root = Path(root)
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (f"{mode}-{stamp}" if n == 1 else f"{mode}-{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        if link_latest:
            _point_latest(root, path.name)
        return path
    raise ConfigError("run_dir", f"no free run name under {root} for {mode}-{stamp}")


def _point_latest(root: Path, name: str) -> None:
    """root/latest -> name, replaced atomically; left alone when something else than a link has that name."""
    link = root / LATEST_LINK
    if link.exists() and not link.is_symlink():
        return
    tmp = root / f".{LATEST_LINK}.tmp-{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


class RunLock:
    """Exclusive lock on run_dir/.lock, held until `release()` (or until the object or the process goes)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = _holder_pid(self.path)
            raise ConfigError(
                "run_dir",
                f"{Path(run_dir)} is in use by another trainer (pid {pid or 'unknown'} holds {self.path}); "
                "wait for it to finish, or choose another run_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd: int | None = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        if self._fd is not None:
            self._finalizer()  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder_pid(path: Path) -> str:
    """The pid the holder wrote into the lock file (it writes it right after locking: retry briefly)."""
    for _ in range(20):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.05)
    return ""


def acquire(run_dir: str | Path) -> RunLock:
    """RunLock on run_dir, creating the directory. A lock still held by a trainer of this process that is no
    longer referenced is collected first (flock locks conflict between descriptors of one process too)."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(path)
    except ConfigError:
        if _holder_pid(path / LOCK) != str(os.getpid()):
            raise
    import gc

    gc.collect()
    return RunLock(path)


def contents(run_dir: str | Path) -> list[str]:
    """Names in run_dir other than the lock file (sorted)."""
    path = Path(run_dir)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name != LOCK)


def _is_run_file(entry: Path) -> bool:
    if entry.name in RUN_FILES and entry.is_file():
        return True
    if entry.name in RUN_FOLDERS and entry.is_dir() and not entry.is_symlink():
        return all(p.is_file() or p.is_symlink() for p in entry.iterdir())  # checkpoints / events, no subfolders
    return entry.name == LOCK


def describe(run_dir: str | Path) -> str:
    names = contents(run_dir)
    checkpoints = Path(run_dir) / "checkpoints"
    steps = len(list(checkpoints.glob("step_*.pt"))) if checkpoints.is_dir() else 0
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return shown + (f"; {steps} checkpoint(s)" if steps else "")


def check_new(run_dir: str | Path, *, overwrite: bool) -> None:
    """ConfigError unless a new run may start in run_dir (no lock taken; `prepare_new` does the real thing)."""
    if not contents(run_dir):
        return
    if not overwrite:
        raise ConfigError(
            "run_dir",
            f"{run_dir} already holds files ({describe(run_dir)}); a new run never writes into another run's "
            f"directory. Pass --resume to continue that run, --overwrite to delete its run files "
            f"({OVERWRITE_DELETES}) and start over, or choose a fresh run_dir (or none: runs/<mode>-<date>-<time>)",
        )
    foreign = [p.name for p in sorted(Path(run_dir).iterdir()) if not _is_run_file(p)]
    if foreign:
        raise ConfigError(
            "run_dir",
            f"--overwrite deletes only a run's own files ({OVERWRITE_DELETES}), but {run_dir} also holds "
            f"{', '.join(foreign[:6])}: it does not look like a run directory, so nothing was deleted; "
            "choose a fresh run_dir",
        )


def prepare_new(run_dir: str | Path, *, overwrite: bool) -> None:
    """Under the lock: refuse a non-empty run_dir, or with `overwrite` delete the run's own files in it."""
    check_new(run_dir, overwrite=overwrite)
    path = Path(run_dir)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (path / name).is_dir():
            shutil.rmtree(path / name)


__all__ = ["RunLock", "acquire", "check_new", "check_path", "contents", "default_run_dir", "prepare_new"]
