"""The predictor's config section (trace_core.predictor), in a module without torch: building and
checking a TrainConfig must not import torch (config errors and `trace --help` come back fast)."""

from __future__ import annotations

from dataclasses import dataclass

PREDICTOR_BACKENDS = ("mlp_head", "encoder", "oracle")


@dataclass
class PredictorConfig:
    hidden_dim: int = 256  # MLP width
    lr: float = 1e-3
    weight_decay: float = 0.0
    updates_per_step: int = 16  # minibatch steps over the replay buffer after each training step
    batch_size: int = 256
    # nodes of this many recent steps are replayed. With the mlp_head backend a replayed node keeps the
    # hidden state of the policy that generated it, so this also bounds how stale those features are:
    # at most replay_steps - 1 policy updates old (logged as predictor/replay_max_age)
    replay_steps: int = 8
    warmup_nodes: int = 256  # cold start: the trainer allocates uniformly until this many nodes were seen
    seed: int = 0
    # "mlp_head": an MLP on the policy's own hidden state at the prefix's last token (from the engine);
    # "encoder": a separate model (`encoder`, a model name like model.name, sharing the policy's
    # tokenizer) reads the prefix tokens and is trained end to end with the head
    # "oracle" (analysis only, never a default): Vhat = the mean reward of `oracle_samples` extra episodes
    # from each prompt / prefix, sampled by the engine outside the step's budget and never trained on;
    # shows what the allocation buys when its predictions are right
    backend: str = "mlp_head"
    encoder: str = "tiny"
    oracle_samples: int = 8
    # the MLP head's bag of hashed token n-grams of the prefix (1..ngram_order tokens long), added to the
    # hidden state: features that, unlike the hidden state, do not go stale in the replay. 0 = off (the
    # hidden state and side features only). The encoder backend reads the tokens itself and ignores them
    ngram_buckets: int = 4096
    ngram_order: int = 2

    def __post_init__(self):
        for name in ("hidden_dim", "updates_per_step", "batch_size", "replay_steps", "oracle_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"predictor.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"predictor.lr: must be > 0, got {self.lr}")
        if self.backend not in PREDICTOR_BACKENDS:
            raise ValueError(f"predictor.backend: {self.backend!r} is not one of {', '.join(PREDICTOR_BACKENDS)}")
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"predictor.encoder: must name a model (like model.name), got {self.encoder!r}")
        if int(self.ngram_buckets) < 0:
            raise ValueError(
                f"predictor.ngram_buckets: must be >= 0 (0 = no n-gram features), got {self.ngram_buckets}"
            )
        if int(self.ngram_order) < 1:
            raise ValueError(f"predictor.ngram_order: must be >= 1, got {self.ngram_order}")
        if self.warmup_nodes < 0:
            raise ValueError(f"predictor.warmup_nodes: must be >= 0, got {self.warmup_nodes}")


__all__ = ["PREDICTOR_BACKENDS", "PredictorConfig"]
