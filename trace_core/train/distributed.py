"""The process group of a multi-process run (torchrun), and what the trainer exchanges over it.

A step over N ranks does what one process does with the same global batch (docs: README "Multi-GPU and
multi-node"):

- every rank draws the same B candidate prompts (the step's rng is a pure function of (seed, step)) and
  prefills its contiguous share of them (`shard`: numpy's array_split), keeping their global prompt ids;
- the predictions of the shares are gathered in rank order (= prompt order), so Stage 1 sees the whole step
  and every rank computes the same counts; each rank rolls out its own prompts (a tree never spans ranks);
- Stage 2 gathers each round's anchors (their predictions, outcomes and prompts) in the order one process
  would hold them, runs the prefix strategy on the whole list on every rank, and each rank expands its own;
- the predictor's training nodes are gathered in that same order, so the predictor (replicated) takes the
  same update on every rank.

"The order one process would hold them" is `NodeOrder`: a key per forest node that sorts the nodes of all
ranks' forests exactly as one process numbers the nodes of its single forest.

Object exchanges (a few numbers and small arrays per step) go over a gloo group, so they need no device
copies whatever the backend of the gradients (NCCL on CUDA).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trace_core.forest import RolloutForest


@dataclass
class World:
    """This process's place in the run. size 1: no process group, and every exchange returns its input."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # a gloo group for object exchanges (None: the default group, or one process)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that owns the run directory (config.yaml, metrics, plots, the lock)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def sum(self, value: float) -> float:
        return float(sum(self.all_gather(value)))

    def max(self, value: float) -> float:
        return float(max(self.all_gather(value)))

    def any(self, flag: bool) -> bool:
        return any(self.all_gather(bool(flag)))

    def concat(self, array: np.ndarray) -> np.ndarray:
        """Every rank's 1-d array, concatenated in rank order."""
        return np.concatenate([np.asarray(a) for a in self.all_gather(np.asarray(array))])

    def gather_sorted(self, keys: np.ndarray, payload: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
        """Every rank's rows, in the order of their keys (`NodeOrder`), on every rank.

        keys [K, 3] int64 this rank's rows' keys; payload: name -> [K, ...] numpy array, tensor or list.
        Returns (name -> all ranks' rows sorted by key, mine [K]: where this rank's rows sit in that order)."""
        parts = self.all_gather((np.asarray(keys, dtype=np.int64).reshape(-1, 3), payload))
        all_keys = np.concatenate([k for k, _ in parts])
        order = np.lexsort((all_keys[:, 2], all_keys[:, 1], all_keys[:, 0]))
        owner = np.concatenate([np.full(len(k), r) for r, (k, _) in enumerate(parts)])
        rank_pos = np.concatenate([np.arange(len(k)) for k, _ in parts])
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        mine = position[owner == self.rank]
        mine = mine[np.argsort(rank_pos[owner == self.rank])]
        merged = {}
        for name in payload:
            values = [p[name] for _, p in parts]
            if isinstance(values[0], torch.Tensor):
                merged[name] = torch.cat(values)[torch.as_tensor(order)]
            elif isinstance(values[0], np.ndarray):
                merged[name] = np.concatenate(values)[order]
            else:
                flat = [x for v in values for x in v]
                merged[name] = [flat[i] for i in order]
        return merged, mine


SINGLE = World()


def setup(backend: str = "auto", device_type: str = "cpu") -> World:
    """The World of this process. Under torchrun (WORLD_SIZE > 1) the default process group is created here
    unless the caller already did (tests spawn ranks and create it themselves); backend "auto" is NCCL when the
    model runs on CUDA, else gloo. A CUDA rank uses the GPU numbered by its LOCAL_RANK."""
    size = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    if size <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, group=group)


def shard(n: int, world: World) -> tuple[int, int]:
    """[lo, hi): this rank's contiguous share of n items (np.array_split: the first n % size ranks one more)."""
    base, extra = divmod(n, world.size)
    lo = world.rank * base + min(world.rank, extra)
    return lo, lo + base + (world.rank < extra)


class NodeOrder:
    """A sort key per node of this rank's forest: sorting the keys of every rank's nodes gives the order in which
    one process, running the whole step, would have numbered them (its node ids).

    One process numbers nodes phase by phase (the bare rollouts, then each Stage 2 round), and within a phase in
    request order: by prompt (bare rollouts) or by anchor (continuations), each request's nodes in write order.
    A node's key is (phase, the global index of the prompt or anchor it was written for, its local node id); the
    local ids break ties only inside one rank, where they follow write order too. Needs the requests of every
    phase made in global order on each rank (prompt ids ascending; anchors sorted by these keys)."""

    def __init__(self):
        self.keys = np.zeros((0, 3), dtype=np.int64)  # [num_nodes, 3]
        self.phase = 0

    def _grow(self, num_nodes: int) -> None:
        if self.keys.shape[0] < num_nodes:
            self.keys = np.concatenate([self.keys, np.zeros((num_nodes - self.keys.shape[0], 3), np.int64)])

    def add_bare(self, forest: RolloutForest, nodes: np.ndarray) -> None:
        """The nodes of the bare rollouts (roots and turns, global prompt ids in the forest)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        self._grow(forest.num_nodes)
        self.keys[nodes] = np.stack([np.zeros_like(nodes), forest.prompt_id[nodes], nodes], axis=1)

    def add_expansion(self, forest: RolloutForest, anchors: np.ndarray, index: np.ndarray, nodes: np.ndarray) -> None:
        """The nodes one Stage 2 round wrote from `anchors` (their global indices `index` in the round's list)."""
        self.phase += 1
        self._grow(forest.num_nodes)
        of = dict(zip(np.asarray(anchors).tolist(), np.asarray(index).tolist()))
        for node in np.asarray(nodes, dtype=np.int64).tolist():  # write order: a parent before its children
            parent = int(forest.parent[node])
            of[node] = of[parent]
            self.keys[node] = (self.phase, of[node], node)

    def of(self, nodes: np.ndarray) -> np.ndarray:
        return self.keys[np.asarray(nodes, dtype=np.int64)]


def reduce_metrics(world: World, local: dict[str, float], rules: dict[str, str]) -> dict[str, float]:
    """Metrics over all ranks: rules name -> "sum" | "max" (names not in rules are taken from rank 0)."""
    if not world.distributed:
        return dict(local)
    rows = world.all_gather(local)
    out = dict(rows[0])
    for name, rule in rules.items():
        values = [row[name] for row in rows if name in row]
        if values:
            out[name] = float(sum(values)) if rule == "sum" else float(max(values))
    return out


class AnchorExchange:
    """Stage 2 over several ranks (train/expansion.py's `exchange`): each round's anchors of every rank, gathered
    in one process's order, so the prefix strategy runs on the whole round (and its budget moves between prompts
    of different ranks) identically on every rank; each rank then expands its own anchors."""

    def __init__(self, world: World, order: NodeOrder, forest: RolloutForest):
        self.world, self.order, self.forest = world, order, forest
        self._index = np.zeros(0, dtype=np.int64)

    def any(self, anchors: np.ndarray) -> bool:
        """Whether any rank has an anchor."""
        return self.world.any(np.asarray(anchors).size > 0)

    def gather(self, anchors, predicted, outcome, group) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """All ranks' (predicted, outcome, group) [A_all], and mine [A]: where this rank's anchors sit in them."""
        payload = {"predicted": np.asarray(predicted, np.float64), "outcome": outcome, "group": group}
        merged, mine = self.world.gather_sorted(self.order.of(anchors), payload)
        self._index = mine
        return merged["predicted"], merged["outcome"], merged["group"], mine

    def expanded(self, anchors: np.ndarray, nodes: np.ndarray) -> None:
        """Record the keys of the nodes this round wrote (its anchors' indices are the last gather's)."""
        self.order.add_expansion(self.forest, anchors, self._index, nodes)


def teardown() -> None:
    """Leave the process group at the end of a run (a no-op without one).

    All ranks meet at a barrier first (gloo's barrier waits for every earlier collective), then wait a moment
    with the GIL released: gloo's worker threads may still be dropping the Python references of finished work,
    and the group's destructor joins them while holding the GIL, which deadlocks if one of them still needs it
    (pytorch/pytorch#56297; seen here as a rank hanging in ~ProcessGroupGloo after its last all_gather)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()
