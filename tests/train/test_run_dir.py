"""A run directory belongs to one run and one trainer (issue 19, defects 1 and 3): a new run refuses a
directory that holds anything, --overwrite deletes only a run's own files, run_dir never means the current
directory, default names are unique, a lock makes a second trainer fail with the holder's pid, and pruning
keeps the newest checkpoints by step number."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from run_helpers import TOY, rows, snapshot, start, trace

from trace_core.train import checkpoint as ckpt
from trace_core.train import run_dir as runs
from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import ConfigError, load_config


def test_training_into_an_existing_run_is_refused_and_the_run_survives(tmp_path):
    """The issue's sequence: train X, train X again (it emptied metrics.jsonl and pruned away its own
    checkpoints), then --resume X (FileNotFoundError). Now the second run is refused and X is untouched."""
    run = tmp_path / "X"
    first = trace("train", *TOY, "steps=6", "checkpoint_every=2", f"run_dir={run}")
    assert first.returncode == 0, first.stderr
    before = snapshot(run)
    second = trace("train", *TOY, "steps=3", "checkpoint_every=2", f"run_dir={run}")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "already holds files" in second.stderr and "--resume" in second.stderr and "--overwrite" in second.stderr
    assert snapshot(run) == before  # nothing written, nothing deleted
    resumed = trace("train", "--resume", "steps=8", "checkpoint_every=2", f"run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in rows(run)] == list(range(1, 9))
    assert ckpt.latest_checkpoint(run).name == "step_00000008.pt"


@pytest.mark.parametrize("value", ["", ".", "./", "CWD", "PARENT"])
def test_run_dir_never_names_the_current_directory(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    value = {"CWD": str(tmp_path), "PARENT": str(tmp_path.parent)}.get(value, value)
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [f"run_dir={value}"])
    assert info.value.field == "run_dir" and "current directory" in str(info.value)


def test_run_dir_blocked_by_a_file_or_unwritable_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for value in (blocker, blocker / "run"):
        with pytest.raises(ConfigError) as info:
            load_config(TrainConfig, None, [f"run_dir={value}"])
        assert info.value.field == "run_dir" and "is a file" in str(info.value)
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the unwritable case cannot be set up")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="run_dir: .* is not writable"):
        load_config(TrainConfig, None, [f"run_dir={locked / 'run'}"])


def test_default_run_names_are_unique_and_latest_points_at_the_newest(tmp_path):
    now = datetime.datetime(2026, 11, 25, 10, 15, 0)
    first = runs.default_run_dir("trace", tmp_path / "runs", now)
    second = runs.default_run_dir("trace", tmp_path / "runs", now)  # the same second: a suffix
    third = runs.default_run_dir("uniform", tmp_path / "runs", now)
    assert [p.name for p in (first, second, third)] == [
        "trace-20261125-101500",
        "trace-20261125-101500-2",
        "uniform-20261125-101500",
    ]
    assert (tmp_path / "runs" / "latest").resolve() == third.resolve()
    assert load_config(TrainConfig).run_dir is None  # the default: a fresh name per run


def test_a_run_without_run_dir_gets_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from trace_core.train.trainer import Trainer

    made = []
    for _ in range(2):
        with Trainer(load_config(TrainConfig, None, [*TOY, "steps=1"])) as trainer:
            trainer.fit()
            made.append(trainer.run_dir)
    assert made[0] != made[1] and all(p.resolve().parent == (tmp_path / "runs").resolve() for p in made)
    assert all(len(rows(p)) == 1 and ckpt.latest_checkpoint(p) for p in made)
    assert load_config(TrainConfig, made[1] / "config.yaml").run_dir == str(made[1])  # saved resolved


def test_overwrite_deletes_only_the_runs_own_files(tmp_path):
    from trace_core.train.trainer import Trainer

    run = tmp_path / "run"
    with Trainer(load_config(TrainConfig, None, [*TOY, "steps=2", f"run_dir={run}"])) as trainer:
        trainer.fit()
    with pytest.raises(ConfigError, match="--overwrite to delete its run files"):
        Trainer(load_config(TrainConfig, None, [*TOY, "steps=1", f"run_dir={run}"]))
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="also holds notes.txt"):
        Trainer(load_config(TrainConfig, None, [*TOY, "steps=1", f"run_dir={run}"]), overwrite=True)
    assert (run / "notes.txt").read_text() == "mine" and ckpt.latest_checkpoint(run) is not None
    (run / "notes.txt").unlink()
    with Trainer(load_config(TrainConfig, None, [*TOY, "steps=1", f"run_dir={run}"]), overwrite=True) as trainer:
        assert not (run / "checkpoints").exists() and rows(run) == []
        trainer.fit()
    assert [r["step"] for r in rows(run)] == [1]


def test_a_second_trainer_on_a_locked_run_dir_fails_with_the_holders_pid(tmp_path):
    from trace_core.train.trainer import Trainer

    run = tmp_path / "run"
    holder = Trainer(load_config(TrainConfig, None, [*TOY, "steps=1", f"run_dir={run}"]))
    with pytest.raises(ConfigError, match=rf"in use by another trainer \(pid {os.getpid()}"):
        Trainer(load_config(TrainConfig, None, [*TOY, "steps=1", f"run_dir={run}"]), resume=True)
    holder.fit()
    holder.close()  # released: the run can be resumed now
    with Trainer(load_config(TrainConfig, None, [*TOY, "steps=2", f"run_dir={run}"]), resume=True) as again:
        assert again.step == 1


def test_two_trainers_started_together_on_one_run_dir(tmp_path):
    """Two `trace train` processes on one run_dir: exactly one clear refusal -- the lock, naming the holder's
    pid, when both get past the empty-directory check, or that check itself when the winner has already
    written its config -- and the winner's run is whole (it used to interleave both runs' metrics and keep
    the second's checkpoints). The lock path alone is tested deterministically below."""
    run = tmp_path / "run"
    procs = {
        seed: start("train", *TOY, "steps=12", "checkpoint_every=4", f"seed={seed}", f"run_dir={run}")
        for seed in (1, 2)
    }
    results = {seed: (p.wait(timeout=600), *p.communicate()) for seed, p in procs.items()}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], {s: r[2][-2000:] for s, r in results.items()}
    winner = next(s for s, r in results.items() if r[0] == 0)
    loser = next(s for s, r in results.items() if r[0] == 2)
    err = results[loser][2]
    locked = f"pid {procs[winner].pid}" in err and "in use by another trainer" in err
    assert locked or "already holds files" in err, err
    assert [r["step"] for r in rows(run)] == list(range(1, 13))
    assert load_config(TrainConfig, run / "config.yaml").seed == winner
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run), require_manifest=True)
    assert state["step"] == 12 and state["config"]["seed"] == winner


def test_pruning_keeps_the_newest_by_step_number_and_never_the_one_just_written(tmp_path):
    for step in (99_999_999, 123_456_789):  # by name "step_123456789" sorts before "step_99999999"
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")] == ["step_123456789.pt"]
    other = tmp_path / "other"
    for step in (4, 6):  # a run that got further, then a save at an earlier step
        ckpt.save_checkpoint(other, step, {"step": step}, keep=2)
    written = ckpt.save_checkpoint(other, 2, {"step": 2}, keep=2)
    assert written.is_file() and ckpt.latest_checkpoint(other) == written
    assert ckpt.load_checkpoint(written, require_manifest=True)["step"] == 2


def test_the_lock_is_released_when_the_process_ends(tmp_path):
    run = tmp_path / "run"
    proc = start("train", *TOY, "steps=1", f"run_dir={run}")
    assert proc.wait(timeout=300) == 0, proc.communicate()[1]
    lock = runs.acquire(run)  # the finished trainer holds nothing
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert torch.load(ckpt.latest_checkpoint(run), weights_only=True)["step"] == 1
