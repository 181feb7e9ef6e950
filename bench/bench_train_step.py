"""Benchmark: a full TRACE step (prefill, predict, Stage 1, rollout, Stage 2 expand, policy and predictor
update) at 1 and at N processes on the same global batch, and the policy update alone, packed vs per-leaf.

1. For each process count, the trainer runs `--steps` steps after one warm-up step, every process a rank of a
   torch.distributed group (gloo on CPU, NCCL on CUDA; started here with torch.multiprocessing, as torchrun
   would). All runs use episode sampling streams, so every process count samples the same episodes: the bench
   first checks that the runs agree (leaves, generated tokens, rewards per step) and then reports tokens
   generated per second of generation (prefill + rollout + expand, the slowest rank), tokens trained per second
   of update (packed tokens / train phase time, the slowest rank), the step's wall time and the peak memory of
   each rank (CUDA: max allocated; CPU: the process's peak RSS, which includes torch itself).
2. On one step's forest (one process), the policy update alone: packed (each shared prefix once) vs per-leaf
   (every leaf path its own tree, what a flat trainer runs), checked equal (loss) first; the speed-up is set
   against the forest's token dedup ratio (leaf-path tokens / packed tokens).

    python bench/bench_train_step.py [--procs 1 2] [--steps 5] [--repeats 5] [key=value ...]

Overrides are `trace train` keys (default: the default job, `trace train`'s config).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from trace_core.advantage import compute_advantages
from trace_core.forest import ROLE_MODEL, RolloutForest
from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import load_config
from trace_core.train.distributed import teardown

FIXED = ["generation.sampling_streams=episode", "progress=false", "eval_at_start=false", "eval_every=0"]
AGREE = ("leaves", "generated_tokens", "success_leaves", "success_bare", "prompts")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def worker(rank: int, procs: int, port: int, overrides: list[str], steps: int, run_dir: str, out: str) -> None:
    """One rank: the trainer for 1 + steps steps; rank 0 saves the timed steps' metrics and every rank's peak."""
    from trace_core.train.trainer import Trainer

    if procs > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(procs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    try:
        cfg = load_config(TrainConfig, None, [*overrides, *FIXED, f"steps={steps + 1}", f"run_dir={run_dir}"])
        with Trainer(cfg) as trainer:
            rows = []
            for _ in range(steps + 1):
                start = time.perf_counter()
                metrics = trainer.train_step()
                rows.append({**metrics, "wall": time.perf_counter() - start})
            peaks = trainer.world.all_gather(_peak_memory(trainer.policy.device))
        if rank == 0:
            torch.save({"rows": rows[1:], "peaks": peaks, "device": str(trainer.policy.device)}, out)
    finally:
        teardown()


def run_procs(procs: int, overrides: list[str], steps: int, folder: Path) -> dict:
    out = folder / f"procs{procs}.pt"
    args = (procs, _free_port(), overrides, steps, str(folder / f"run{procs}"), str(out))
    mp.spawn(worker, args=args, nprocs=procs, join=True)
    return torch.load(out, weights_only=False)


def per_leaf_forest(forest: RolloutForest) -> tuple[RolloutForest, np.ndarray]:
    """Every leaf path of `forest` as its own tree (nothing shared), and [n'] the original node of each node."""
    flat, origin = RolloutForest(vocab_size=forest.vocab_size), []
    for i, leaf in enumerate(forest.leaves):
        path = forest.leaf_path(leaf)
        node = flat.add_root(i, forest.node_tokens(path[0]))
        origin.append(path[0])
        for u in path[1:]:
            span = slice(forest.tok_start[u], forest.tok_end[u])
            node = flat.add_node(node, forest.tokens[span], forest.role[span] == ROLE_MODEL, forest.logprob[span])
            origin.append(u)
        flat.set_reward(node, float(forest.reward[leaf]))
    return flat, np.asarray(origin, dtype=np.int64)


def update_packed_vs_per_leaf(overrides: list[str], repeats: int, folder: Path) -> dict:
    """One step of the trainer (one process), then its policy update alone on the packed and on the per-leaf
    forest: checked equal, then timed (median of `repeats`, alternating, weights restored before each)."""
    from trace_core.train.trainer import Trainer

    cfg = load_config(TrainConfig, None, [*overrides, *FIXED, "steps=2", f"run_dir={folder / 'update'}"])
    with Trainer(cfg) as trainer:
        captured = []
        original = trainer._update_policy
        trainer._update_policy = lambda forest: captured.append(forest) or original(forest)
        trainer.train_step()
        forest = captured[-1]
        updater = trainer.updater
        advantages, kind = compute_advantages(forest, cfg.optim.advantage)
        flat, origin = per_leaf_forest(forest)
        saved = (copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(updater.optimizer.state_dict()))

        def once(which: RolloutForest, adv: np.ndarray) -> tuple[float, dict]:
            trainer.model.load_state_dict(saved[0])
            updater.optimizer.load_state_dict(saved[1])
            start = time.perf_counter()
            metrics = updater.update(which, adv, kind, cfg.optim.lr)
            return time.perf_counter() - start, metrics

        _, packed_metrics = once(forest, advantages)
        _, leaf_metrics = once(flat, advantages[origin])
        assert abs(packed_metrics["loss"] - leaf_metrics["loss"]) <= 1e-5 * max(1.0, abs(leaf_metrics["loss"])), (
            f"packed loss {packed_metrics['loss']} != per-leaf loss {leaf_metrics['loss']}"
        )
        times: dict[str, list[float]] = {"packed": [], "per_leaf": []}
        for _ in range(repeats):
            times["packed"].append(once(forest, advantages)[0])
            times["per_leaf"].append(once(flat, advantages[origin])[0])
    return {
        "tokens_packed": packed_metrics["tokens_packed"],
        "tokens_leaf_paths": packed_metrics["tokens_leaf_paths"],
        "dedup": packed_metrics["dedup_ratio"],
        "loss": packed_metrics["loss"],
        "packed_s": statistics.median(times["packed"]),
        "per_leaf_s": statistics.median(times["per_leaf"]),
        "leaves": int(forest.leaves.size),
    }


def summarize(procs: int, result: dict) -> dict:
    rows = result["rows"]
    gen_time = sum(r.get("time/rollout", 0) + r.get("time/predict", 0) + r.get("time/expand", 0) for r in rows)
    return {
        "procs": procs,
        "generated": sum(r["generated_tokens"] for r in rows),
        "gen_tok_s": sum(r["generated_tokens"] for r in rows) / gen_time,
        "train_tok_s": sum(r["tokens_packed"] for r in rows) / sum(r["time/train"] for r in rows),
        "wall": statistics.mean(r["wall"] for r in rows),
        "peaks": result["peaks"],
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=5, help="timings of the update alone (median)")
    parser.add_argument("overrides", nargs="*", help="trace train key=value overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {p: run_procs(p, args.overrides, args.steps, folder) for p in args.procs}
        reference = results[args.procs[0]]["rows"]
        for procs, result in results.items():  # the same global batch: the same episodes at every process count
            for a, b in zip(reference, result["rows"]):
                for key in AGREE:
                    assert a[key] == b[key], (
                        f"{procs} processes differ from {args.procs[0]} on {key}: {b[key]} != {a[key]}"
                    )
        update = update_packed_vs_per_leaf(args.overrides, args.repeats, folder)
    device = results[args.procs[0]]["device"]
    print(
        f"device: {device} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"commit {_commit()}; overrides: {' '.join(args.overrides) or '(default job)'}"
    )
    print(f"full step, {args.steps} timed steps after 1 warm-up, same global batch (checked: {', '.join(AGREE)} equal)")
    print("  procs  generated tok/s  trained tok/s  step wall [s]  peak memory per rank [MiB]")
    for procs in args.procs:
        s = summarize(procs, results[procs])
        peaks = ", ".join(f"{p / 2**20:.0f}" for p in s["peaks"])
        print(f"  {procs:5d}  {s['gen_tok_s']:15.1f}  {s['train_tok_s']:13.1f}  {s['wall']:13.3f}  {peaks}")
    speedup = update["per_leaf_s"] / update["packed_s"]
    print(
        f"policy update alone, one step's forest ({update['leaves']} leaves): packed {update['tokens_packed']} "
        f"tokens vs per-leaf {update['tokens_leaf_paths']} (dedup {update['dedup']:.2f}x); loss checked equal"
    )
    print(
        f"  packed {update['packed_s'] * 1e3:.1f} ms, per-leaf {update['per_leaf_s'] * 1e3:.1f} ms (median of "
        f"{args.repeats}): speed-up {speedup:.2f}x = {speedup / update['dedup']:.2f} x the dedup ratio "
        f"(target >= 0.8)"
    )


if __name__ == "__main__":
    main()
