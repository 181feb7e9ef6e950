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


def mode_variants(modes: Sequence[str]) -> dict[str, list[str]]:
    return {mode: [f"allocation.mode={mode}"] for mode in modes}


def stage_variants() -> dict[str, list[str]]:
    """Table 1: uniform | active roots x uniform | active prefixes (active/active is TRACE)."""
    return {
        f"{root}/{prefix}": [f"allocation.root_strategy={root}", f"allocation.prefix_strategy={prefix}"]
        for root in STAGE_STRATEGIES
        for prefix in STAGE_STRATEGIES
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
