"""The trainer over 2 CPU processes (gloo), spawned from pytest the way torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR / MASTER_PORT in the environment; the Trainer creates the process group).

A 2-rank run must do what one process does with the same global batch and episode-keyed sampling streams:
the same Stage 1 counts every step, the same rewards and token counts, the same losses, and parameters within
fp32 tolerance, under DDP and under FSDP2. A 2-rank run killed after a checkpoint and resumed must equal the
uninterrupted one; resuming it with another number of processes must be refused with a clear error.
"""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from run_helpers import TOY

from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import ConfigError, load_config
from trace_core.train.distributed import teardown

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")]

WORLD = 2
STEPS = 4
# the toy run of tests/train/run_helpers.py, 4 steps; warmup_nodes=20 makes steps 3-4 predictor-informed
CONFIG = [
    *TOY,
    f"steps={STEPS}",
    "checkpoint_every=2",
    "generation.sampling_streams=episode",
    "allocation.expansion_rounds=2",  # round 2 branches from round 1's anchors: exchanged in one process's order
]
COMPARED = ("leaves", "prompts", "success_leaves", "success_bare", "effective_ratio", "generated_tokens")
CLOSE = ("loss", "tokens_packed", "tokens_leaf_paths", "predictor/loss", "grad_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: TrainConfig, *, resume: bool = False, kill_after: int | None = None, out: str | None = None) -> dict:
    """Train (or resume) `cfg` in this process; returns the Stage 1 counts of each step, the metrics rows
    and the full parameters (gathered from the shards under FSDP2). kill_after: the process dies after that
    step's metrics row (rank 0 first saves the counts and rows so far to `out`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from trace_core.train.trainer import Trainer

    counts, history = [], []
    with Trainer(cfg, resume=resume) as trainer:
        allocate = trainer._allocate_roots
        trainer._allocate_roots = lambda *a: counts.append(allocate(*a).tolist()) or np.asarray(counts[-1])

        def progress(metrics):
            history.append(metrics)
            if metrics["step"] == kill_after:
                if trainer.world.is_main:
                    torch.save({"counts": counts, "history": history}, out)
                os._exit(0)  # killed: after the step's metrics row, before anything else

        trainer.fit(progress=progress)
        model = trainer.updater.train_model
        if trainer.world.distributed:
            params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        else:
            params = {k: v.clone() for k, v in model.state_dict().items()}
    return {"counts": counts, "history": history, "params": params}


def worker(rank: int, port: int, overrides: list[str], out: str, resume: bool, kill_after: int | None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        result = run(load_config(TrainConfig, None, overrides), resume=resume, kill_after=kill_after, out=out)
        if rank == 0:
            torch.save(result, out)
    finally:
        teardown()


def spawn(tmp_path, overrides, name, *, resume=False, kill_after=None) -> dict | None:
    out = tmp_path / f"{name}.pt"
    mp.spawn(worker, args=(free_port(), overrides, str(out), resume, kill_after), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False) if out.exists() else None


def assert_same_run(got: dict, want: dict, steps=None, params: bool = True) -> None:
    rows_got = {r["step"]: r for r in got["history"]}
    rows_want = {r["step"]: r for r in want["history"]}
    for step in steps or rows_want:
        for key in COMPARED:
            assert rows_got[step][key] == rows_want[step][key], f"step {step}: {key}"
        for key in CLOSE:
            assert rows_got[step][key] == pytest.approx(rows_want[step][key], rel=1e-4, abs=1e-6), f"step {step}: {key}"
    for name, value in want["params"].items() if params else ():
        torch.testing.assert_close(got["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, the same global batch, episode streams."""
    cfg = load_config(TrainConfig, None, [*CONFIG, f"run_dir={tmp_path_factory.mktemp('one') / 'run'}"])
    return run(cfg)


def test_two_ranks_equal_one_process_under_ddp(tmp_path, one_process):
    overrides = [*CONFIG, "distributed.strategy=ddp", f"run_dir={tmp_path / 'run'}"]
    two = spawn(tmp_path, overrides, "ddp")
    assert two["counts"] == one_process["counts"]  # Stage 1 on the whole step, every step
    assert any(row["predictor_informed"] for row in two["history"])  # the predictor-informed path ran too
    assert_same_run(two, one_process)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 alone wrote, once per step
    manifest = json.loads((tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}.json").read_text())
    assert manifest["world_size"] == WORLD and "trainer.pt" in manifest["files"]


def test_fsdp2_equals_one_process_and_a_killed_run_resumes_exactly(tmp_path, one_process):
    """FSDP2 over 2 ranks, killed after step 3 (checkpoint at 2), resumed: steps 1-3 before the kill and 3-4
    after it equal one process (which the uninterrupted 2-rank run equals), and so do the final parameters;
    resuming with one process is refused, naming the world size."""
    run_dir = tmp_path / "run"
    overrides = [*CONFIG, "distributed.strategy=fsdp2", f"run_dir={run_dir}"]
    killed = spawn(tmp_path, overrides, "killed", kill_after=3)  # killed after step 3's row
    assert killed["counts"] == one_process["counts"][:3]
    assert_same_run(killed, one_process, steps=[1, 2, 3], params=False)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"

    with pytest.raises(ConfigError, match=r"written by 2 process.*this run has 1.*torchrun with 2 processes"):
        run(load_config(TrainConfig, None, overrides), resume=True)  # one process resuming a 2-rank run

    resumed = spawn(tmp_path, overrides, "resumed", resume=True)
    assert resumed["counts"] == one_process["counts"][2:]  # steps 3 and 4 again
    assert_same_run(resumed, one_process, steps=[3, 4])  # = the uninterrupted run (itself = one process)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 3's row of the killed run was cut, then rewritten

    # `trace eval` reads the sharded checkpoint whole, in one process without a process group
    from trace_core.train.trainer import Trainer

    trainer, state = Trainer.for_evaluation(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert state["step"] == STEPS
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, resumed["params"][name], rtol=0, atol=0, msg=name)

    # `trace export` of the 2-rank run: its newest sharded checkpoint, in Hugging Face format
    from transformers import AutoModelForCausalLM

    from trace_core.train.export import export

    export(run_dir, tmp_path / "hf", step=None)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    for name, value in resumed["params"].items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)
