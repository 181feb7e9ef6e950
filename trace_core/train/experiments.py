"""Grids of training runs at equal settings but one: `trace compare` (allocation modes) and `trace ablate`
(the paper's Table 1 stage ablation and Table 2 budget ablation). Every run of a grid starts from one base
config file plus its variant's `key=value` overrides, so each is validated like a `trace train` run, and
all of them are built before the first one trains."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from trace_core.train.config_loader import ConfigError

STAGE_STRATEGIES = ("uniform", "active")  # Stage 1 x Stage 2: the paper's Table 1


ORACLE_SUFFIX = "+oracle"  # `trace compare --modes trace+oracle`: the mode with Monte-Carlo predictions


def split_mode(label: str) -> tuple[str, bool]:
    """ "trace+oracle" -> ("trace", True); "uniform" -> ("uniform", False)."""
    if label.endswith(ORACLE_SUFFIX):
        return label[: -len(ORACLE_SUFFIX)], True
    return label, False


def mode_variants(modes: Sequence[str]) -> dict[str, list[str]]:
    """One variant per label: a registered allocation mode, or `<mode>+oracle` for that mode with
    predictor.backend=oracle (its predictions estimated by extra rollouts outside the budget: the ceiling
    of what the allocation buys when the predictions are right)."""
    variants = {}
    for label in modes:
        mode, oracle = split_mode(label)
        variants[label] = [f"allocation.mode={mode}"] + (["predictor.backend=oracle"] if oracle else [])
    return variants


def stage_variants() -> dict[str, list[str]]:
    """Table 1: uniform | active roots x uniform | active prefixes (active/active is TRACE)."""
    return {
        f"{root}/{prefix}": [f"allocation.root_strategy={root}", f"allocation.prefix_strategy={prefix}"]
        for root in STAGE_STRATEGIES
        for prefix in STAGE_STRATEGIES
    }


PREDICTOR_BASELINE = "hidden state only"  # the predictor table's paired differences are to this row


def predictor_variants() -> dict[str, list[str]]:
    """TRACE with each predictor: the default head (policy hidden state + hashed token n-grams), the
    hidden-state-only head (predictor.ngram_buckets=0), and Monte-Carlo oracle predictions (the ceiling)."""
    trace = ["allocation.mode=trace"]
    return {
        PREDICTOR_BASELINE: trace + ["predictor.ngram_buckets=0"],
        "hidden state + n-grams": trace,
        "oracle": trace + ["predictor.backend=oracle"],
    }


def default_budgets(roots: int, continuations_per_root: int) -> list[tuple[int, int]]:
    """Table 2's shape around the configured (M, N): (M/2, N), (M/2, 3N), (M, N) -- the paper's (512, 2),
    (512, 6), (1024, 2) when (M, N) = (1024, 2)."""
    n = max(continuations_per_root, 1)
    return [(max(roots // 2, 1), n), (max(roots // 2, 1), 3 * n), (roots, n)]


def parse_budget(text: str) -> tuple[int, int]:
    """ "MxN" -> (M, N): M bare rollouts and N continuations per bare rollout per step."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", text)
    if not match or int(match.group(1)) < 1:
        raise ConfigError("--budgets", f"expected MxN with M >= 1 and N >= 0 (e.g. 16x2), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def budget_variants(budgets: Sequence[tuple[int, int]]) -> dict[str, list[str]]:
    """Table 2: (M, N) pairs with TRACE's allocation."""
    if len(set(budgets)) != len(budgets):
        raise ConfigError("--budgets", f"repeated budgets in {list(budgets)}")
    return {f"M={m} N={n}": [f"allocation.roots={m}", f"allocation.continuations_per_root={n}"] for m, n in budgets}


def run_grid(
    base_config: Path,
    variants: Mapping[str, Sequence[str]],
    seeds: Sequence[int],
    out: Path,
    train: Callable,
    *,
    jobs: int = 1,
) -> dict[str, list[list[dict]]]:
    """Train every variant with every seed; run directories out/<variant>/seed<k>. Returns the metrics
    histories per variant (one per seed, in seed order). `jobs` > 1 trains that many runs at once in
    separate processes (spawned; each run is a pure function of its config, so the results are the
    sequential ones); `train` must then be a module-level function."""
    from trace_core.train.config import TrainConfig
    from trace_core.train.config_loader import load_config

    def config(label: str, overrides: Sequence[str], seed: int):
        run_dir = out / _slug(label) / f"seed{seed}"
        return load_config(TrainConfig, base_config, [*overrides, f"seed={seed}", f"run_dir={run_dir}"])

    configs = {label: [config(label, o, seed) for seed in seeds] for label, o in variants.items()}  # fail early
    write_grid_manifest(out, variants, seeds)
    if jobs < 1:
        raise ConfigError("--jobs", f"must be >= 1, got {jobs}")
    if jobs == 1:
        runs: dict[str, list[list[dict]]] = {label: [] for label in variants}
        for label, cfgs in configs.items():
            for seed, cfg in zip(seeds, cfgs):
                print(f"== {label}, seed {seed}")
                runs[label].append(train(cfg))
        return runs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {label: [pool.submit(train, cfg) for cfg in cfgs] for label, cfgs in configs.items()}
        return {label: [f.result() for f in fs] for label, fs in futures.items()}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


GRID_MANIFEST = "grid.json"


def write_grid_manifest(out: Path, variants: Mapping[str, Sequence[str]], seeds: Sequence[int]) -> None:
    """out/grid.json: each variant's label, folder and overrides, and the seeds, so `trace report` can rebuild
    the tables from the run folders (labels like "trace+oracle" do not survive as folder names)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "seeds": list(seeds),
        "variants": [{"label": label, "folder": _slug(label), "overrides": list(o)} for label, o in variants.items()],
    }
    (out / GRID_MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_grid(out: Path, steps: int) -> tuple[dict[str, list[list[dict]]], dict[str, list[int]], list[str]]:
    """The finished runs of a grid folder: (runs[label] = one metrics history per seed, seeds[label] = those
    seeds, missing = the run folders not there or not at `steps` yet). Reads out/grid.json when present, else
    takes every sub-folder holding seed<k>/metrics.jsonl (its name as label)."""
    import json

    from trace_core.train.metrics_log import read_rows

    manifest = out / GRID_MANIFEST
    if manifest.is_file():
        grid = json.loads(manifest.read_text())
        folders = {v["label"]: out / v["folder"] for v in grid["variants"]}
        seeds = list(grid["seeds"])
    else:
        folders = {p.name: p for p in sorted(out.iterdir()) if p.is_dir() and any(p.glob("seed*/metrics.jsonl"))}
        seeds = sorted({int(p.parent.name[4:]) for f in folders.values() for p in f.glob("seed*/metrics.jsonl")})
    runs: dict[str, list[list[dict]]] = {}
    ran: dict[str, list[int]] = {}
    missing: list[str] = []
    for label, folder in folders.items():
        for seed in seeds:
            path = folder / f"seed{seed}" / "metrics.jsonl"
            rows = read_rows(path) if path.is_file() else []
            if not any(row.get("step") == steps and "effective_ratio" in row for row in rows):
                missing.append(str(path.parent))
                continue
            runs.setdefault(label, []).append(rows)
            ran.setdefault(label, []).append(seed)
    if not runs:
        raise ConfigError("report", f"{out} holds no finished run (<variant>/seed<k>/metrics.jsonl at step {steps})")
    return runs, ran, missing
