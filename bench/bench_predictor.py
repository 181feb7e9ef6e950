"""Benchmark: success-predictor variants scored on the nodes of real training runs, predict-then-learn.

1. Record: `trace train` (the default job, or `key=value` overrides) runs `--steps` steps per seed; each step
   keeps what the predictor sees: every root and internal node's inputs (policy hidden state, depth, prefix
   length, prefix tokens) with its subtree success rate and leaf count, and which nodes the step predicted
   before their outcomes (the active prompts' roots and the Stage-2 anchors).
2. Replay: each variant (`PredictorConfig` fields, `--variants` JSON) goes through the recorded steps in the
   trainer's order: predict the step's predicted nodes, score them, then learn from the step's nodes.
   Score: the Brier skill per third of training, 1 - Brier / Brier of the step's best constant, the number
   `trace compare` reports. Every variant sees the same nodes (those the default predictor's allocation
   chose in the recorded run), so this compares calibration only; what a predictor does to the allocation
   and to learning is `trace ablate --tables predictor`.

    python bench/bench_predictor.py [--seeds 0 1] [--steps 250] [--variants JSON] [--out FILE.md] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trace_core.predictor import MLPHeadPredictor, PrefixBatch, prefix_tokens, training_targets
from trace_core.predictor_config import PredictorConfig
from trace_core.train.config import TrainConfig
from trace_core.train.config_loader import load_config
from trace_core.train.report import THIRDS
from trace_core.train.trainer import Trainer

DEFAULT_VARIANTS = {
    "hidden state only (ngram_buckets=0)": {"ngram_buckets": 0},
    "hidden + unigrams (ngram_order=1)": {"ngram_order": 1},
    "hidden + uni/bigrams (default)": {},
    "hidden + up to trigrams": {"ngram_order": 3},
    "hidden + uni/bigrams, 16384 buckets": {"ngram_buckets": 16384},
    "hidden + uni/bigrams, replay 16 steps": {"replay_steps": 16},
    "hidden only, 256 wide, replay 16, 32 updates": {
        "ngram_buckets": 0,
        "hidden_dim": 256,
        "replay_steps": 16,
        "updates_per_step": 32,
    },
}


@dataclass
class RecordedStep:
    batch: PrefixBatch  # every root and internal node (what the predictor learns from), with token ids
    targets: np.ndarray  # [K] subtree success rates
    weights: np.ndarray  # [K] leaves under each node
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows predicted before outcomes


class RecordingTrainer(Trainer):
    """The trainer, keeping each step's predictor inputs and targets (`steps`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[RecordedStep] = []

    def _predictor_targets(self, forest, order=None):
        batch, targets, weights = super()._predictor_targets(forest, order)
        nodes, _, _ = training_targets(forest)
        tokens = prefix_tokens(forest, nodes)  # every variant may read them, whatever the run's own head does
        kept = PrefixBatch(depth=batch.depth, prefix_len=batch.prefix_len, hidden=batch.hidden, token_ids=tokens)
        self._recording = RecordedStep(kept, np.asarray(targets), np.asarray(weights))
        self._recorded_nodes = nodes
        return batch, targets, weights

    def _calibration(self, forest, prompts, v, counts, expansion):
        roots = [forest.root_of(i) for i in prompts.prompt_ids[counts > 0]]
        row = {int(u): k for k, u in enumerate(self._recorded_nodes)}
        self._recording.predicted = np.array([row[int(u)] for u in [*roots, *expansion.anchors]], dtype=np.int64)
        self.steps.append(self._recording)
        return super()._calibration(forest, prompts, v, counts, expansion)


def record(overrides: list[str], seed: int, steps: int, *, with_metrics: bool = False):
    """(recorded steps, the policy's hidden size[, the run's metrics rows]) of one run in a temporary folder."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            TrainConfig,
            overrides=[*overrides, f"seed={seed}", f"steps={steps}", f"run_dir={run_dir}/run", "progress=false"]
            + ["eval_every=0", "eval_at_start=false", f"checkpoint_every={steps}"],
        )
        with RecordingTrainer(cfg) as trainer:
            rows = trainer.fit()
            out = trainer.steps, trainer.model.config.hidden_size
        return (*out, rows) if with_metrics else out


def replay(steps: list[RecordedStep], predictor: MLPHeadPredictor) -> np.ndarray:
    """[S, 2] (Brier, Brier of the step's best constant) per informed step, in the trainer's order: predict
    the step's predicted nodes, score them against their subtree success rates, then learn the step."""
    scores = []
    for step in steps:
        if step.predicted.size:
            pred = predictor.predict(step.batch.select(torch.as_tensor(step.predicted)))
            t, w = step.targets[step.predicted], step.weights[step.predicted]
            constant = (w * t).sum() / w.sum()
            scores.append(((w * (pred - t) ** 2).sum() / w.sum(), (w * (constant - t) ** 2).sum() / w.sum()))
        predictor.observe(step.batch, step.targets, step.weights)
    return np.array(scores)


def brier_skill_by_third(scores: np.ndarray) -> list[float]:
    """1 - mean Brier / mean Brier of the constant over each third of the steps (trace compare's number)."""
    return [float(1 - part[:, 0].mean() / part[:, 1].mean()) for part in np.array_split(scores, THIRDS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--variants", type=json.loads, default=DEFAULT_VARIANTS, help="JSON: label -> fields")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", help="trace train key=value settings of the recorded runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = load_config(TrainConfig, overrides=args.overrides).predictor
    runs = {}
    for seed in args.seeds:
        start = time.perf_counter()
        runs[seed] = record(args.overrides, seed, args.steps)
        print(f"recorded seed {seed}: {len(runs[seed][0])} informed steps in {time.perf_counter() - start:.0f} s")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        (
            f"Predictor variants, Brier skill per third of training (first / middle / last) on the recorded runs' "
            f"predicted nodes; seeds {args.seeds}, {args.steps} steps, overrides {args.overrides or 'none'}; "
            f"{platform.machine()} CPU, torch {torch.__version__}, commit {commit}."
        ),
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
        "|---|" + "---|" * len(args.seeds),
    ]
    for label, fields in args.variants.items():
        cells = []
        for seed in args.seeds:
            steps, hidden_size = runs[seed]
            config = PredictorConfig(**{**base.__dict__, **fields})
            thirds = brier_skill_by_third(replay(steps, MLPHeadPredictor(hidden_size, config)))
            cells.append(" / ".join(f"{x:+.2f}" for x in thirds))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
