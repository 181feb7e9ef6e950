"""Test doubles for the rollout engine: a scripted deterministic env, a character codec, tiny models.

The tiny models are built on DEVICE: the engine tests force the Triton decode path, which runs
interpreted on CPU tensors but needs CUDA tensors on a GPU machine (no interpreter there). The
generate / fresh-forward oracles run on whatever device the model is on."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from trace_core.envs.base import Step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class CounterEnv:
    """Scripted env: the observation after turn t is "<t:len(action)>" (+ a seeded random digit when
    `noisy`); the episode ends after `max_turns` turns with reward = 1 if the last action has an even
    length. State = (turn, rng state): snapshot/restore round-trips it exactly."""

    def __init__(self, max_turns: int = 3, noisy: bool = False):
        self.max_turns, self.noisy = max_turns, noisy
        self.turn, self.rng, self.actions = 0, random.Random(0), []

    def reset(self, task, *, seed=None):
        self.turn, self.rng, self.actions = 0, random.Random(seed), []
        return str(task["prompt"])

    def step(self, action):
        self.turn += 1
        self.actions.append(action)
        if self.turn >= self.max_turns:
            return Step("", True, float(len(action) % 2 == 0), {"turn": self.turn})
        noise = str(self.rng.randint(0, 9)) if self.noisy else ""
        return Step(f"<{self.turn}:{len(action)}{noise}>", False, None, {"turn": self.turn})

    def snapshot(self):
        return (self.turn, self.rng.getstate(), list(self.actions))

    def restore(self, snapshot, *, seed=None):
        self.turn, state, actions = snapshot
        self.actions = list(actions)
        self.rng = random.Random(seed) if seed is not None else random.Random()
        if seed is None:
            self.rng.setstate(state)


class CharCodec:
    """Characters <-> ids 0..vocab-1 (a bijection on a small alphabet); no EOS."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789<>:!?. ABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def __init__(self, vocab_size: int):
        self.alphabet = self.ALPHABET[:vocab_size]
        self.eos_token_ids = ()

    def encode_prompt(self, text):
        return [self.alphabet.index(c) for c in text]

    encode_observation = encode_prompt

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def tiny_qwen3(seed: int = 0, vocab_size: int = 64):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    # random init logits are nearly flat; sharpen them so greedy paths are not decided by rounding
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.to(DEVICE)


def tiny_model(family: str, seed: int = 0, vocab_size: int = 64):
    """A tiny random Llama / Qwen2 (q/k/v bias) / Qwen3 (q_norm, k_norm) causal LM."""
    if family == "qwen3":
        return tiny_qwen3(seed, vocab_size)
    import transformers

    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.to(DEVICE)


def generate_greedy(model, prefix, num_tokens):
    """model.generate, greedy, exactly num_tokens new tokens (no EOS stop)."""
    ids = torch.tensor([prefix], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=num_tokens,
        min_new_tokens=num_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prefix) :].tolist()


def fresh_logprobs(model, token_ids, temperature=1.0):
    """log_softmax(logits / T) of every token given its prefix, from one plain HF forward [L] (0 at 0),
    on the CPU."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids], device=model.device)).logits[0].float().cpu()
    logp = torch.log_softmax(logits[:-1] / temperature, -1).gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]
    return torch.cat([torch.zeros(1), logp])


@dataclass
class Episode:
    """One episode an engine wrote, read back from the forest: its root-to-leaf path."""

    leaf: int
    nodes: list[int]  # root, turn 1, ..., the leaf
    prompt_id: int
    token_ids: list[int]
    model_mask: list[bool]
    logprobs: list[float]
    turn_starts: list[int]  # offset of each turn's first token
    reward: float
    finished: bool

    @property
    def num_turns(self) -> int:
        return len(self.turn_starts)

    def turn_tokens(self, t: int) -> list[int]:
        bounds = [*self.turn_starts, len(self.token_ids)]
        return self.token_ids[bounds[t - 1] : bounds[t]]


def episodes(forest, out) -> list[Episode]:
    """The episodes of one engine call (`out`, a Generated), in request order."""
    result = []
    for leaf, finished in zip(out.leaves.tolist(), out.finished.tolist()):
        nodes = forest.leaf_path(leaf).tolist()
        seq = forest.leaf_sequence(leaf)
        ends = np.cumsum([forest.tok_end[u] - forest.tok_start[u] for u in nodes]).tolist()
        result.append(
            Episode(
                leaf,
                nodes,
                int(forest.prompt_id[leaf]),
                seq.token_ids.tolist(),
                seq.loss_mask.tolist(),
                seq.logprobs.tolist(),
                ends[:-1],
                seq.reward,
                finished,
            )
        )
    return result


def run_rollout(engine, forest, tasks, counts):
    """prefill + rollout in one call; returns the episodes."""
    return episodes(forest, engine.rollout(forest, engine.prefill(tasks), counts))
