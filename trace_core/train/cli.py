"""The `trace` command line.

trace train [--config FILE] [--overwrite] [key=value ...]
    a new run (default: the embedded CPU job) in run_dir; without run_dir a fresh runs/<mode>-<date>-<time>
    (runs/latest points at it). A run_dir that holds anything is refused unless --overwrite (which deletes
    the run's own files in it: config.yaml, metrics.jsonl, metrics.png, checkpoints/, tensorboard/, wandb/).
trace train --resume run_dir=DIR [key=value ...]
    continue the run in DIR from its newest intact checkpoint, with its saved config.yaml; only steps,
    eval_every, eval_tasks, checkpoint_every, progress, cpu_threads and logging.* may change.
trace compare [--config FILE] [--seeds 0-5] [--modes uniform random_tree trace trace+oracle] [--jobs N] [--out DIR]
              [key=value ...]
    every mode with every seed at the same budget (`<mode>+oracle`: Monte-Carlo predictions, outside the
    budget); comparison.md (means, 95% intervals, paired differences to uniform, predictor calibration),
    comparison.json, comparison_paired.json, comparison.png under --out.
trace report DIR [--name comparison] [--baseline uniform]
    rebuild those files from the runs in a compare/ablate folder (it only reads the runs).
trace ablate [--config FILE] [--seeds 0 1 2] [--tables stages budgets predictor] [--budgets 16x1 16x3 32x1] [--out DIR]
    the paper's ablations at this config's scale: Stage 1 uniform|active x Stage 2 uniform|active, and (M, N)
    budgets with TRACE, and (--tables predictor) TRACE with and without the n-gram features and with the
    oracle; ablation_stages.md / ablation_budgets.md / ablation_predictor.md (+ .json, .png) under --out.
trace retriever serve --corpus FILE.jsonl [--host H] [--port P] [--topk K]
    a BM25 index (bm25s) served over Search-R1's /retrieve protocol (envs/search_qa/server.py)
trace eval RUN_DIR_OR_CHECKPOINT [--tasks N] [--write]
    held-out success of exactly that checkpoint (a run directory: its newest intact one); reads only,
    unless --write (appends the result to the run's metrics.jsonl).
trace export RUN_DIR OUT_DIR [--step N] [--merge-lora] [--dtype auto|float32|bfloat16|float16] [--overwrite]
    the run's policy (newest intact checkpoint, or step N) in Hugging Face format (save_pretrained + tokenizer)
    for AutoModelForCausalLM and vLLM; a LoRA run writes its adapters, or with --merge-lora the merged model.
    OUT_DIR must be empty or new (--overwrite replaces an earlier export); the run directory is only read.

Heavy modules (torch, transformers, the trainer) are imported only by the command that needs them, so
`trace --help` and config errors come back at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from trace_core.errors import TraceError

SHOWN = ("success_bare", "effective_ratio", "loss", "eval/success", "eval/success_greedy", "predictor/brier")
BUILT_IN_MODES = "trace, uniform, random_tree, pcl"  # trace_core.train.config.ALLOCATION_MODES
log = logging.getLogger("trace_core.train.cli")


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def update(metrics: dict) -> None:
        bar.update(1)
        bar.set_postfix(
            {k.replace("eval/success", "eval").split("/")[-1]: f"{metrics[k]:.3f}" for k in SHOWN if k in metrics}
        )

    return bar, update


def train(cfg, *, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Train (or resume) one run. Under torchrun every process runs this; rank 0 alone prints (and writes)."""
    from trace_core.train.trainer import Trainer

    try:
        with Trainer(cfg, resume=resume, overwrite=overwrite) as trainer:
            main = trainer.world.is_main
            if main:
                where = f"{trainer.run_dir}  (config.yaml, metrics.jsonl, checkpoints/)"
                ranks = f", {trainer.world.size} processes" if trainer.world.distributed else ""
                print(f"run directory: {where}{ranks}")
                if trainer.step >= trainer.cfg.steps:
                    print(
                        f"the run is at step {trainer.step} of {trainer.cfg.steps}: nothing to do (raise steps= to go on)"
                    )
            bar, update = _progress_bar(trainer.cfg.steps, trainer.step, trainer.cfg.progress and main)
            with bar:
                history = trainer.fit(progress=update)
    finally:
        _leave_process_group()
    if history and main:
        last = history[-1]
        print("final: " + ", ".join(f"{k}={last[k]:.3f}" for k in SHOWN if k in last))
    return history


def _leave_process_group() -> None:
    """Under torchrun: leave the process group the trainer created (a clean exit, no warning)."""
    from trace_core.train.distributed import teardown

    teardown()


def check_seeds_and_modes(seeds: list[int], modes: list[str]) -> None:
    """`trace compare`'s --seeds / --modes: each seed and mode once, seeds in [0, 2**32 - 1], modes registered."""
    from trace_core.allocation import available_modes
    from trace_core.train.config import SEED_MAX
    from trace_core.train.config_loader import ConfigError

    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise ConfigError("--seeds", f"{', '.join(map(str, bad))}: seeds must be in [0, 2**32 - 1]")
    for flag, values in (("--seeds", seeds), ("--modes", modes)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(
                flag,
                f"{', '.join(repeated)} given more than once; each is one run, and a repeat would be averaged as another",
            )
    from trace_core.train.experiments import split_mode

    unknown = [mode for mode in modes if split_mode(mode)[0] not in available_modes()]  # before the first run
    if unknown:
        raise ConfigError(
            "--modes",
            f"{', '.join(map(repr, unknown))} not registered; registered modes: {', '.join(available_modes())} "
            "(each may end in +oracle: the mode with predictor.backend=oracle)",
        )


def compare(cfg, seeds: list[int], modes: list[str], out: Path, *, jobs: int = 1) -> dict:
    """Train every mode with every seed at the same budget; write a table and a plot under `out`."""
    from trace_core.train.experiments import mode_variants, run_grid
    from trace_core.train.report import write_comparison

    check_seeds_and_modes(seeds, modes)
    runs = run_grid(out / "base_config.yaml", mode_variants(modes), seeds, out, train, jobs=jobs)
    return write_comparison(runs, cfg, out)


def ablate(
    cfg, seeds: list[int], tables: list[str], budgets: list[tuple[int, int]] | None, out: Path, *, jobs: int = 1
) -> dict:
    """The paper's ablations at this config's scale: `stages` (Table 1: Stage 1 uniform|active x Stage 2
    uniform|active) and `budgets` (Table 2: (M, N) pairs with TRACE); ours: `predictor` (TRACE with the
    hidden-state-only head, the default head with n-grams, and oracle predictions); a table and a plot each."""
    from trace_core.train.experiments import (
        PREDICTOR_BASELINE,
        budget_variants,
        default_budgets,
        predictor_variants,
        run_grid,
        stage_variants,
    )
    from trace_core.train.report import write_comparison

    a = cfg.allocation
    budgets = budgets or default_budgets(a.roots, a.continuations_per_root)
    grids = {"stages": stage_variants(), "budgets": budget_variants(budgets), "predictor": predictor_variants()}
    labels = {"stages": "root/prefix", "budgets": "budget", "predictor": "TRACE's predictor"}
    result = {}
    for table in tables:
        runs = run_grid(out / "base_config.yaml", grids[table], seeds, out / table, train, jobs=jobs)
        result[table] = write_comparison(
            runs,
            cfg,
            out,
            name=f"ablation_{table}",
            label=labels[table],
            budget="Budget: (M, N) as in each row, M x (1 + N) leaves per step" if table == "budgets" else None,
            baseline={"stages": "uniform/uniform", "predictor": PREDICTOR_BASELINE}.get(table),
        )
    return result


def report(folder: Path, *, name: str = "comparison", baseline: str = "uniform") -> dict:
    """Rebuild the table and plot of a grid folder from its runs (`trace report`)."""
    from trace_core.train.config import TrainConfig
    from trace_core.train.config_loader import ConfigError, load_config
    from trace_core.train.experiments import load_grid
    from trace_core.train.report import write_comparison

    if not folder.is_dir():
        raise ConfigError("report", f"{folder} is not a folder")
    base = next((p for p in (folder / "base_config.yaml", folder.parent / "base_config.yaml") if p.is_file()), None)
    if base is None:
        raise ConfigError("report", f"no base_config.yaml in {folder} or its parent: is it a compare/ablate folder?")
    cfg = load_config(TrainConfig, base, [])
    runs, seeds, missing = load_grid(folder, cfg.steps)
    if missing:
        print(f"not finished (left out): {', '.join(missing)}")
    return write_comparison(runs, cfg, folder, name=name, baseline=baseline, seeds=seeds)


def evaluate(target: Path, tasks: int | None, *, write: bool = False) -> dict:
    """Held-out success of exactly the checkpoint `target` names (a file anywhere, or a run directory's newest
    intact checkpoint). Reads only; `write` appends the result as a row of the run's metrics.jsonl."""
    from trace_core.train import checkpoint as ckpt
    from trace_core.train import dist_checkpoint
    from trace_core.train import run_dir as runs
    from trace_core.train.config_loader import ConfigError
    from trace_core.train.trainer import Trainer

    run_dir: Path | None
    if dist_checkpoint.is_checkpoint_dir(target):  # one sharded checkpoint of a multi-process run
        path, run_dir = target, target.parent.parent
    elif target.is_dir():
        path, _, skipped = ckpt.resumable_checkpoint(target)
        if path is None:  # a multi-process run: its newest intact sharded checkpoint
            path, _, skipped = dist_checkpoint.resumable(target)
        if path is None:
            detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            raise ConfigError("eval", f"{target} has no intact checkpoint to evaluate{detail}")
        if skipped:
            log.warning("eval: skipped %s; evaluating %s", "; ".join(skipped), path.name)
        run_dir = target
    elif target.is_file():
        path = target
        if ckpt.verify(path, require_manifest=False) is None and not ckpt.manifest_path(path).is_file():
            log.warning("eval: %s has no manifest beside it, so its checksum cannot be verified", path)
        in_run = path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file()
        run_dir = path.parent.parent if in_run else None
    else:
        raise ConfigError("eval", f"{target} is neither a checkpoint file nor a run directory")
    if write and run_dir is None:
        raise ConfigError(
            "--write", f"{target} is not inside a run directory, so there is no metrics.jsonl to write to"
        )
    lock = runs.acquire(run_dir) if write and run_dir is not None else None  # not while a trainer writes there
    try:
        trainer, _ = Trainer.for_evaluation(path)
        if tasks is not None and tasks > len(trainer.eval_tasks):
            raise ConfigError("--tasks", f"{tasks} tasks asked for, but the eval split has {len(trainer.eval_tasks)}")
        result = trainer.evaluate(tasks)
        print(json.dumps({"checkpoint": str(path), "step": trainer.step, **result}))
        if lock is not None and run_dir is not None:
            row = {
                "step": trainer.step,
                "leaves_sampled": trainer.leaves_sampled,
                **result,
                "eval/checkpoint": path.name,
                "eval/source": "trace eval",
            }
            metrics = run_dir / "metrics.jsonl"
            prefix = "\n" if metrics.is_file() and metrics.read_bytes()[-1:] not in (b"", b"\n") else ""
            with open(metrics, "a") as handle:
                handle.write(prefix + json.dumps(row) + "\n")
    finally:
        if lock is not None:
            lock.release()
    return result


def _seeds(texts: list[str]) -> list[int]:
    """--seeds values as integers (key=value items that followed them were handed back to the overrides)."""
    from trace_core.train.config_loader import ConfigError

    seeds = []
    for text in texts:
        span = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)  # "0-5": seeds 0 to 5 inclusive
        try:
            low, high = (int(span.group(1)), int(span.group(2))) if span else (int(text), int(text))
        except ValueError:
            raise ConfigError("--seeds", f"expected integers or ranges like 0-5, got {text!r}") from None
        if high < low:
            raise ConfigError("--seeds", f"range {text!r} is empty (its end is below its start)")
        seeds.extend(range(low, high + 1))
    if not seeds:
        raise ConfigError("--seeds", "give at least one seed")
    return seeds


def _grid_folder(out: Path | None, command: str) -> Path:
    """--out (empty or new), or a fresh runs/<command>-<date>-<time>."""
    from trace_core.train.config_loader import ConfigError
    from trace_core.train.run_dir import contents, default_run_dir

    if out is None:
        out = default_run_dir(command, link_latest=False)
    elif contents(out):
        raise ConfigError("--out", f"{out} already holds files; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{command} folder: {out}")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _jobs(text: str) -> int:
    """--jobs: a positive integer, or "auto" for the CPU cores available to this process."""
    if text == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _positive_int(text)


def _grid_parser(sub, command: str, help_text: str) -> argparse.ArgumentParser:
    """A grid command (compare, ablate): a base config, seeds, an output folder, parallel runs, overrides."""
    parser = sub.add_parser(command, help=help_text)
    parser.add_argument("--config", type=Path)
    parser.add_argument(
        "--seeds", nargs="+", default=["0", "1", "2"], help="distinct seeds >= 0, or ranges: 0-5 is 0 1 2 3 4 5"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"an empty or new folder (default: a fresh runs/{command}-<date>-<time>)"
    )
    parser.add_argument(
        "--jobs",
        type=_jobs,
        default=1,
        help="runs trained at once, each in its own process; 'auto' = the cores this process may use "
        "(results equal --jobs 1)",
    )
    parser.add_argument("overrides", nargs="*")
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trace", description="TRACE: tree rollout allocation for agent RL")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train",
        help="train a policy (default: the embedded grid world, tiny model, CPU)",
        description="A new run in run_dir (default: a fresh runs/<mode>-<YYYYmmdd-HHMMSS>; runs/latest points at "
        "it), or --resume run_dir=DIR to continue one.",
    )
    p_train.add_argument("--config", type=Path, help="YAML config file")
    p_train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run named by run_dir=DIR from its newest intact checkpoint, with the run's own "
        "config.yaml; only steps, eval_every, eval_tasks, checkpoint_every, progress, cpu_threads, logging.* may change",
    )
    p_train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run_dir that holds a run: deletes its config.yaml, metrics.jsonl, metrics.png, "
        "checkpoints/, tensorboard/ and wandb/ (nothing else; a directory with other files is refused)",
    )
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 allocation.mode=uniform")
    p_cmp = _grid_parser(sub, "compare", "TRACE vs baselines at equal budget over several seeds")
    p_cmp.add_argument(
        "--modes",
        nargs="+",
        default=["trace", "uniform", "random_tree"],
        help=f"distinct registered allocation modes (built in: {BUILT_IN_MODES}; plugins add more); <mode>+oracle "
        "runs the mode with Monte-Carlo predictions (predictor.backend=oracle, outside the budget)",
    )
    p_abl = _grid_parser(
        sub, "ablate", "the paper's ablations: Stage 1 x Stage 2 strategies (stages) and (M, N) budgets (budgets)"
    )
    p_abl.add_argument(
        "--tables",
        nargs="+",
        choices=["stages", "budgets", "predictor"],
        default=["stages", "budgets"],
        help="which ablations (predictor: TRACE's head with and without n-grams, and the oracle; not run by default)",
    )
    p_abl.add_argument(
        "--budgets",
        nargs="+",
        default=None,
        help="MxN pairs for the budget ablation (default: (M/2, N), (M/2, 3N), (M, N) of the config)",
    )
    p_rep = sub.add_parser(
        "report",
        help="rebuild a compare/ablate folder's table, statistics and plot from its runs' metrics.jsonl",
        description="Reads DIR/<variant>/seed<k>/metrics.jsonl (labels from DIR/grid.json when present) and "
        "rewrites DIR/<name>.md, .json, .png and <name>_paired.json; the runs themselves are only read. Runs not "
        "at the config's last step (still training, or stopped) are left out and named; differences pair by seed.",
    )
    p_rep.add_argument("folder", type=Path)
    p_rep.add_argument("--name", default="comparison", help="file name stem of the table and plot")
    p_rep.add_argument("--baseline", default="uniform", help="the variant the paired differences are taken against")
    p_ret = sub.add_parser(
        "retriever",
        help="serve a BM25 index over Search-R1's /retrieve protocol: trace retriever serve --corpus FILE",
    )
    p_ret.add_argument("action", choices=["serve"])
    p_ret.add_argument("rest", nargs=argparse.REMAINDER, help="--corpus FILE [--host H] [--port P] [--topk K]")
    p_eval = sub.add_parser("eval", help="success rate of a checkpoint on the held-out split (reads only)")
    p_eval.add_argument(
        "checkpoint", type=Path, help="a checkpoint file (anywhere) or a run directory (its newest intact checkpoint)"
    )
    p_eval.add_argument(
        "--tasks", type=_positive_int, default=None, help="number of held-out tasks (default: the run's eval_tasks)"
    )
    p_eval.add_argument(
        "--write",
        action="store_true",
        help="also append the result to the run's metrics.jsonl (default: write nothing)",
    )
    p_exp = sub.add_parser(
        "export",
        help="write a run's policy in Hugging Face format (AutoModelForCausalLM, vLLM); reads the run only",
    )
    p_exp.add_argument("run_dir", type=Path, help="a run directory")
    p_exp.add_argument("out_dir", type=Path, help="an empty or new folder")
    p_exp.add_argument(
        "--step", type=int, default=None, help="the checkpoint of this step (default: the newest intact)"
    )
    p_exp.add_argument(
        "--merge-lora", action="store_true", help="a LoRA run: merge the adapters into the weights (default: adapters)"
    )
    p_exp.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the saved weights (auto: the run's model.dtype)",
    )
    p_exp.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "retriever":
            from trace_core.envs.search_qa.server import main as serve

            return serve(args.rest)
        if args.command == "train":
            from trace_core.train.config import TrainConfig, resume_config
            from trace_core.train.config_loader import load_config, to_dict
            from trace_core.train.run_dir import check_new

            if args.resume:
                cfg = resume_config(args.config, args.overrides)
            else:
                cfg = load_config(TrainConfig, args.config, args.overrides)
                if cfg.run_dir is not None:
                    check_new(cfg.run_dir, overwrite=args.overwrite)  # at once, before the model is built
            if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 prints
                print("config:\n  " + json.dumps(to_dict(cfg), indent=None))
            train(cfg, resume=args.resume, overwrite=args.overwrite)
        elif args.command in ("compare", "ablate"):
            from trace_core.train.config import TrainConfig
            from trace_core.train.config_loader import ConfigError, load_config, save_config
            from trace_core.train.experiments import parse_budget

            nargs = [args.seeds, getattr(args, "modes", None) or [], getattr(args, "budgets", None) or []]
            overrides = [a for values in nargs for a in values if "=" in a] + list(args.overrides)
            seeds = _seeds([a for a in args.seeds if "=" not in a])
            cfg = load_config(TrainConfig, args.config, overrides)
            if args.command == "compare":
                modes = [a for a in args.modes if "=" not in a]
                if not modes:
                    raise ConfigError("--modes", "give at least one mode")
                check_seeds_and_modes(seeds, modes)
            else:
                check_seeds_and_modes(seeds, ["trace"])
                budgets = [parse_budget(a) for a in args.budgets or [] if "=" not in a] or None
            out = _grid_folder(args.out, args.command)
            save_config(cfg, out / "base_config.yaml")
            if args.command == "compare":
                compare(cfg, seeds, modes, out, jobs=args.jobs)
            else:
                ablate(cfg, seeds, args.tables, budgets, out, jobs=args.jobs)
        elif args.command == "report":
            report(args.folder, name=args.name, baseline=args.baseline)
        elif args.command == "export":
            from trace_core.train.export import export

            record = export(
                args.run_dir,
                args.out_dir,
                step=args.step,
                merge_lora=args.merge_lora,
                overwrite=args.overwrite,
                dtype=args.dtype,
            )
            print(f"exported step {record['step']} ({record['content']}) of {args.run_dir} to {args.out_dir}")
        else:
            evaluate(args.checkpoint, args.tasks, write=args.write)
    except TraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
