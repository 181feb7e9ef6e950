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


# ---------------------------------------------------------------- checksums and fallback (issue 19, defect 6)


def _damage(folder, how):
    """Damage the newest checkpoint (step 2) of a run, or its `latest` pointer, as a crash or an editor could."""
    newest = folder / "step_00000002.pt"
    if how == "truncated":
        newest.write_bytes(newest.read_bytes()[:100])
    elif how == "empty":
        newest.write_bytes(b"")
    elif how == "garbage appended":
        with open(newest, "ab") as handle:
            handle.write(b"\x00garbage" * 512)  # 4 KiB: torch.load still reads the zip, silently
    elif how == "latest missing":
        (folder / "latest").unlink()
        newest.unlink()  # and the newest checkpoint with it: step 1 must be found by scanning
    elif how == "latest names a missing file":
        (folder / "latest").write_text("step_00000009.pt")
    elif how == "latest is garbage":
        (folder / "latest").write_text("\x00\x01not a name")


DAMAGE = [
    "truncated",
    "empty",
    "garbage appended",
    "latest missing",
    "latest names a missing file",
    "latest is garbage",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_resumable_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((256,), float(step))})
    _damage(tmp_path / "checkpoints", how)
    path, state, skipped = ckpt.resumable_checkpoint(tmp_path)
    expected = "step_00000002.pt" if how.startswith("latest") and how != "latest missing" else "step_00000001.pt"
    assert path.name == expected and state["step"] == int(expected[5:13])
    reason = {
        "truncated": "step_00000002.pt: truncated",
        "empty": "step_00000002.pt: empty file",
        "garbage appended": "step_00000002.pt: appended to",
        "latest missing": "checkpoints/latest is missing",
        "latest names a missing file": "checkpoints/latest names step_00000009.pt, which is missing",
        "latest is garbage": "checkpoints/latest does not name a checkpoint",
    }[how]
    assert any(reason in line for line in skipped), skipped


def test_a_checkpoint_changed_after_writing_is_refused_on_load(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(65536)})
    assert ckpt.verify(path) is None
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xff" * 4096  # 4 KiB of garbage written into the tensor data
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"].isnan().any()  # what used to load silently
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(path)
    with open(path, "ab") as handle:
        handle.write(b"x" * 4096)
    with pytest.raises(ckpt.CheckpointError, match="appended to: .* bytes"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(tmp_path / "nowhere.pt", require_manifest=True)


def test_metrics_log_repairs_a_partial_last_line_and_a_missing_file(tmp_path, caplog):
    from trace_core.train.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed mid-write
    log = MetricsLog(tmp_path, fresh=False)
    assert [r["step"] for r in log.rows()] == [1, 2] and path.read_text().endswith("}\n")
    assert "dropped a partial last line" in caplog.text
    path.unlink()
    MetricsLog(tmp_path, fresh=False)
    assert path.read_text() == "" and "was missing; recreated it empty" in caplog.text
