"""The built-in rollout engine: any HF causal LM over the paged tree KV cache, with branching.

Flow of one call (rollout or expand):
- every live branch holds a *pending* token (sampled, not yet in the cache) and a KV node of its
  own; one batched decode step feeds all pending tokens and samples the next ones;
- when a branch's turn ends (stop id / stop string / max tokens), the env gets the action text; if
  the episode goes on, the pending token and the observation tokens are prefilled into the
  branch's node (all such branches in one extend pass), the node becomes the *turn node* of that
  turn (frozen, retained with the env's snapshot and the last hidden state), and the next turn
  starts in a fresh child node;
- `expand(Anchor(uid, t))` forks new children off turn t's retained node: the prefix is neither
  recomputed nor copied; the first token is sampled from the retained hidden state, and the env is
  restored from the snapshot with a fresh seed.

Rollouts of one task share the prompt's node: the prompt is prefilled once, `reset` is called once
per task, and each copy's env is restored from that snapshot with its own seed.
Retained prefixes stay until `release_all()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from trace_core.envs.base import Env
from trace_core.rollout.codec import TextCodec
from trace_core.rollout.paged_runner import HFPagedRunner
from trace_core.rollout.protocol import Anchor, EngineTrajectory, SamplingParams
from trace_core.rollout.sampling import sample_tokens


@dataclass
class _TurnRecord:
    node: int  # the turn node (prompt + turns 1..t on its path), retained
    hidden: torch.Tensor  # [hidden] final hidden state of its last token
    snapshot: Any  # env state after the turn
    prefix_len: int  # tokens of the trajectory up to the end of this turn


@dataclass
class _Branch:
    uid: int
    prompt_id: int
    env: Env
    node: int  # KV node the current turn is written into
    tokens: list[int]
    mask: list[bool]
    logprobs: list[float]
    turn_starts: list[int]
    branch_from: tuple[int, int] | None
    turn: int = 1  # the turn being generated (1-based)
    pending: int | None = None
    turn_tokens: list[int] = field(default_factory=list)
    turn_logprobs: list[float] = field(default_factory=list)
    turn_info: list[Mapping[str, Any]] = field(default_factory=list)
    first_hidden: torch.Tensor | None = None  # hidden state the turn's first token is sampled from


class HFRolloutEngine:
    """RolloutEngine over a Hugging Face causal LM (see module doc).

    model          a Llama / Qwen2 / Qwen3 style `*ForCausalLM` (eval mode is set)
    codec          TextCodec (e.g. HFTextCodec(tokenizer))
    env_factory    () -> Env, a fresh environment instance
    sampling       SamplingParams for every turn, or a sequence indexed by turn (the last repeats)
    num_pages, page_size   KV cache size
    decode_backend None (auto), "triton" or "reference" for the decode attention
    kv_dtype       dtype of the KV cache; None = the parameter dtype (fp32 master weights under
                   autocast: the compute dtype, and call rollout / expand inside the autocast)
    seed           seeds sampling and the env seeds
    """

    def __init__(self, model, codec: TextCodec, env_factory: Callable[[], Env], *,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 num_pages: int = 4096, page_size: int = 16, decode_backend: str | None = None,
                 kv_dtype: torch.dtype | None = None, seed: int = 0):
        self.sampling = [sampling] if isinstance(sampling, SamplingParams) else list(sampling)
        if not self.sampling or not all(isinstance(p, SamplingParams) for p in self.sampling):
            raise ValueError("sampling: must be a SamplingParams or a non-empty sequence of them")
        model.eval()
        self.runner = HFPagedRunner(model, num_pages=num_pages, page_size=page_size, decode_backend=decode_backend,
                                    kv_dtype=kv_dtype)
        self.cache = self.runner.cache
        self.codec, self.env_factory = codec, env_factory
        self.vocab_size = int(model.config.vocab_size)
        self._generator = torch.Generator(device=self.runner.device).manual_seed(int(seed))
        self._seeds = np.random.default_rng(int(seed))
        self._next_uid = 0
        self._turns: dict[int, list[_TurnRecord]] = {}  # uid -> records of turns 1..T-1
        self._prefixes: dict[int, EngineTrajectory] = {}  # uid -> finished trajectory
        self._retained: list[int] = []  # node handles held for later expansion
        self.generated_tokens = 0

    # ------------------------------------------------------------------ public API
    def rollout(self, tasks: Sequence[Mapping[str, Any]], counts: Sequence[int], *,
                prompt_ids: Sequence[int] | None = None) -> list[EngineTrajectory]:
        counts = self._check_counts(counts, len(tasks), "counts")
        prompt_ids = list(range(len(tasks))) if prompt_ids is None else [int(p) for p in prompt_ids]
        if len(prompt_ids) != len(tasks):
            raise ValueError(f"prompt_ids: {len(prompt_ids)} ids for {len(tasks)} tasks")
        roots, prompts, branches = [], [], []
        for task, count in zip(tasks, counts):
            if count == 0:
                continue
            env = self.env_factory()
            prompt = self.codec.encode_prompt(env.reset(task, seed=self._fresh_seed()))
            self._check_tokens(prompt, "prompt (codec.encode_prompt)")
            if not prompt:
                raise ValueError(f"tasks[{len(roots)}]: the prompt encodes to no tokens (codec.encode_prompt)")
            roots.append(self.cache.new_root())
            prompts.append((prompt, env.snapshot()))
        if roots:
            hidden = self.runner.extend(roots, [p for p, _ in prompts])
            self._retained.extend(roots)
        live = iter(zip(roots, prompts, hidden if roots else []))
        for task_index, count in enumerate(counts):
            if count == 0:
                continue
            root, (prompt, snapshot), h = next(live)
            for _ in range(count):
                env = self.env_factory()
                env.restore(snapshot, seed=self._fresh_seed())
                branches.append(self._new_branch(prompt_ids[task_index], env, root, list(prompt), [False] * len(prompt),
                                                 [0.0] * len(prompt), [], None, 1, h))
        return self._generate(branches)

    def expand(self, anchors: Sequence[Anchor], counts: Sequence[int], *,
               share_prefix: bool = True) -> list[EngineTrajectory]:
        """counts[a] continuations of anchors[a]. share_prefix=False is the no-sharing ablation (for
        benchmarks): each continuation prefills a private copy of its prefix instead of forking."""
        counts = self._check_counts(counts, len(anchors), "counts")
        branches = []
        for i, (anchor, count) in enumerate(zip(anchors, counts)):
            uid, turn = int(anchor.uid), int(anchor.turn)
            if uid not in self._prefixes:
                raise ValueError(f"anchors[{i}]: trajectory uid {uid} is unknown or was released")
            records = self._turns[uid]
            if not 1 <= turn <= len(records):
                raise ValueError(f"anchors[{i}]: turn {turn} is not a branch point of trajectory {uid}, which "
                                 f"has {self._prefixes[uid].num_turns} turns (anchors are turns 1..{len(records)})")
            base, record = self._prefixes[uid], records[turn - 1]
            n = record.prefix_len
            for _ in range(count):
                env = self.env_factory()
                env.restore(record.snapshot, seed=self._fresh_seed())
                node, hidden = record.node, record.hidden
                if not share_prefix:
                    node = self.cache.new_root()
                    self._retained.append(node)
                    hidden = self.runner.extend([node], [base.token_ids[:n]])[0]
                branch = self._new_branch(base.prompt_id, env, node, base.token_ids[:n], base.model_mask[:n],
                                          base.logprobs[:n], base.turn_starts[:turn], (uid, turn), turn + 1, hidden)
                branch.turn_info = list(base.turn_info[:turn])
                branches.append(branch)
        return self._generate(branches)

    def reseed(self, seed: int) -> None:
        """Restart the sampling and env-seed streams from `seed` (a trainer reseeds every step, so a
        resumed run samples exactly what the uninterrupted run did)."""
        self._generator.manual_seed(int(seed))
        self._seeds = np.random.default_rng(int(seed))

    def release_all(self) -> None:
        for node in self._retained:
            if node in self.cache:
                self.cache.release(node)
        self._retained.clear()
        self._turns.clear()
        self._prefixes.clear()

    @property
    def tokens_run(self) -> int:
        """Tokens pushed through the model so far (prefill + decode)."""
        return self.runner.tokens_run

    # ------------------------------------------------------------------ generation loop
    def _new_branch(self, prompt_id, env, parent_node, tokens, mask, logprobs, turn_starts, branch_from, turn, hidden):
        branch = _Branch(uid=self._next_uid, prompt_id=prompt_id, env=env, node=self.cache.fork(parent_node),
                         tokens=list(tokens), mask=list(mask), logprobs=list(logprobs), turn_starts=list(turn_starts),
                         branch_from=branch_from, turn=turn)
        self._next_uid += 1
        branch.first_hidden = hidden
        # a continuation's turns 1..turn-1 are its anchor's: it can be expanded there too
        self._turns[branch.uid] = list(self._turns[branch_from[0]][: turn - 1]) if branch_from else []
        return branch

    def _generate(self, branches: list[_Branch]) -> list[EngineTrajectory]:
        results: dict[int, EngineTrajectory] = {}
        order = [b.uid for b in branches]
        generating, ended = [], []
        if branches:
            hidden = torch.stack([b.first_hidden for b in branches])
            self._sample_into(branches, hidden, generating, ended)
        while generating or ended:
            if ended:
                batch, ended = ended, []
                self._finish_turns(batch, results, generating, ended)
                continue
            batch, generating = generating, []
            hidden = self.runner.decode([b.node for b in batch], [b.pending for b in batch])
            self._sample_into(batch, hidden, generating, ended)
        return [results[uid] for uid in order]

    def _params(self, turn: int) -> SamplingParams:
        return self.sampling[min(turn, len(self.sampling)) - 1]

    def _sample_into(self, batch, hidden, generating, ended):
        params = [self._params(b.turn) for b in batch]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        tokens, logprobs = sample_tokens(self.runner.logits(hidden), temperature, top_p, self._generator)
        for b, p, tok, lp in zip(batch, params, tokens.tolist(), logprobs.tolist()):
            b.pending = tok
            b.turn_tokens.append(tok)
            b.turn_logprobs.append(lp)
            self.generated_tokens += 1
            (ended if self._turn_ends(b, p) else generating).append(b)

    def _turn_ends(self, b: _Branch, p: SamplingParams) -> bool:
        tok = b.turn_tokens[-1]
        if tok in p.stop_token_ids or tok in self.codec.eos_token_ids or len(b.turn_tokens) >= p.max_tokens:
            return True
        if p.stop_strings:
            tail = self.codec.decode(b.turn_tokens[-(max(map(len, p.stop_strings)) + 8):])
            return any(s in tail for s in p.stop_strings)
        return False

    def _finish_turns(self, batch, results, generating, ended):
        extend = []
        for b in batch:
            b.turn_starts.append(len(b.tokens))
            b.tokens.extend(b.turn_tokens)
            b.mask.extend([True] * len(b.turn_tokens))
            b.logprobs.extend(b.turn_logprobs)
            step = b.env.step(self.codec.decode(b.turn_tokens))
            b.turn_info.append(dict(step.info))
            obs = self.codec.encode_observation(step.observation) if step.observation else []
            self._check_tokens(obs, "observation (codec.encode_observation)")
            b.tokens.extend(obs)
            b.mask.extend([False] * len(obs))
            b.logprobs.extend([0.0] * len(obs))
            if step.done or b.turn >= b.env.max_turns:
                results[b.uid] = self._finalize(b, step.reward if step.done else None, bool(step.done))
            else:
                extend.append((b, [b.pending, *obs], b.env.snapshot()))
        if not extend:
            return
        hidden = self.runner.extend([b.node for b, _, _ in extend], [toks for _, toks, _ in extend])
        for (b, _, snapshot), h in zip(extend, hidden):
            self._turns[b.uid].append(_TurnRecord(b.node, h.clone(), snapshot, len(b.tokens)))
            turn_node = b.node
            b.node = self.cache.fork(turn_node)
            self._retained.append(turn_node)  # the handle from fork now keeps the turn node for expansion
            b.turn += 1
            b.turn_tokens, b.turn_logprobs, b.pending = [], [], None
        self._sample_into([b for b, _, _ in extend], hidden, generating, ended)

    def _finalize(self, b: _Branch, reward, finished) -> EngineTrajectory:
        traj = EngineTrajectory(uid=b.uid, prompt_id=b.prompt_id, token_ids=b.tokens, model_mask=b.mask,
                                logprobs=b.logprobs, turn_starts=b.turn_starts, reward=reward, finished=finished,
                                branch_from=b.branch_from, turn_info=b.turn_info)
        self.cache.release(b.node)  # the last turn is never a branch point: its pages go back now
        self._prefixes[b.uid] = traj
        return traj

    # ------------------------------------------------------------------ checks
    def _fresh_seed(self) -> int:
        return int(self._seeds.integers(0, 2**31 - 1))

    @staticmethod
    def _check_counts(counts, n, name) -> list[int]:
        counts = [c for c in counts]
        if len(counts) != n:
            raise ValueError(f"{name}: {len(counts)} counts for {n} items")
        if any(not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
            raise ValueError(f"{name}: must be non-negative integers, got {counts}")
        return [int(c) for c in counts]

    def _check_tokens(self, ids, field_name):
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"{field_name}: token ids {bad[:5]} are outside the model's vocab of {self.vocab_size}")
