"""Packing: lay rollout trees (or flat batches that share prefixes) out as one token sequence.

Each node's tokens appear once, in DFS pre-order, so a node's subtree is one contiguous range and
tree attention needs one int per key token: query i sees key j iff j <= i < end[j]. Position ids
are path positions, so RoPE sees exactly the positions of the unpacked sequences.

- forest.py  RolloutForest -> PackedTree: `pack` (numba), `pack_reference` (plain Python, the
             oracle), `unpack` (per-token values back to per-leaf sequences), `split_by_tokens`
             (micro-batches of whole trees under a token budget).
- flat.py    padded [B, L] batches (verl / TRL GRPO groups) -> prefix trees: `pack_shared_prefixes`
             (a radix trie by token), `shared_prefix_micro_batches` (token-budgeted row groups that
             keep sharing rows together).

numpy and numba only: importing this package does not import torch.
"""

from trace_core.packing.flat import (
    SequenceBatchError,
    SharedPrefixPack,
    as_numpy,
    pack_shared_prefixes,
    shared_prefix_micro_batches,
)
from trace_core.packing.forest import PackedTree, pack, pack_reference, split_by_tokens, unpack

__all__ = [
    "PackedTree",
    "SequenceBatchError",
    "SharedPrefixPack",
    "as_numpy",
    "pack",
    "pack_reference",
    "pack_shared_prefixes",
    "shared_prefix_micro_batches",
    "split_by_tokens",
    "unpack",
]
