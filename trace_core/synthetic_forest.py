"""Synthetic rollout forests shaped like TRACE's trees, for benchmarks and tests.

Each prompt gets `rollouts` bare rollouts (chains of `turns` turns), then `continuations` extra
chains that branch after a random non-final turn of a random bare rollout and run to the same
turn limit. A turn is some model tokens followed by some observation tokens; the final turn has
no observation. Leaves get 0/1 rewards with a per-prompt success probability, so some trees are
mixed and some are not.
"""

from __future__ import annotations

import numpy as np

from trace_core.forest import ROLE_MODEL, RolloutForest


def synthetic_forest(
    rng: np.random.Generator,
    *,
    num_prompts: int = 8,
    rollouts: int = 4,
    turns: int = 4,
    continuations: int = 4,
    prompt_tokens: tuple[int, int] = (16, 64),
    model_tokens: tuple[int, int] = (4, 32),
    observation_tokens: tuple[int, int] = (0, 32),
    vocab_size: int = 32000,
) -> RolloutForest:
    """Random forest; token counts are drawn uniformly from the inclusive (low, high) ranges."""
    if turns < 1 or rollouts < 1 or num_prompts < 1 or continuations < 0:
        raise ValueError("synthetic_forest: num_prompts, rollouts and turns must be >= 1, continuations >= 0")
    if continuations and turns < 2:
        raise ValueError("synthetic_forest: continuations need turns >= 2 (a branch point before the last turn)")
    parent, prompt_of, lengths, model_lengths = [], [], [], []

    def add(p: int, prompt: int, n_model: int, n_obs: int) -> int:
        parent.append(p)
        prompt_of.append(prompt)
        lengths.append(n_model + n_obs)
        model_lengths.append(n_model)
        return len(parent) - 1

    def draw(bounds: tuple[int, int]) -> int:
        return int(rng.integers(bounds[0], bounds[1] + 1))

    def chain(start: int, prompt: int, first_turn: int) -> list[int]:
        nodes, u = [], start
        for t in range(first_turn, turns + 1):
            u = add(u, prompt, max(1, draw(model_tokens)), 0 if t == turns else draw(observation_tokens))
            nodes.append(u)
        return nodes

    for prompt in range(num_prompts):
        root = add(-1, prompt, 0, max(1, draw(prompt_tokens)))
        bare = [chain(root, prompt, 1) for _ in range(rollouts)]
        for _ in range(continuations):
            j, t = int(rng.integers(rollouts)), int(rng.integers(1, turns))  # branch after turn t
            chain(bare[j][t - 1], prompt, t + 1)

    lengths_arr = np.asarray(lengths, dtype=np.int64)
    tok_end = np.cumsum(lengths_arr)
    tok_start = tok_end - lengths_arr
    total = int(tok_end[-1]) if lengths else 0
    # model tokens are the first `model_lengths` tokens of each span
    offset_in_node = np.arange(total) - np.repeat(tok_start, lengths_arr)
    role = (offset_in_node < np.repeat(np.asarray(model_lengths), lengths_arr)).astype(np.uint8)
    logprob = np.where(role == ROLE_MODEL, -rng.exponential(1.0, total), 0.0)
    parent_arr = np.asarray(parent, dtype=np.int64)
    is_leaf = np.bincount(parent_arr[parent_arr >= 0], minlength=parent_arr.size) == 0
    is_leaf &= parent_arr >= 0
    success = rng.uniform(size=num_prompts)[np.asarray(prompt_of)]
    reward = np.where(is_leaf, (rng.uniform(size=parent_arr.size) < success).astype(float), np.nan)
    return RolloutForest.from_arrays(
        parent=parent_arr,
        prompt_id=np.asarray(prompt_of),
        tok_start=tok_start,
        tok_end=tok_end,
        tokens=rng.integers(0, vocab_size, total),
        role=role,
        reward=reward,
        logprob=logprob,
        vocab_size=vocab_size,
    )
