"""TRACE rollouts as a verl agent loop: `actor_rollout_ref.rollout.agent.default_agent_loop=trace_agent`.

verl's `AgentLoopWorker.generate_sequences` runs one agent-loop `run()` per batch row (each prompt
repeated `rollout.n` times) and wants one `AgentLoopOutput` per row. TRACE decides over the whole batch,
so the rows of one `generate_sequences` call meet in a per-worker coordinator, which runs one TRACE step
for them and hands every row one leaf:

1. Stage 1: the R rows hold B distinct prompts (rows with the same `uid`, else the same `index`, are one
   prompt). R / (1 + N) bare rollouts are spread over the B prompts by the allocation's root strategy
   (uniform at cold start; `active` once the predictor is ready), N = `continuations_per_root`.
2. Bare rollouts, turn by turn through verl's LLM client (`server_manager.generate`): the env (a
   trace-rl env by name, the `Env` protocol) gets each action's text, its observation is appended, and
   the next request's prompt ids are the whole history.
3. Stage 2: each prompt's m_i * N continuations over the anchors (non-final turns) of its bare rollouts,
   by the prefix strategy, in `expansion_rounds` rounds (as trace-rl's trainer does). A continuation is a
   request whose prompt ids are exactly the anchor's prefix, so vLLM's / SGLang's prefix caches (and
   `PagedTreeLLMClient`'s) compute the shared prefix once; the env resumes from the anchor's snapshot.
4. The R leaves go to the R rows, a row first getting a leaf of its own prompt. Each row's output is
   the leaf's prompt and path (model tokens masked 1, observations 0), its sampling logprobs, the env's
   reward as `reward_score`, and in `extra_fields`: `trace_uid` (the tree, see advantage.py: with
   `adopt_tree_uids` it becomes the row's uid for `tree_grpo` / `segment`), `trace_group` (the leaf's
   prompt), `trace_leaf` (its forest node), `trace_bare` (a bare rollout, or a continuation).

The predictor: verl's rollout servers expose no hidden states, so the loop uses a predictor that reads
prefix tokens, built by the `predictor` factory named in the config (`fn(tokenizer)`) and trained online
in the worker on each step's subtree success rates: `trace_core.predictor:token_predictor` (the MLP head
on hashed token n-grams, cheap) or one returning an `EncoderPredictor` (a separate small model). Without
one the loop allocates uniformly (TRACE's cold start) every step.

Config: the trainer config's `trace_agent` section (add it with `+trace_agent.key=value`), see
`TraceLoopConfig`. Each row's task record (what the env's `reset` takes) is the dataset's
`extra_info["trace_task"]` (or a `trace_task` column).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from trace_core.allocation import build_allocation
from trace_core.envs import make_env
from trace_core.errors import TraceError
from trace_core.forest import RolloutForest
from trace_core.integrations.verl.rows import leaf_row
from trace_core.model.codec import HFTextCodec
from trace_core.predictor import PrefixBatch, training_targets
from trace_core.train.expansion import prefix_budgets, round_shares, turn_prefixes

CUTOFF_REWARD = 0.0  # an episode cut at the env's turn limit or at rollout.response_length counts as failed


@dataclass
class TraceLoopConfig:
    """The `trace_agent` section of verl's trainer config."""

    env: str = "gridworld"  # a registered trace-rl env
    env_kwargs: dict = field(default_factory=dict)
    mode: str = "trace"  # allocation mode (trace, uniform, random_tree, pcl, or a registered one)
    continuations_per_root: int = 1  # N: each bare rollout buys N continuations
    m_min: int = 2
    m_max: int | None = None
    k_max: int | None = None
    eps: float = 0.02
    expansion_rounds: int = 1
    max_tokens_per_turn: int = 64
    stop_token_ids: list = field(default_factory=list)  # end a turn (besides the tokenizer's EOS)
    chat_template: bool = False  # wrap the env's prompt as one user message
    observation_template: str = "{observation}"
    # "module:function", fn(tokenizer) -> a predictor reading tokens, e.g. trace_core.predictor:token_predictor
    predictor: str | None = None
    seed: int = 0

    @classmethod
    def from_trainer_config(cls, config: Any) -> TraceLoopConfig:
        section = config.get("trace_agent", None) if hasattr(config, "get") else None
        if section is None:
            return cls()
        try:
            from omegaconf import OmegaConf

            section = OmegaConf.to_container(section, resolve=True)
        except (ImportError, ValueError):
            section = dict(section)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise TraceError("trace_agent", f"unknown keys {unknown}; known: {sorted(known)}")
        return cls(**section)


@dataclass
class _Row:
    kwargs: dict
    sampling_params: dict
    future: asyncio.Future


@dataclass
class _Turn:
    action: list[int]
    logprobs: list[float]
    observation: list[int]
    snapshot: Any  # env state after the turn (None: the episode ended here)


@dataclass
class _Anchor:
    tokens: list[int]  # prompt + turns up to here: the prompt ids a continuation is requested with
    snapshot: Any
    turn: int
    response_length: int  # tokens after the prompt


def _task_of(kwargs: Mapping[str, Any]) -> Any:
    if "trace_task" in kwargs:
        return kwargs["trace_task"]
    extra = kwargs.get("extra_info")
    if isinstance(extra, Mapping) and "trace_task" in extra:
        return extra["trace_task"]
    raise TraceError("trace_task", "each row needs its env task in extra_info['trace_task'] (or a trace_task column)")


def _prompt_key(kwargs: Mapping[str, Any], row: int) -> str:
    for name in ("uid", "index"):
        if name in kwargs and kwargs[name] is not None:
            return f"{name}:{kwargs[name]}"
    return f"row:{row}"


class TraceCoordinator:
    """One per (LLM client, event loop): gathers the rows of a batch and runs a TRACE step for them."""

    def __init__(self, loop: TraceAgentLoop):
        self.cfg: TraceLoopConfig = loop.trace_config
        self.client = loop.server_manager
        self.response_length = int(loop.rollout_config.response_length)
        self.prompt_length = int(loop.rollout_config.prompt_length)
        tokenizer = loop.tokenizer
        self.codec = HFTextCodec(
            tokenizer, chat_template=self.cfg.chat_template, observation_template=self.cfg.observation_template
        )
        self.stop_token_ids = sorted({*map(int, self.cfg.stop_token_ids), *self.codec.eos_token_ids})
        self.allocation = build_allocation(self.cfg.mode)
        self.predictor = None
        if self.cfg.predictor:
            module, _, name = self.cfg.predictor.partition(":")
            self.predictor = getattr(importlib.import_module(module), name)(tokenizer)
        self.pending: list[_Row] = []
        self.collecting: asyncio.Task | None = None
        self.step = 0
        self.last_metrics: dict[str, float] = {}

    async def submit(self, sampling_params: dict, kwargs: dict) -> AgentLoopOutput:
        row = _Row(dict(kwargs), dict(sampling_params), asyncio.get_running_loop().create_future())
        self.pending.append(row)
        if self.collecting is None:
            self.collecting = asyncio.get_running_loop().create_task(self._collect())
        return await row.future

    async def _collect(self) -> None:
        # AgentLoopWorker creates every row's task before awaiting them: once the row count stops
        # growing for a few loop iterations, the batch is complete
        seen, stable = -1, 0
        while stable < 3:
            await asyncio.sleep(0)
            stable = stable + 1 if len(self.pending) == seen else 0
            seen = len(self.pending)
        rows, self.pending, self.collecting = self.pending, [], None
        try:
            outputs = await self.run_step(rows)
        except BaseException as err:
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(err)
            return
        for row, out in zip(rows, outputs):
            row.future.set_result(out)

    # ------------------------------------------------------------------ one TRACE step
    async def run_step(self, rows: list[_Row]) -> list[AgentLoopOutput]:
        cfg, start_time = self.cfg, time.perf_counter()
        rng = np.random.default_rng([cfg.seed, self.step])
        self.step += 1
        keys = [_prompt_key(r.kwargs, i) for i, r in enumerate(rows)]
        candidates = list(dict.fromkeys(keys))
        tasks = [_task_of(rows[keys.index(k)].kwargs) for k in candidates]
        n_cont = int(cfg.continuations_per_root)
        informed = self.allocation.uses_predictor and self.predictor is not None and self.predictor.ready
        allocation = self.allocation if informed else self.allocation.cold()
        if allocation.expands and len(rows) % (1 + n_cont):
            raise TraceError(
                "trace_agent.continuations_per_root",
                f"{len(rows)} rows per batch is not a multiple of 1 + N = {1 + n_cont} (rows = prompts x rollout.n)",
            )
        sampling = rows[0].sampling_params
        forest = RolloutForest()
        anchors: dict[int, _Anchor] = {}

        # prompts: one env reset each; their roots are made when first used
        prompts = []
        for i, task in enumerate(tasks):
            env = make_env(cfg.env, **cfg.env_kwargs)
            tokens = list(self.codec.encode_prompt(env.reset(task, seed=int(rng.integers(2**31 - 1)))))
            if len(tokens) > self.prompt_length:
                raise TraceError(f"tasks[{i}]", f"prompt of {len(tokens)} tokens > rollout.prompt_length")
            prompts.append(_Anchor(tokens, env.snapshot(), 0, 0))

        # Stage 1
        v = self._predict([p.tokens for p in prompts], [0] * len(prompts)) if informed else np.full(len(tasks), 0.5)
        budget = allocation.bare_budget(len(rows) // (1 + n_cont), n_cont)
        counts = np.asarray(
            allocation.root(v, budget, m_min=cfg.m_min, m_max=cfg.m_max, eps=cfg.eps, rng=rng), dtype=np.int64
        )
        # bare rollouts
        starts = [(i, None) for i in range(len(tasks)) for _ in range(int(counts[i]))]
        episodes = await asyncio.gather(*(self._episode(prompts[i], sampling, rng) for i, _ in starts))
        roots: dict[int, int] = {}
        fresh = []
        for (i, _), episode in zip(starts, episodes):
            if i not in roots:
                roots[i] = forest.add_root(i, prompts[i].tokens)
                anchors[roots[i]] = prompts[i]
            fresh += self._write(forest, anchors, roots[i], prompts[i], episode)
        bare_leaves = set(forest.leaves.tolist())

        # Stage 2 (as trace_core.train.expansion.expand_prefixes, with awaited rollouts)
        total = allocation.continuation_budget(counts, n_cont)
        if total.any():
            for share in round_shares(total, cfg.expansion_rounds):
                points = turn_prefixes(forest, np.asarray(fresh, dtype=np.int64))
                if not points.size:
                    points = turn_prefixes(forest, np.arange(forest.num_nodes))
                if not points.size:
                    break
                outcome = forest.reward[forest.episode_leaf(points)]
                p = (
                    self._predict([anchors[int(a)].tokens for a in points], forest.depth[points].tolist())
                    if informed
                    else np.full(points.size, 0.5)
                )
                group = forest.prompt_id[points]
                round_budget, _ = prefix_budgets(share, group)
                k = allocation.prefix(p, outcome, group, round_budget, k_max=cfg.k_max, eps=cfg.eps, rng=rng)
                jobs = [int(a) for a, c in zip(points, k) for _ in range(int(c))]
                episodes = await asyncio.gather(*(self._episode(anchors[a], sampling, rng) for a in jobs))
                fresh = []
                for a, episode in zip(jobs, episodes):
                    fresh += self._write(forest, anchors, a, anchors[a], episode)

        leaves = forest.leaves
        if leaves.size != len(rows):
            raise TraceError("trace_agent", f"the step sampled {leaves.size} leaves for {len(rows)} rows")
        if self.predictor is not None:
            self._observe(forest, anchors)
        self.last_metrics = {
            "trace/effective_ratio": float(forest.effective_ratio()),
            "trace/active_prompts": float((counts > 0).sum()),
            "trace/predictor_informed": float(informed),
        }
        return self._outputs(rows, keys, candidates, forest, bare_leaves, time.perf_counter() - start_time)

    async def _episode(self, start: _Anchor, sampling: dict, rng: np.random.Generator):
        """One episode from `start` (a prompt or an anchor) to its end: (turns, reward, finished)."""
        env = make_env(self.cfg.env, **self.cfg.env_kwargs)
        env.restore(start.snapshot, seed=int(rng.integers(2**31 - 1)))
        tokens, turn, used, turns = list(start.tokens), start.turn, start.response_length, []
        while True:
            turn += 1
            params = {
                **sampling,
                "max_tokens": max(1, min(self.cfg.max_tokens_per_turn, self.response_length - used)),
                "stop_token_ids": self.stop_token_ids,
            }
            out = await self.client.generate(request_id=uuid.uuid4().hex, prompt_ids=tokens, sampling_params=params)
            action = list(out.token_ids)
            logprobs = list(out.log_probs) if out.log_probs else [math.nan] * len(action)
            step = env.step(self.codec.decode(action))
            used += len(action)
            obs = list(self.codec.encode_observation(step.observation)) if step.observation and not step.done else []
            if step.done or turn >= env.max_turns or used + len(obs) >= self.response_length:
                reward = float(step.reward) if step.done and step.reward is not None else CUTOFF_REWARD
                turns.append(_Turn(action, logprobs, [], None))
                return turns, reward, bool(step.done)
            turns.append(_Turn(action, logprobs, obs, env.snapshot()))
            tokens += action + obs
            used += len(obs)

    @staticmethod
    def _write(forest, anchors, parent: int, start: _Anchor, episode) -> list[int]:
        turns, reward, _ = episode
        tokens, used, nodes = list(start.tokens), start.response_length, []
        for t, turn in enumerate(turns, start=start.turn + 1):
            ids = turn.action + turn.observation
            mask = [True] * len(turn.action) + [False] * len(turn.observation)
            parent = forest.add_node(parent, ids, mask, turn.logprobs + [0.0] * len(turn.observation))
            nodes.append(parent)
            tokens, used = tokens + ids, used + len(ids)
            if turn.snapshot is not None:
                anchors[parent] = _Anchor(list(tokens), turn.snapshot, t, used)
        forest.set_reward(parent, reward)
        return nodes

    # ------------------------------------------------------------------ the predictor (token features)
    def _predict(self, token_lists: list[list[int]], depth: list[int]) -> np.ndarray:
        return np.asarray(self.predictor.predict(self._batch(token_lists, depth)), dtype=np.float64)

    @staticmethod
    def _batch(token_lists, depth) -> PrefixBatch:
        return PrefixBatch(
            depth=torch.as_tensor(depth, dtype=torch.long),
            prefix_len=torch.as_tensor([len(t) for t in token_lists], dtype=torch.long),
            token_ids=[np.asarray(t, dtype=np.int64) for t in token_lists],
        )

    def _observe(self, forest: RolloutForest, anchors: dict[int, _Anchor]) -> None:
        nodes, targets, weights = training_targets(forest)
        keep = [i for i, u in enumerate(nodes) if int(u) in anchors]
        if keep:
            nodes = nodes[keep]
            batch = self._batch([anchors[int(u)].tokens for u in nodes], forest.depth[nodes].tolist())
            self.predictor.observe(batch, targets[keep], weights[keep])

    # ------------------------------------------------------------------ rows
    def _outputs(self, rows, keys, candidates, forest, bare_leaves, seconds) -> list[AgentLoopOutput]:
        by_prompt: dict[int, list[int]] = {}
        for leaf in forest.leaves.tolist():
            by_prompt.setdefault(int(forest.prompt_id[leaf]), []).append(leaf)
        assigned: list[int | None] = [None] * len(rows)
        for r, key in enumerate(keys):  # a row's own prompt first
            own = by_prompt.get(candidates.index(key))
            if own:
                assigned[r] = own.pop(0)
        rest = [leaf for leaves in by_prompt.values() for leaf in leaves]
        for r in range(len(rows)):
            if assigned[r] is None:
                assigned[r] = rest.pop(0)
        outputs = []
        for leaf in assigned:
            group = candidates[int(forest.prompt_id[leaf])]
            row = leaf_row(forest, leaf, group)
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=row.prompt_ids,
                    response_ids=row.response_ids,
                    response_mask=row.response_mask,
                    response_logprobs=row.response_logprobs,
                    reward_score=row.reward,
                    num_turns=1 + 2 * len(row.path),
                    metrics=AgentLoopMetrics(generate_sequences=seconds),
                    extra_fields={
                        "trace_uid": row.uid,
                        "trace_group": group,
                        "trace_leaf": int(leaf),
                        "trace_bare": leaf in bare_leaves,
                        "turn_scores": [],
                        "tool_rewards": [],
                    },
                )
            )
        return outputs


_COORDINATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@register("trace_agent")
class TraceAgentLoop(AgentLoopBase):
    """verl agent loop running TRACE over the whole batch (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace_config = TraceLoopConfig.from_trainer_config(self.config)

    def coordinator(self) -> TraceCoordinator:
        loop = asyncio.get_running_loop()
        per_loop = _COORDINATORS.setdefault(loop, {})
        key = id(self.server_manager)
        if key not in per_loop:
            per_loop[key] = TraceCoordinator(self)
        return per_loop[key]

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> AgentLoopOutput:
        return await self.coordinator().submit(sampling_params, kwargs)
