"""The predictor's config section (trace_core.predictor), in a module without torch: building and
checking a TrainConfig must not import torch (config errors and `trace --help` come back fast)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PredictorConfig:
    hidden_dim: int = 256  # MLP width
    lr: float = 1e-3
    weight_decay: float = 0.0
    updates_per_step: int = 16  # minibatch steps over the replay buffer after each training step
    batch_size: int = 256
    replay_steps: int = 8  # nodes of this many recent steps are replayed
    warmup_nodes: int = 256  # cold start: the trainer allocates uniformly until this many nodes were seen
    seed: int = 0

    def __post_init__(self):
        for name in ("hidden_dim", "updates_per_step", "batch_size", "replay_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"predictor.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"predictor.lr: must be > 0, got {self.lr}")
        if self.warmup_nodes < 0:
            raise ValueError(f"predictor.warmup_nodes: must be >= 0, got {self.warmup_nodes}")


__all__ = ["PredictorConfig"]
