"""The built-in rollout engine: any HF causal LM over the paged tree KV cache, writing a RolloutForest.

Flow of one call (rollout or expand):
- every live branch holds a *pending* token (sampled, not yet in the cache) and a KV node of its
  own; one batched decode step feeds all pending tokens and samples the next ones;
- when a branch's turn ends (stop id / stop string / max tokens), the env gets the action text; if
  the episode goes on, the pending token and the observation tokens are prefilled into the
  branch's KV node (all such branches in one extend pass), which becomes the turn's *prefix node*
  (frozen, retained with the env's snapshot and the last hidden state), and the next turn starts in
  a fresh child KV node;
- when every branch of the call has ended, its turns are appended to the forest in request order
  (a root for each prompt the first time it is used), each leaf gets its reward, and every non-final
  turn node is remembered as an anchor: `expand` forks new KV children off it (the prefix is neither
  recomputed nor copied), samples the first token from the retained hidden state and restores the
  env from the snapshot with a fresh seed.

Prompts are prefilled once (`prefill`); every rollout of a prompt forks its KV node, and each
copy's env is restored from the prompt's snapshot with its own seed. The hidden state at the last
token of every prompt and turn prefix is kept for the predictor (`hidden_states`), so nothing is
recomputed to predict. Everything retained stays until `release_all()`.

Sampling streams (`streams`). "batch" (the default): every sequence of a decode batch samples from one
torch.Generator and env seeds come from one stream, in batch order, so an episode's randomness depends on
which other episodes share the process. "episode": each episode samples from a generator of its own and
gets its env seed from the same key, derived from (the reseed value, the prompt id, the rollout's index
at its prompt, and for a continuation its anchor's key and index there); an episode then samples the same
tokens whichever process runs it and whatever else is in its batch, which is what lets N processes that
split a step's prompts reproduce one process (trace_core/train/distributed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trace_core.envs.base import Env, step_all
from trace_core.forest import RolloutForest
from trace_core.model.codec import TextCodec
from trace_core.rollout.paged_runner import HFPagedRunner
from trace_core.rollout.protocol import Generated, Prompts, SamplingParams
from trace_core.rollout.sampling import sample_tokens, sample_tokens_per_row

DEFAULT_SAMPLING = SamplingParams()
STREAMS = ("batch", "episode")
CUTOFF_REWARD = 0.0  # an episode the env did not end (cut at env.max_turns) counts as failed


@dataclass
class _Prefix:
    """A retained prefix (a prompt, or a prompt and turns 1..t): what a branch can start from."""

    kv_node: int  # KV node holding the prefix (retained)
    hidden: torch.Tensor  # [H] hidden state of its last token
    snapshot: Any  # env state at its end
    length: int  # tokens from the prompt's first to the prefix's last
    turn: int  # turns in the prefix (0 for a prompt)
    key: tuple[int, ...] = ()  # "episode" streams: (prompt id, rollout index, turn, continuation index, ...)
    started: int = 0  # "episode" streams: branches started from this prefix so far (the next one's index)


@dataclass
class _Turn:
    tokens: list[int]
    logprobs: list[float]
    observation: list[int]
    prefix: _Prefix | None  # retained if the episode went on after this turn


@dataclass
class _Branch:
    """One episode being generated, from `start` (a prompt or an anchor turn) on."""

    env: Env
    start: _Prefix
    parent: int | None  # forest node the first new turn hangs under (None: the prompt's root, made lazily)
    prompt: int  # index of the prefilled prompt
    kv_node: int  # KV node the current turn is written into
    turn: int  # the turn being generated (1-based)
    length: int  # tokens so far (prefix + finished turns)
    first_hidden: torch.Tensor
    pending: int | None = None
    turn_tokens: list[int] = field(default_factory=list)
    turn_logprobs: list[float] = field(default_factory=list)
    turns: list[_Turn] = field(default_factory=list)
    reward: float | None = None
    finished: bool = False
    final_info: Mapping[str, Any] = field(default_factory=dict)  # the env's info on the last turn
    key: tuple[int, ...] = ()  # "episode" streams: what seeds this episode
    generator: torch.Generator | None = None  # "episode" streams: this episode's sampling stream


class HFRolloutEngine:
    """RolloutEngine over a Hugging Face causal LM (see module doc).

    model          a Llama / Qwen2 / Qwen3 style `*ForCausalLM` (eval mode is set)
    codec          TextCodec (e.g. HFTextCodec(tokenizer))
    env_factory    () -> Env, a fresh environment instance
    sampling       SamplingParams for every turn, or a sequence indexed by turn (the last repeats)
    num_pages, page_size   KV cache size
    decode_backend None (auto), "triton" or "cpu" for the decode attention
    kv_dtype       dtype of the KV cache; None = the parameter dtype (fp32 master weights under
                   autocast: the compute dtype, and call the engine inside the autocast)
    seed           seeds sampling and the env seeds
    streams        "batch" (one sampling stream per process) or "episode" (one per episode; module doc)
    """

    def __init__(
        self,
        model,
        codec: TextCodec,
        env_factory: Callable[[], Env],
        *,
        sampling: SamplingParams | Sequence[SamplingParams] = DEFAULT_SAMPLING,
        num_pages: int = 4096,
        page_size: int = 16,
        decode_backend: str | None = None,
        kv_dtype: torch.dtype | None = None,
        seed: int = 0,
        streams: str = "batch",
    ):
        if streams not in STREAMS:
            raise ValueError(f"streams: must be one of {STREAMS}, got {streams!r}")
        self.streams = streams
        self.sampling = [sampling] if isinstance(sampling, SamplingParams) else list(sampling)
        if not self.sampling or not all(isinstance(p, SamplingParams) for p in self.sampling):
            raise ValueError("sampling: must be a SamplingParams or a non-empty sequence of them")
        model.eval()
        self.runner = HFPagedRunner(
            model, num_pages=num_pages, page_size=page_size, decode_backend=decode_backend, kv_dtype=kv_dtype
        )
        self.cache = self.runner.cache
        self.codec, self.env_factory = codec, env_factory
        self.vocab_size = int(model.config.vocab_size)
        self._generator = torch.Generator(device=self.runner.device)
        self._oracle_generator = torch.Generator(device=self.runner.device)
        self.reseed(seed)
        self._prompts: list[tuple[_Prefix, int, list[int]]] = []  # prefilled: (prefix, prompt_id, tokens)
        self._forest: RolloutForest | None = None  # the forest the retained nodes belong to
        self._root_of: dict[int, int] = {}  # prefilled prompt -> its root node in that forest
        self._anchors: dict[int, _Prefix] = {}  # forest node -> retained prefix (roots and non-final turns)
        self._retained: list[int] = []  # KV node handles held until release_all
        self.generated_tokens = 0
        self.oracle_tokens = 0  # sampled by success_rates (analysis; outside every budget)

    # ------------------------------------------------------------------ public API
    def prefill(self, tasks: Sequence[Mapping[str, Any]], prompt_ids: Sequence[int] | None = None) -> Prompts:
        prompt_ids = list(range(len(tasks))) if prompt_ids is None else [int(p) for p in prompt_ids]
        if len(prompt_ids) != len(tasks):
            raise ValueError(f"prompt_ids: {len(prompt_ids)} ids for {len(tasks)} tasks")
        encoded, snapshots = [], []
        for i, task in enumerate(tasks):
            env = self.env_factory()
            if self.streams == "episode":  # keyed by the prompt id, not by its place in this process's batch
                reset_seed = self._keyed_seeds(1, (prompt_ids[i],))[1]
            else:
                reset_seed = self._fresh_seed(self._reset_seeds)
            prompt = self.codec.encode_prompt(env.reset(task, seed=reset_seed))
            self._check_tokens(prompt, "prompt (codec.encode_prompt)")
            if not prompt:
                raise ValueError(f"tasks[{i}]: the prompt encodes to no tokens (codec.encode_prompt)")
            encoded.append(list(prompt))
            snapshots.append(env.snapshot())
        kv_nodes = [self.cache.new_root() for _ in tasks]
        self._retained.extend(kv_nodes)
        hidden = self.runner.extend(kv_nodes, encoded) if tasks else torch.zeros(0, 1)
        handles = []
        for kv, tokens, snapshot, h, pid in zip(kv_nodes, encoded, snapshots, hidden, prompt_ids):
            handles.append(len(self._prompts))
            self._prompts.append((_Prefix(kv, h.clone(), snapshot, len(tokens), 0, key=(pid,)), pid, tokens))
        return Prompts(
            prompt_ids=np.asarray(prompt_ids, dtype=np.int64),
            token_ids=encoded,
            hidden=hidden.detach().float().cpu(),
            handles=tuple(handles),
        )

    def rollout(self, forest: RolloutForest, prompts: Prompts, counts: Sequence[int]) -> Generated:
        counts = self._check_counts(counts, len(prompts), "counts")
        self._bind(forest)
        branches = []
        for handle, count in zip(prompts.handles, counts):
            if not 0 <= handle < len(self._prompts):
                raise ValueError("prompts: were prefilled before the last release_all(); prefill them again")
            prefix = self._prompts[handle][0]
            branches += [self._new_branch(prefix, None, handle) for _ in range(count)]
        return self._generate(branches)

    def expand(
        self, forest: RolloutForest, anchors: Sequence[int], counts: Sequence[int], *, share_prefix: bool = True
    ) -> Generated:
        """counts[a] continuations of anchors[a]. share_prefix=False is the no-sharing ablation (for
        benchmarks): each continuation prefills a private copy of its prefix instead of forking."""
        counts = self._check_counts(counts, len(anchors), "counts")
        self._bind(forest)
        branches = []
        for i, (anchor, count) in enumerate(zip(anchors, counts)):
            node = int(anchor)
            prefix = self._anchors.get(node)
            if prefix is None or prefix.turn == 0:
                raise ValueError(
                    f"anchors[{i}]: node {node} is not a non-final turn this engine wrote into the "
                    f"forest (or it was released); anchors are turn prefixes, never roots or leaves"
                )
            for _ in range(count):
                start = prefix
                if not share_prefix:
                    kv = self.cache.new_root()
                    self._retained.append(kv)
                    path = forest.leaf_path(node)
                    tokens = np.concatenate([forest.node_tokens(u) for u in path]).tolist()
                    start = _Prefix(
                        kv, self.runner.extend([kv], [tokens])[0], prefix.snapshot, prefix.length, prefix.turn
                    )
                branches.append(self._new_branch(start, node, -1, key_from=prefix))
        return self._generate(branches)

    def success_rates(
        self,
        *,
        samples: int,
        prompts: Prompts | None = None,
        forest: RolloutForest | None = None,
        nodes: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Monte-Carlo P(reward = 1) from each prompt (`prompts`) or each root / turn node this engine wrote
        (`forest`, `nodes`): the mean reward of `samples` fresh episodes from it. For analysis (the oracle
        predictor): the episodes enter no forest, their tokens count in `oracle_tokens`, not
        `generated_tokens`, and they draw from sampling and env-seed streams of their own, so the
        training rollouts sample exactly what they would have without them."""
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples: must be an integer >= 1, got {samples!r}")
        if (prompts is None) == (nodes is None):
            raise ValueError("success_rates: give prompts, or forest and nodes")
        if prompts is not None:
            starts = [(self._prompts[h][0], h) for h in prompts.handles]
        else:
            assert forest is not None
            self._bind(forest)
            starts = []
            for i, node in enumerate(np.asarray(nodes, dtype=np.int64).reshape(-1)):
                if int(node) not in self._anchors:
                    raise ValueError(f"nodes[{i}]: node {int(node)} is not a root or non-final turn this engine wrote")
                starts.append((self._anchors[int(node)], -1))
        streams = (self._generator, self._seeds, self.generated_tokens)
        self._generator, self._seeds = self._oracle_generator, self._oracle_seeds
        try:
            branches = [
                self._new_branch(prefix, -1, handle, keyed=False) for prefix, handle in starts for _ in range(samples)
            ]
            rewards = self._generate(branches, write=False)
        finally:
            self.oracle_tokens += self.generated_tokens - streams[2]
            self._generator, self._seeds, self.generated_tokens = streams
        return rewards.reshape(len(starts), samples).mean(axis=1) if starts else np.zeros(0)

    def hidden_states(self, nodes: Sequence[int]) -> torch.Tensor:
        rows = []
        for node in np.asarray(nodes, dtype=np.int64).reshape(-1):
            prefix = self._anchors.get(int(node))
            if prefix is None:
                raise ValueError(
                    f"nodes: node {int(node)} is not a root or non-final turn this engine wrote (or it was released)"
                )
            rows.append(prefix.hidden)
        if not rows:
            return torch.zeros(0, self.runner.model.config.hidden_size)
        return torch.stack(rows).float().cpu()

    def reseed(self, seed: int) -> None:
        """Restart the sampling and env-seed streams from `seed` (a trainer reseeds every step, so a
        resumed run samples exactly what the uninterrupted run did)."""
        self._generator.manual_seed(int(seed))
        self._stream_seed = int(seed)  # "episode" streams derive every episode's seeds from it and the key
        self._seeds = np.random.default_rng(int(seed))
        # prompts are reset from their own stream: prefilling a candidate the allocation then drops
        # must not shift the seeds of the rollouts that run
        self._reset_seeds = np.random.default_rng([int(seed), 1])
        # the oracle's Monte-Carlo episodes (success_rates) sample from streams of their own
        self._oracle_generator.manual_seed(int(np.random.default_rng([int(seed), 2]).integers(2**62)))
        self._oracle_seeds = np.random.default_rng([int(seed), 3])

    def release_all(self) -> None:
        for node in self._retained:
            if node in self.cache:
                self.cache.release(node)
        self._retained.clear()
        self._prompts.clear()
        self._anchors.clear()
        self._root_of.clear()
        self._forest = None

    @property
    def tokens_run(self) -> int:
        """Tokens pushed through the model so far (prefill + decode)."""
        return self.runner.tokens_run

    # ------------------------------------------------------------------ generation loop
    def _bind(self, forest: RolloutForest) -> None:
        if self._forest is not None and self._forest is not forest:
            raise ValueError("forest: this engine holds nodes of another forest; call release_all() first")
        self._forest = forest

    def _new_branch(
        self, start: _Prefix, parent: int | None, prompt: int, *, keyed: bool = True, key_from: _Prefix | None = None
    ) -> _Branch:
        """A branch from `start`. With "episode" streams (and `keyed`: the oracle's episodes are not, so they
        never shift the training episodes' indices) its key is its start's key and the start's next index
        (`key_from`: the prefix whose key and count to use, when `start` is a private copy of it)."""
        env = self.env_factory()
        key, generator = (), None
        if keyed and self.streams == "episode":
            origin = key_from or start
            key = (*origin.key, origin.started)
            origin.started += 1
            torch_seed, env_seed = self._keyed_seeds(2, key)
            generator = torch.Generator(device=self.runner.device).manual_seed(torch_seed)
        else:
            env_seed = self._fresh_seed()
        env.restore(start.snapshot, seed=env_seed)
        return _Branch(
            key=key,
            generator=generator,
            env=env,
            start=start,
            parent=parent,
            prompt=prompt,
            kv_node=self.cache.fork(start.kv_node),
            turn=start.turn + 1,
            length=start.length,
            first_hidden=start.hidden,
        )

    def _generate(self, branches: list[_Branch], *, write: bool = True):
        """Run every branch to the end of its episode; write them into the forest (-> Generated), or with
        write=False only return their rewards [k]."""
        generating: list[_Branch] = []
        ended: list[_Branch] = []
        if branches:
            self._sample_into(branches, torch.stack([b.first_hidden for b in branches]), generating, ended)
        while generating or ended:
            if ended:
                batch, ended = ended, []
                self._finish_turns(batch, generating, ended)
                continue
            batch, generating = generating, []
            hidden = self.runner.decode([b.kv_node for b in batch], [b.pending for b in batch])
            self._sample_into(batch, hidden, generating, ended)
        if not write:
            return np.array([b.reward for b in branches], dtype=np.float64)
        return self._write(branches)

    def _params(self, turn: int) -> SamplingParams:
        return self.sampling[min(turn, len(self.sampling)) - 1]

    def _sample_into(self, batch, hidden, generating, ended):
        params = [self._params(b.turn) for b in batch]
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        logits = self.runner.logits(hidden)
        if batch and batch[0].generator is not None:  # "episode" streams (a batch never mixes the two kinds)
            tokens, logprobs = sample_tokens_per_row(logits, temperature, top_p, [b.generator for b in batch])
        else:
            tokens, logprobs = sample_tokens(logits, temperature, top_p, self._generator)
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
            tail = self.codec.decode(b.turn_tokens[-(max(map(len, p.stop_strings)) + 8) :])
            return any(s in tail for s in p.stop_strings)
        return False

    def _finish_turns(self, batch, generating, ended):
        extend = []
        # every episode whose turn ended in this round steps together: batched tools serve them at once
        steps = step_all([b.env for b in batch], [self.codec.decode(b.turn_tokens) for b in batch])
        for b, step in zip(batch, steps):
            obs = self.codec.encode_observation(step.observation) if step.observation else []
            self._check_tokens(obs, "observation (codec.encode_observation)")
            b.turns.append(_Turn(b.turn_tokens, b.turn_logprobs, list(obs), None))
            b.length += len(b.turn_tokens) + len(obs)
            if step.done or b.turn >= b.env.max_turns:
                b.finished, b.final_info = bool(step.done), dict(step.info)
                b.reward = float(step.reward) if step.done and step.reward is not None else CUTOFF_REWARD
                self.cache.release(b.kv_node)  # the last turn is never a branch point: its pages go back now
            else:
                extend.append((b, [b.pending, *obs], b.env.snapshot()))
        if not extend:
            return
        hidden = self.runner.extend([b.kv_node for b, _, _ in extend], [toks for _, toks, _ in extend])
        for (b, _, snapshot), h in zip(extend, hidden):
            b.turns[-1].prefix = _Prefix(b.kv_node, h.clone(), snapshot, b.length, b.turn, key=(*b.key, b.turn))
            self._retained.append(b.kv_node)  # the handle from fork now keeps the turn node for expansion
            b.kv_node = self.cache.fork(b.kv_node)
            b.turn += 1
            b.turn_tokens, b.turn_logprobs, b.pending = [], [], None
        self._sample_into([b for b, _, _ in extend], hidden, generating, ended)

    def _write(self, branches: list[_Branch]) -> Generated:
        """Append every episode's turns to the forest, in request order."""
        forest = self._forest
        assert forest is not None
        nodes, leaves = [], []
        for b in branches:
            parent = b.parent
            if parent is None:  # a bare rollout: its prompt's root, made the first time it is used
                if b.prompt not in self._root_of:
                    prefix, prompt_id, tokens = self._prompts[b.prompt]
                    root = forest.add_root(prompt_id, tokens)
                    self._root_of[b.prompt] = root
                    self._anchors[root] = prefix
                    nodes.append(root)
                parent = self._root_of[b.prompt]
            for turn in b.turns:
                tokens = turn.tokens + turn.observation
                mask = [True] * len(turn.tokens) + [False] * len(turn.observation)
                parent = forest.add_node(parent, tokens, mask, turn.logprobs + [0.0] * len(turn.observation))
                nodes.append(parent)
                if turn.prefix is not None:
                    self._anchors[parent] = turn.prefix
            forest.set_reward(parent, b.reward)
            leaves.append(parent)
        return Generated(
            nodes=np.asarray(nodes, dtype=np.int64),
            leaves=np.asarray(leaves, dtype=np.int64),
            finished=np.array([b.finished for b in branches], dtype=bool),
            info=tuple(b.final_info for b in branches),
        )

    # ------------------------------------------------------------------ checks
    def _keyed_seeds(self, kind: int, key: tuple[int, ...]) -> tuple[int, int]:
        """(torch seed, env seed) of an "episode" stream: a pure function of the reseed value, the kind
        (1: a prompt's reset, 2: an episode) and the key, whichever process or batch the episode is in."""
        state = np.random.SeedSequence([self._stream_seed, kind, len(key), *map(int, key)]).generate_state(2, np.uint64)
        return int(state[0] >> np.uint64(1)), int(state[1] % np.uint64(2**31 - 1))

    def _fresh_seed(self, stream: np.random.Generator | None = None) -> int:
        return int((stream or self._seeds).integers(0, 2**31 - 1))

    @staticmethod
    def _check_counts(counts, n, name) -> list[int]:
        counts = list(counts)
        if len(counts) != n:
            raise ValueError(f"{name}: {len(counts)} counts for {n} items")
        if any(not isinstance(c, (int, np.integer)) or c < 0 for c in counts):
            raise ValueError(f"{name}: must be non-negative integers, got {counts}")
        return [int(c) for c in counts]

    def _check_tokens(self, ids, field_name):
        bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"{field_name}: token ids {bad[:5]} are outside the model's vocab of {self.vocab_size}")
