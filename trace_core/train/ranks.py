"""Which process of a (torchrun) job this is, for the things only one process may do (write the run directory,
log to Weights & Biases). One process without torch.distributed is rank 0."""

from __future__ import annotations

import os


def rank() -> int:
    """The global rank: torch.distributed's when a process group is up, else $RANK (torchrun sets it before the
    group exists), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the process that writes the run directory and the metrics."""
    return rank() == 0
