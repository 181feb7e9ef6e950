"""Learning-rate schedule: linear warm-up, then constant, cosine or linear decay to a floor.

The rate is a pure function of the step, so resuming from a checkpoint needs no scheduler state:

    lr(s) = lr * (s + 1) / warmup                                     s < warmup
    lr(s) = lr * (r + (1 - r) * shape(t)),  t = (s - warmup) / (steps - warmup)   otherwise
    shape: constant 1, cosine (1 + cos(pi t)) / 2, linear 1 - t;  r = min_lr_ratio

s counts optimizer steps from 0 and `steps` is the run's length (TrainConfig.steps), so resuming with
a different `steps` changes the decay's horizon from that point on.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate(
    step: int, *, lr: float, steps: int, schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule: unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    t = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
