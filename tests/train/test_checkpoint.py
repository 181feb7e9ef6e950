"""Checkpoints are atomic (a crash mid-write keeps the previous one) and restore RNG streams."""

import random

import numpy as np
import pytest
import torch

from trace_core.train import checkpoint as ckpt


def test_round_trip_latest_and_pruning(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000003.pt"
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((3,), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*.pt")) == [
        "step_00000002.pt",
        "step_00000003.pt",
    ]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})

    def dying_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001.pt" and ckpt.load_checkpoint(latest)["step"] == 1
    assert not (tmp_path / "checkpoints" / "step_00000002.pt").exists()
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no debris


def test_rng_state_restores_all_streams(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.save_checkpoint(tmp_path, 1, {"rng": ckpt.rng_state()})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_missing_pointed_file_is_reported(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, {})
    path.unlink()
    with pytest.raises(FileNotFoundError, match="names step_00000005.pt, which is missing"):
        ckpt.latest_checkpoint(tmp_path)
