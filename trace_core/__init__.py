"""trace_core: rollout trees, packing, allocation, advantages and the TRACE trainer."""

from trace_core.forest import ROLE_MODEL, ROLE_OBSERVATION, ForestError, LeafSequence, RolloutForest, Trajectory
from trace_core.packing.forest import PackedTree, pack, split_by_tokens, unpack

__version__ = "0.1.0"

__all__ = [
    "ROLE_MODEL",
    "ROLE_OBSERVATION",
    "ForestError",
    "LeafSequence",
    "PackedTree",
    "RolloutForest",
    "Trajectory",
    "pack",
    "split_by_tokens",
    "unpack",
]
