"""What the trainer asks of a rollout engine, and what it gets back.

The engine writes straight into a `RolloutForest` (the incremental builder): nothing is flattened
into per-episode lists and rebuilt.

    prompts = engine.prefill(tasks, prompt_ids)        -> prompts in the KV cache + their hidden states
    out = engine.rollout(forest, prompts, counts)      -> counts[i] bare rollouts of prompt i: a root
                                                          per prompt with count > 0, a node per turn
    out = engine.expand(forest, anchors, counts)       -> counts[a] continuations forked after the
                                                          turn node anchors[a] (a forest node id)
    engine.hidden_states(nodes)                        -> [n, H] the policy's hidden state at the last
                                                          token of each root / turn prefix it wrote
    engine.release_all()                               -> forget retained prefixes (KV pages, env
                                                          snapshots, hidden states)

Anchors are forest node ids of non-final turns. An episode the env did not end (cut at
`env.max_turns`) gets reward 0 and `finished=False`. Flat per-leaf sequences for other trainers:
`forest.leaf_sequences()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from trace_core.forest import RolloutForest


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one turn.

    temperature     0 = greedy; logprobs are then those of the untempered model
    top_p           nucleus mass in (0, 1]; the recorded logprob is the tempered model's, before
                    the nucleus cut (the distribution a trainer recomputes)
    max_tokens      hard cap on model tokens in one turn (the turn ends there, marked truncated)
    stop_strings    the turn ends at the token that completes one of these (kept in the turn)
    stop_token_ids  the turn ends at one of these tokens (kept); the codec's EOS ids are added
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature: must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop_strings, str) or any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings: must be a tuple of non-empty strings, got {self.stop_strings!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")


@dataclass(frozen=True)
class Prompts:
    """Prompts prefilled into an engine's KV cache, not yet in any forest.

    prompt_ids  [B] the id each prompt's tree gets in the forest
    token_ids   B token lists (the encoded prompts)
    hidden      [B, H] float32 hidden state at each prompt's last token (what the predictor reads)
    """

    prompt_ids: np.ndarray
    token_ids: list[list[int]]
    hidden: torch.Tensor
    handles: tuple[int, ...]  # engine-private: which prefilled prompt each row is

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.token_ids], dtype=np.int64)


@dataclass(frozen=True)
class Generated:
    """What one rollout / expand call wrote into the forest.

    nodes     [n] every node it added, in the order added (roots, then each episode's turns)
    leaves    [k] each episode's final turn node, in request order
    finished  [k] bool: the env ended the episode (False: cut at env.max_turns, reward 0)
    info      k mappings: the env's `Step.info` of each episode's last turn (answer metrics, end reason)
    """

    nodes: np.ndarray
    leaves: np.ndarray
    finished: np.ndarray
    info: tuple[Mapping[str, Any], ...] = ()


@runtime_checkable
class RolloutEngine(Protocol):
    def prefill(self, tasks: Sequence[Mapping[str, Any]], prompt_ids: Sequence[int] | None = None) -> Prompts:
        """Reset an env per task, encode and prefill its prompt (prompt_id defaults to the index)."""

    def rollout(self, forest: RolloutForest, prompts: Prompts, counts: Sequence[int]) -> Generated:
        """counts[i] bare rollouts of prompts[i]; a prompt with count 0 never enters the forest."""

    def expand(self, forest: RolloutForest, anchors: Sequence[int], counts: Sequence[int]) -> Generated:
        """counts[a] continuations after turn node anchors[a], with fresh env seeds."""

    def hidden_states(self, nodes: Sequence[int]) -> torch.Tensor:
        """[n, H] float32 hidden state at the last token of each root / non-final turn node."""

    def release_all(self) -> None:
        """Drop every retained prefix; nodes written so far can no longer be expanded."""
