"""The success predictor Vhat(H): probability that a rollout from prefix H succeeds.

One predictor serves prompt roots (Stage 1) and turn prefixes (Stage 2). It is trained online by
weighted MSE onto subtree success rates (weight = leaves under the node) of every root and internal
node, from a replay buffer of recent steps. It never enters the policy loss.

Backends share one interface (`SuccessPredictor`):
- `MLPHeadPredictor` (default): a small MLP on the policy's hidden state at the prefix's last token,
  detached, plus features (turn depth, prefix length) and a bag of the prefix's hashed token n-grams
  (fastText-style, `predictor.ngram_buckets`). The hidden states come from the packed no-grad forward
  the trainer runs anyway, so a prediction costs one MLP call. The n-grams matter: the hidden state
  moves with every policy update, so replayed nodes carry stale features, while a prefix's tokens mean
  the same thing at every step (on the default job they lift the head's Brier skill from about 0 to
  0.16-0.19; README, "TRACE vs the baselines").
- `EncoderPredictor`: a separate small (HF) model reads the prefix tokens; trained end to end.

Calibration is reported every step (`calibration`): Brier score against the constant predictor,
and the AUC with which the predicted contrast ranks "this node's subtree turned out mixed".
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from trace_core.forest import ForestError, RolloutForest
from trace_core.packing.forest import PackedTree
from trace_core.predictor_config import PredictorConfig


@dataclass
class PrefixBatch:
    """K prefixes (forest nodes) to predict or learn from.

    hidden     [K, H] policy hidden state at each prefix's last token (MLP head backend)
    token_ids  K arrays: each prefix's tokens root to node (encoder backend; the MLP head's n-grams)
    depth      [K] turns in the prefix (0 for a prompt)
    prefix_len [K] tokens in the prefix
    ngrams     K arrays of (bucket, log1p count) pairs [n_k, 2]: the hashed n-gram bag of each prefix,
               made from token_ids once by the MLP head (`hashed_ngrams`) and kept in its replay instead
    """

    depth: torch.Tensor
    prefix_len: torch.Tensor
    hidden: torch.Tensor | None = None
    token_ids: list[np.ndarray] | None = None
    ngrams: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.depth.shape[0])

    def select(self, index: torch.Tensor) -> PrefixBatch:
        return PrefixBatch(
            depth=self.depth[index],
            prefix_len=self.prefix_len[index],
            hidden=None if self.hidden is None else self.hidden[index],
            token_ids=None if self.token_ids is None else [self.token_ids[i] for i in index.tolist()],
            ngrams=None if self.ngrams is None else [self.ngrams[i] for i in index.tolist()],
        )

    @staticmethod
    def concat(batches: list[PrefixBatch]) -> PrefixBatch:
        def cat(name):
            parts = [getattr(b, name) for b in batches]
            return None if any(p is None for p in parts) else torch.cat(parts)

        def join(name):
            parts = [getattr(b, name) for b in batches]
            return None if any(p is None for p in parts) else [x for p in parts for x in p]

        return PrefixBatch(
            depth=cat("depth"),
            prefix_len=cat("prefix_len"),
            hidden=cat("hidden"),
            token_ids=join("token_ids"),
            ngrams=join("ngrams"),
        )


def prefix_batch(
    forest: RolloutForest, packed: PackedTree, nodes, hidden: torch.Tensor | None = None, *, with_tokens: bool = False
) -> PrefixBatch:
    """Gather the predictor inputs of forest `nodes` from a packed forward.

    hidden [N, H]: the model's last hidden states over `packed` (detached here); the prefix of node
    u ends at packed row node_end[u] - 1.
    """
    nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
    if nodes.size and (nodes.min() < 0 or nodes.max() >= forest.num_nodes):
        raise ForestError("nodes", f"node ids must be in [0, {forest.num_nodes})")
    rows = packed.node_end[nodes] - 1
    if np.any(packed.node_start[nodes] < 0):
        raise ForestError("nodes", "some nodes belong to trees that were not packed")
    if hidden is not None and hidden.shape[0] != packed.num_tokens:
        raise ForestError("hidden", f"has {hidden.shape[0]} rows, expected {packed.num_tokens} packed tokens")
    tokens = prefix_tokens(forest, nodes) if with_tokens else None
    return PrefixBatch(
        depth=torch.as_tensor(forest.depth[nodes], dtype=torch.long),
        prefix_len=torch.as_tensor(packed.position_ids[rows] + 1, dtype=torch.long),
        hidden=None if hidden is None else hidden[torch.as_tensor(rows, device=hidden.device)].detach().float().cpu(),
        token_ids=tokens,
    )


def prefix_tokens(forest: RolloutForest, nodes) -> list[np.ndarray]:
    """Each node's prefix: its tree's tokens from the root through the node (what the predictor reads)."""
    return [np.concatenate([forest.node_tokens(u) for u in forest.leaf_path(v)]) for v in nodes]


def training_targets(forest: RolloutForest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nodes, targets, weights): every root and internal node, its subtree success rate, and the
    number of leaves under it (docs/method.md steps 4-5)."""
    rates = forest.subtree_success_rates()
    counts = forest.subtree_leaf_counts()
    nodes = np.flatnonzero(forest.num_children > 0)
    return nodes, rates[nodes], counts[nodes].astype(np.float64)


class SuccessPredictor(Protocol):
    config: PredictorConfig
    nodes_seen: int
    reads_tokens: bool  # batches passed in must carry token_ids

    def predict(self, batch: PrefixBatch) -> np.ndarray:
        """[K] success probabilities in (0, 1)."""

    def observe(self, batch: PrefixBatch, targets: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """Add one step's nodes to the replay buffer and train; returns training metrics."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _OnlineRegressor:
    """Replay buffer + weighted-MSE training shared by the backends. Subclasses define `net`
    (an nn.Module) and `_logits(batch) -> [K]`."""

    net: nn.Module
    reads_tokens = False  # the trainer attaches each prefix's token ids to the batches it passes

    def __init__(self, config: PredictorConfig):
        self.config = config
        self.nodes_seen = 0
        self._replay: deque[tuple[PrefixBatch, torch.Tensor, torch.Tensor]] = deque(maxlen=config.replay_steps)
        self._generator = torch.Generator().manual_seed(config.seed)

    def _make_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    @property
    def ready(self) -> bool:
        """Cold start is over: enough nodes seen to trust the allocation it informs."""
        return self.nodes_seen >= self.config.warmup_nodes

    @torch.no_grad()
    def predict(self, batch: PrefixBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0)
        self.net.eval()
        return torch.sigmoid(self._logits(self._prepare(batch))).double().cpu().numpy()

    def _prepare(self, batch: PrefixBatch) -> PrefixBatch:
        """A batch as this backend reads (and replays) it; called once per batch passed in."""
        return batch

    def observe(self, batch: PrefixBatch, targets, weights) -> dict[str, float]:
        targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if targets.shape != (len(batch),) or weights.shape != (len(batch),):
            raise ValueError(
                f"targets/weights: expected shape ({len(batch)},), got {tuple(targets.shape)} and {tuple(weights.shape)}"
            )
        if not (torch.isfinite(targets).all() and ((targets >= 0) & (targets <= 1)).all()):
            raise ValueError("targets: success rates must be finite and in [0, 1]")
        if not (torch.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError("weights: must be finite and >= 0")
        if len(batch):
            self._replay.append((self._prepare(batch), targets, weights))
            self.nodes_seen += len(batch)
        if not self._replay:
            return {"predictor/loss": float("nan")}
        pool = PrefixBatch.concat([b for b, _, _ in self._replay])
        pool_targets = torch.cat([t for _, t, _ in self._replay])
        pool_weights = torch.cat([w for _, _, w in self._replay])
        self.net.train()
        losses = []
        for _ in range(self.config.updates_per_step):
            index = torch.randint(len(pool), (min(self.config.batch_size, len(pool)),), generator=self._generator)
            w = pool_weights[index]
            pred = torch.sigmoid(self._logits(pool.select(index)))
            loss = (w * (pred - pool_targets[index]) ** 2).sum() / w.sum().clamp_min(1e-12)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        return {
            "predictor/loss": float(np.mean(losses)),
            "predictor/replay_nodes": float(len(pool)),
            "predictor/replay_max_age": float(len(self._replay) - 1),  # policy updates behind the newest features
        }

    def state_dict(self) -> dict:
        # plain tensors and lists only, so torch.load(weights_only=True) can read a checkpoint
        replay = [
            {
                "depth": b.depth,
                "prefix_len": b.prefix_len,
                "hidden": b.hidden,
                "targets": t,
                "weights": w,
                "token_ids": None if b.token_ids is None else [torch.as_tensor(x) for x in b.token_ids],
                "ngrams": None if b.ngrams is None else [torch.as_tensor(x) for x in b.ngrams],
            }
            for b, t, w in self._replay
        ]
        return {
            "config": asdict(self.config),
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "nodes_seen": self.nodes_seen,
            "generator": self._generator.get_state(),
            "replay": replay,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.nodes_seen = int(state["nodes_seen"])
        self._generator.set_state(state["generator"])
        self._replay = deque(
            (
                (
                    PrefixBatch(
                        depth=r["depth"],
                        prefix_len=r["prefix_len"],
                        hidden=r["hidden"],
                        token_ids=None if r["token_ids"] is None else [t.numpy() for t in r["token_ids"]],
                        ngrams=None if r.get("ngrams") is None else [t.numpy() for t in r["ngrams"]],
                    ),
                    r["targets"],
                    r["weights"],
                )
                for r in state["replay"]
            ),
            maxlen=self.config.replay_steps,
        )


def _features(batch: PrefixBatch) -> torch.Tensor:
    """[K, 2] scale-free side features: log turn depth and log prefix length."""
    return torch.stack([torch.log1p(batch.depth.float()), torch.log1p(batch.prefix_len.float()) / 4.0], dim=1)


def hashed_ngrams(tokens: np.ndarray, buckets: int, order: int) -> np.ndarray:
    """[n, 2] float64 (bucket, log1p count) of the hashed token n-grams (n = 1..order) of one prefix,
    one row per distinct bucket: a fastText-style bag that reads the same at every training step."""
    t = np.asarray(tokens, dtype=np.uint64).reshape(-1)
    keys = []
    with np.errstate(over="ignore"):  # hashing wraps around uint64 on purpose
        for n in range(1, order + 1):
            if t.size < n:
                break
            h = np.full(t.size - n + 1, np.uint64(n) * np.uint64(0x9E3779B97F4A7C15))
            for j in range(n):
                h = (h ^ t[j : t.size - n + 1 + j]) * np.uint64(0x100000001B3)
            keys.append(h % np.uint64(buckets))
    if not keys:
        return np.zeros((0, 2))
    ids, counts = np.unique(np.concatenate(keys), return_counts=True)
    return np.stack([ids.astype(np.float64), np.log1p(counts)], axis=1)


class _MLPHead(nn.Module):
    """logit = MLP([LayerNorm(hidden), side features]) with the n-gram bag's embedding (a linear map of
    its counts) added to the first layer's output."""

    def __init__(self, input_dim: int, hidden_dim: int, ngram_buckets: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim) if input_dim else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(input_dim + 2, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        self.ngrams = None
        if ngram_buckets:  # initialised like a Linear over the bucket counts, not N(0, 1)
            self.ngrams = nn.EmbeddingBag(ngram_buckets, hidden_dim, mode="sum")
            nn.init.uniform_(self.ngrams.weight, -(ngram_buckets**-0.5), ngram_buckets**-0.5)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor, ngrams: list[np.ndarray] | None = None):
        x = self.mlp[0](torch.cat([self.norm(hidden), features], dim=1))
        if self.ngrams is not None:
            rows = np.concatenate(ngrams) if ngrams else np.zeros((0, 2))
            offsets = np.cumsum([0] + [len(g) for g in ngrams[:-1]]) if ngrams else np.zeros(0)
            device, weight = x.device, self.ngrams.weight
            bag = self.ngrams(  # in the table's dtype: under autocast x may be bf16 while the table is fp32
                torch.as_tensor(rows[:, 0], dtype=torch.long, device=device),
                torch.as_tensor(offsets, dtype=torch.long, device=device),
                per_sample_weights=torch.as_tensor(rows[:, 1], dtype=weight.dtype, device=device),
            )
            x = x + bag.to(x.dtype)
        return self.mlp[2](self.mlp[1](x)).squeeze(1)


class MLPHeadPredictor(_OnlineRegressor):
    """Default backend: MLP on the (detached) policy hidden state at the prefix's last token, the side
    features and, with `ngram_buckets`, the prefix's hashed n-grams. hidden_size=0: no hidden state
    (n-grams and side features only, for callers that have no hidden states, e.g. a rollout server)."""

    def __init__(self, hidden_size: int, config: PredictorConfig | None = None):
        super().__init__(config or PredictorConfig())
        if hidden_size == 0 and not self.config.ngram_buckets:
            raise ValueError("hidden_size: 0 (no hidden state) needs n-gram features (predictor.ngram_buckets > 0)")
        torch.manual_seed(self.config.seed)
        self.hidden_size = hidden_size
        self.net = _MLPHead(hidden_size, self.config.hidden_dim, self.config.ngram_buckets)
        self.reads_tokens = bool(self.config.ngram_buckets)
        self._make_optimizer()

    def _prepare(self, batch: PrefixBatch) -> PrefixBatch:
        """Hash the n-grams once (they are then replayed, not the tokens)."""
        if not self.config.ngram_buckets or batch.ngrams is not None:
            return batch
        if batch.token_ids is None:
            raise ValueError("token_ids: the MLP head with predictor.ngram_buckets > 0 needs the prefixes' tokens")
        c = self.config
        bags = [hashed_ngrams(t, c.ngram_buckets, c.ngram_order) for t in batch.token_ids]
        return dataclasses.replace(batch, token_ids=None, ngrams=bags)

    def _logits(self, batch: PrefixBatch) -> torch.Tensor:
        hidden = batch.hidden
        if hidden is None and self.hidden_size:
            raise ValueError("hidden: the MLP head predictor needs the policy hidden states of the prefixes")
        if hidden is None:
            hidden = torch.zeros(len(batch), 0)
        return self.net(hidden.float(), _features(batch), batch.ngrams)


def token_predictor(tokenizer=None, config: PredictorConfig | None = None) -> MLPHeadPredictor:
    """A predictor that reads the prefix's tokens only (hashed n-grams, depth, length): for callers that
    have no policy hidden states, e.g. verl's agent loop (`+trace_agent.predictor=trace_core.predictor:
    token_predictor`, called with the tokenizer, which it does not need)."""
    config = config or PredictorConfig()
    if not config.ngram_buckets:
        raise ValueError("predictor.ngram_buckets: the token predictor reads n-grams only; it must be > 0")
    return MLPHeadPredictor(0, config)


class _EncoderHead(nn.Module):
    def __init__(self, encoder: nn.Module, hidden_size: int, hidden_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = _MLPHead(hidden_size, hidden_dim)


class EncoderPredictor(_OnlineRegressor):
    """Alternative backend: a separate small model (any HF model returning hidden states) reads the
    prefix tokens; its last-token hidden state feeds the MLP head. Trained end to end."""

    reads_tokens = True

    def __init__(self, encoder: nn.Module, config: PredictorConfig | None = None, *, pad_token_id: int = 0):
        super().__init__(config or PredictorConfig())
        torch.manual_seed(self.config.seed)
        hidden_size = encoder.config.hidden_size
        self.net = _EncoderHead(encoder, hidden_size, self.config.hidden_dim)
        self.pad_token_id = pad_token_id
        self._make_optimizer()

    def _logits(self, batch: PrefixBatch) -> torch.Tensor:
        if batch.token_ids is None:
            raise ValueError(
                "token_ids: the encoder predictor needs prefix tokens (prefix_batch(..., with_tokens=True))"
            )
        lengths = torch.as_tensor([t.size for t in batch.token_ids])
        ids = torch.full((len(batch), int(lengths.max())), self.pad_token_id, dtype=torch.long)
        for i, t in enumerate(batch.token_ids):
            ids[i, : t.size] = torch.as_tensor(t)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        device = next(self.net.parameters()).device
        out = self.net.encoder(
            input_ids=ids.to(device), attention_mask=mask.long().to(device), output_hidden_states=True
        )
        last = out.hidden_states[-1][torch.arange(len(batch)), (lengths - 1).to(device)]
        return self.net.head(last.float(), _features(batch).to(device))


# ---------------------------------------------------------------------- calibration
def calibration(
    pred: np.ndarray, target: np.ndarray, weight: np.ndarray, mixed: np.ndarray, contrast: np.ndarray
) -> dict[str, float]:
    """Calibration of predictions made *before* the outcomes were seen.

    pred/target/weight [K]: predicted and realised subtree success, leaves under each node.
    mixed [K] bool: the node's subtree turned out mixed; contrast [K]: the predicted chance of that
    (e.g. 1 - q for an anchor, p(1-p) for a root), whose ranking the AUC scores.
    Returns brier (weighted), brier_constant (the best constant predictor, for reference), auc_mixed.
    """
    pred, target, weight = (np.asarray(x, dtype=np.float64) for x in (pred, target, weight))
    if pred.size == 0:
        return {"brier": math.nan, "brier_constant": math.nan, "auc_mixed": math.nan}
    total = weight.sum()
    brier = float((weight * (pred - target) ** 2).sum() / total)
    constant = (weight * target).sum() / total
    return {
        "brier": brier,
        "brier_constant": float((weight * (constant - target) ** 2).sum() / total),
        "auc_mixed": auc(np.asarray(contrast, dtype=np.float64), np.asarray(mixed, dtype=bool)),
    }


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class."""
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))
