"""The `trace` command line.

trace train [--config FILE] [--resume] [key=value ...]    train (default: the embedded CPU job)
trace compare [--config FILE] [--seeds 0 1 2] [--modes trace uniform random_tree] [--out DIR] [key=value ...]
trace eval RUN_DIR_OR_CHECKPOINT [--tasks N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trace_core.train.config import ALLOCATION_MODES, TrainConfig
from trace_core.train.config_loader import ConfigError, from_dict, load_config, save_config, to_dict

SHOWN = ("success_bare", "effective_ratio", "loss", "eval/success", "eval/success_greedy", "predictor/brier")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def update(metrics: dict) -> None:
        bar.update(1)
        bar.set_postfix(
            {k.replace("eval/success", "eval").split("/")[-1]: f"{metrics[k]:.3f}" for k in SHOWN if k in metrics}
        )

    return bar, update


def train(cfg: TrainConfig, *, resume: bool = False) -> list[dict]:
    from trace_core.train.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    print(f"run directory: {trainer.run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
    bar, update = _progress_bar(cfg.steps, trainer.step, cfg.progress)
    with bar:
        history = trainer.fit(progress=update)
    if history:
        last = history[-1]
        print("final: " + ", ".join(f"{k}={last[k]:.3f}" for k in SHOWN if k in last))
    return history


def compare(cfg: TrainConfig, seeds: list[int], modes: list[str], out: Path) -> dict:
    """Train every mode with every seed at the same budget; write a table and a plot under `out`."""
    from trace_core.allocation import available_modes
    from trace_core.train.report import write_comparison

    unknown = [mode for mode in modes if mode not in available_modes()]  # before the first run, not after it
    if unknown:
        raise ConfigError(
            "--modes",
            f"{', '.join(map(repr, unknown))} not registered; registered modes: {', '.join(available_modes())}",
        )
    runs: dict[str, list[list[dict]]] = {mode: [] for mode in modes}
    for mode in modes:
        for seed in seeds:
            run_cfg = from_dict(
                TrainConfig,
                {
                    **to_dict(cfg),
                    "seed": seed,
                    "run_dir": str(out / mode / f"seed{seed}"),
                    "allocation": {**to_dict(cfg.allocation), "mode": mode},
                },
            )
            print(f"== {mode}, seed {seed}")
            runs[mode].append(train(run_cfg))
    return write_comparison(runs, cfg, out)


def evaluate(target: Path, tasks: int | None) -> dict:
    from trace_core.train import checkpoint as ckpt
    from trace_core.train.trainer import Trainer

    path = ckpt.latest_checkpoint(target) if target.is_dir() else target
    if path is None or not path.is_file():
        raise ConfigError("eval", f"{target} is neither a checkpoint file nor a run directory with checkpoints")
    state = ckpt.load_checkpoint(path)
    cfg = from_dict(TrainConfig, {**state["config"], "run_dir": str(path.parent.parent)})
    trainer = Trainer(cfg, resume=True)
    result = trainer.evaluate(tasks)
    print(json.dumps({"checkpoint": str(path), "step": trainer.step, **result}))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trace", description="TRACE: tree rollout allocation for agent RL")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a policy (default: the embedded grid world, tiny model, CPU)")
    p_train.add_argument("--config", type=Path, help="YAML config file")
    p_train.add_argument("--resume", action="store_true", help="continue the run in run_dir from its latest checkpoint")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 allocation.mode=uniform")
    p_cmp = sub.add_parser("compare", help="TRACE vs baselines at equal budget over several seeds")
    p_cmp.add_argument("--config", type=Path)
    p_cmp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p_cmp.add_argument(
        "--modes",
        nargs="+",
        default=["trace", "uniform", "random_tree"],
        help=f"registered allocation modes (built in: {', '.join(ALLOCATION_MODES)}; plugins add more)",
    )
    p_cmp.add_argument("--out", type=Path, default=Path("runs/compare"))
    p_cmp.add_argument("overrides", nargs="*")
    p_eval = sub.add_parser("eval", help="success rate of a checkpoint on the held-out split")
    p_eval.add_argument("checkpoint", type=Path, help="a checkpoint file or a run directory")
    p_eval.add_argument(
        "--tasks", type=int, default=None, help="number of held-out tasks (default: the run's eval_tasks)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            cfg = load_config(TrainConfig, args.config, args.overrides)
            print("config:\n  " + json.dumps(to_dict(cfg), indent=None))
            train(cfg, resume=args.resume)
        elif args.command == "compare":
            cfg = load_config(TrainConfig, args.config, args.overrides)
            args.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, args.out / "base_config.yaml")
            compare(cfg, args.seeds, args.modes, args.out)
        else:
            evaluate(args.checkpoint, args.tasks)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
