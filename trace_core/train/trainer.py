"""The TRACE trainer: one step of METHOD.md, top to bottom.

    step = Stage 1 (roots) -> bare rollouts -> Stage 2 (prefixes) -> continuations -> rewards
           -> predictor update -> advantages -> packed tree forward -> fused logprob
           -> packed loss -> optimizer step

Every mode (`trace`, `uniform`, `random_tree`, `pcl`) samples the same number of leaves per step.
The run directory holds config.yaml, metrics.jsonl (one JSON object per step / eval), and atomic
checkpoints; `resume=True` continues a run exactly where its latest checkpoint left it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trace_core.train import checkpoint as ckpt
from trace_core.advantage import compute_advantages
from trace_core.allocation import get_allocator
from trace_core.train.config_loader import ConfigError, save_config, to_dict
from trace_core.rollout import Anchor, EngineTrajectory, HFRolloutEngine, SamplingParams, to_forest_trajectories
from trace_core.rollout.paged_runner import kv_geometry
from trace_core.envs import make_env, make_task_source
from trace_core.model.tree_forward import tree_forward
from trace_core.rollout.kv_cache import CacheCapacityError, page_bytes
from trace_core.loss import leaf_weights, packed_loss_weights, packed_policy_loss
from trace_core.train.schedule import learning_rate
from trace_core.packing.forest import pack, split_by_tokens
from trace_core.model.policy import build_policy
from trace_core.train.report import plot_runs
from trace_core.predictor import MLPHeadPredictor, PrefixBatch, calibration, prefix_batch, training_targets
from trace_core.forest import RolloutForest
from trace_core.train.config import TrainConfig
from trace_kernels import linear_logprob

log = logging.getLogger("trace_core.train.trainer")


class PhaseTimer:
    """Wall time per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class StepBatch:
    """The predictions a step made before its outcomes were known."""

    predicted_nodes: np.ndarray  # forest nodes that got a prediction (roots, anchors)
    predicted: np.ndarray  # their Vhat at allocation time
    contrast: np.ndarray  # predicted chance that each node's subtree turns out mixed
    informed: bool  # the predictor drove the allocation (not cold start, mode uses it)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.policy = build_policy(cfg.model, cfg.env.name, cfg.seed)
        self.model = self.policy.model
        try:
            source = make_task_source(cfg.env.name, **cfg.env.tasks)
            self.train_tasks, self.eval_tasks = source.tasks("train"), source.tasks("eval")
            make_env(cfg.env.name, **cfg.env.env)  # fail now on bad env options, not mid-step
        except (ValueError, TypeError) as err:
            raise ConfigError(f"env: {err}") from None
        if len(self.train_tasks) < cfg.allocation.candidates:
            raise ConfigError(f"allocation.candidates: {cfg.allocation.candidates} prompts per step, but the train "
                              f"split has only {len(self.train_tasks)} tasks")
        get_allocator(cfg.allocation.mode, **self._allocator_options(cfg.allocation.mode, np.random.default_rng(0)))  # fail early
        self.predictor = MLPHeadPredictor(self.model.config.hidden_size, cfg.predictor)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        # float16 compute over fp32 master weights: scale the loss so small gradients do not flush
        # to zero in fp16 (bf16 has fp32's range and needs none); a step with inf/nan grads is skipped
        self.scaler = torch.amp.GradScaler(self.policy.device.type,
                                           enabled=self.policy.autocast and self.policy.compute_dtype == torch.float16)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.optim.kl_coef > 0 else None
        self.backend = None if cfg.model.attention_backend == "auto" else cfg.model.attention_backend
        self.engine = self._make_engine()
        self.step = 0
        self.leaves_sampled = 0
        self._tensorboard = _tensorboard_writer(self.run_dir / "tensorboard")
        if resume:
            self._load_latest()
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            (self.run_dir / "metrics.jsonl").write_text("")

    # ------------------------------------------------------------------ set-up helpers
    def _allocator_options(self, mode: str, rng: np.random.Generator) -> dict:
        if mode == "random_tree":
            return {"rng": int(rng.integers(2**62))}
        if mode == "pcl":
            return {"count_per_prompt": self.cfg.allocation.pcl_count}
        return {}

    def _sampling(self, greedy: bool) -> SamplingParams:
        g = self.cfg.generation
        return SamplingParams(temperature=0.0 if greedy else g.temperature, top_p=1.0 if greedy else g.top_p,
                              max_tokens=g.max_tokens_per_turn, stop_strings=tuple(g.stop_strings),
                              stop_token_ids=self.policy.stop_token_ids)

    def _make_engine(self) -> HFRolloutEngine:
        g, env = self.cfg.generation, self.cfg.env
        engine = HFRolloutEngine(self.model, self.policy.codec, lambda: make_env(env.name, **env.env),
                                 sampling=self._sampling(greedy=False), num_pages=self._num_pages(),
                                 page_size=g.page_size, decode_backend=self.backend,
                                 kv_dtype=self.policy.compute_dtype, seed=self.cfg.seed)
        cache = engine.runner.cache
        log.info("KV cache: %d pages of %d tokens, %s", cache.num_pages, cache.page_size,
                 _size(cache.nbytes))
        return engine

    def _num_pages(self) -> int:
        """generation.num_pages, or with "auto" the pages kv_memory_fraction of free GPU memory holds."""
        g = self.cfg.generation
        if g.num_pages != "auto":
            return g.num_pages
        device = self.policy.device
        if torch.device(device).type != "cuda":
            raise ConfigError(f"generation.num_pages: 'auto' sizes the KV cache from free GPU memory, but the model "
                              f"is on {device}; give a number of pages")
        free, _ = torch.cuda.mem_get_info(device)
        per_page = page_bytes(**kv_geometry(self.model, self.policy.compute_dtype), page_size=g.page_size)
        pages = int(g.kv_memory_fraction * free) // per_page
        if pages < 1:
            raise ConfigError(f"generation.num_pages: 'auto' found {free / 2**30:.2f} GiB free; "
                              f"kv_memory_fraction {g.kv_memory_fraction} of it holds no page")
        return pages

    @contextlib.contextmanager
    def _kv_capacity_as_config_error(self):
        """A step that outgrows the KV cache names the setting to change, not the cache internals."""
        try:
            yield
        except CacheCapacityError as err:
            cache = self.engine.runner.cache
            raise ConfigError(
                f"generation.num_pages: {err}. This run's cache holds {cache.num_pages} pages "
                f"({_size(cache.nbytes)}); raise generation.num_pages (or use "
                f"'auto' on a GPU) or lower allocation.roots / generation.max_tokens_per_turn") from None

    def _uses_predictor(self) -> bool:
        return self.cfg.allocation.mode in ("trace", "pcl") and self.predictor.ready

    # ------------------------------------------------------------------ one training step
    def train_step(self) -> dict[str, float]:
        cfg, a = self.cfg, self.cfg.allocation
        timer = PhaseTimer()
        rng = np.random.default_rng([cfg.seed, self.step])  # a pure function of (seed, step): resumable
        self.engine.reseed(int(rng.integers(2**62)))
        tokens_before = self.engine.generated_tokens
        informed = self._uses_predictor()
        # cold start (METHOD.md step 1): TRACE allocates uniformly until the predictor has seen enough nodes
        mode = "uniform" if a.mode == "trace" and not informed else a.mode
        allocator = get_allocator(mode, **self._allocator_options(mode, rng))
        self.model.eval()

        # Stage 1: how many bare rollouts each candidate prompt gets
        candidates = [self.train_tasks[i] for i in rng.choice(len(self.train_tasks), a.candidates, replace=False)]
        with timer("predict"):
            v = self._predict_prompts(candidates) if informed else np.full(a.candidates, 0.5)
        bare_budget = a.leaves_per_step if a.mode == "uniform" else a.roots
        counts = np.asarray(allocator.roots(v, bare_budget, m_min=a.m_min, m_max=a.m_max, eps=a.eps), dtype=np.int64)

        with timer("rollout"), self._kv_capacity_as_config_error(), self.policy.compute():
            bare = self.engine.rollout(candidates, counts, prompt_ids=range(a.candidates))
        forest = RolloutForest.from_trajectories(_forest_trajectories(bare), vocab_size=self._vocab())
        bare_reward = forest.reward[[nodes[-1] for nodes in forest.turn_nodes]]

        # Stage 2: continuations from turn prefixes (anchors), in allocation.expansion_rounds rounds
        expansion = _Expansion(forest)
        if a.mode != "uniform" and a.continuations_per_root > 0:
            expansion = self._expand(bare, forest, counts * a.continuations_per_root, allocator, informed, timer)
        generated_tokens = self.engine.generated_tokens - tokens_before
        self.engine.release_all()
        forest = expansion.forest  # bare rollouts and every continuation
        batch = self._predictions(forest, counts, v, expansion.nodes, expansion.predicted, expansion.outcome, informed)

        # Learn: predictor on subtree success rates, policy on the packed tree
        with timer("train"):
            metrics = self._update(forest, batch)
        self.step += 1
        self.leaves_sampled += int(forest.leaves.size)
        rewards = forest.reward[forest.leaves]
        metrics.update({
            "step": self.step, "leaves": int(forest.leaves.size), "leaves_sampled": self.leaves_sampled,
            "prompts": int((counts > 0).sum()), "success_leaves": float(rewards.mean()),
            "success_bare": float(bare_reward.mean()), "effective_ratio": forest.effective_ratio(),
            "generated_tokens": generated_tokens, "predictor_informed": float(informed),
            "continuation_budget_reassigned": expansion.reassigned, "expansion_rounds_run": expansion.rounds,
            **{f"time/{k}": v for k, v in timer.seconds.items()},
        })
        return metrics

    def _expand(self, bare: list[EngineTrajectory], forest: RolloutForest, budget: np.ndarray, allocator,
                informed: bool, timer: PhaseTimer) -> "_Expansion":
        """METHOD.md step 3. budget[i]: continuations of prompt i (m_i * N), split evenly over the
        rounds (the first rounds get the remainder). Round 1 branches from the bare rollouts' turn
        prefixes; round r (OURS, `allocation.expansion_rounds`) from the turns that round r-1's
        continuations added after their branch point. A round with no new prefix anywhere branches
        from every prefix so far, so the step still samples its full budget. `forest` is the bare
        rollouts' forest; the result's is rebuilt once per round, after that round's continuations."""
        a = self.cfg.allocation
        done, fresh, out = list(bare), range(len(bare)), _Expansion(forest)
        for share in _round_shares(budget, a.expansion_rounds):
            forest = out.forest  # the forest of `done`, in order
            anchors, nodes, owner = _anchors(done, forest, fresh)
            if not anchors:
                anchors, nodes, owner = _anchors(done, forest, range(len(done)))
            if not anchors:
                break
            outcome = forest.reward[[forest.turn_nodes[i][-1] for i in owner]]
            p_anchor = np.full(len(anchors), 0.5)
            if informed:
                with timer("predict"):
                    p_anchor = self._predict_nodes(forest, nodes)
            group = np.array([done[i].prompt_id for i in owner], dtype=np.int64)
            round_budget, moved = _prefix_budgets(share, group)
            k = allocator.prefixes(p_anchor, outcome, group, round_budget, k_max=a.k_max, eps=a.eps)
            with timer("expand"), self._kv_capacity_as_config_error(), self.policy.compute():
                new = self.engine.expand(anchors, k)
            fresh = range(len(done), len(done) + len(new))
            done += new
            out.add(nodes, p_anchor, outcome, moved)
            out.forest = RolloutForest.from_trajectories(_forest_trajectories(done), vocab_size=self._vocab())
        return out

    def _vocab(self) -> int:
        return self.model.get_input_embeddings().num_embeddings

    @torch.no_grad()
    def _predict_prompts(self, tasks) -> np.ndarray:
        """Vhat of each prompt: the predictor on the policy's hidden state at the prompt's last token."""
        prompts = []
        for task in tasks:
            env = make_env(self.cfg.env.name, **self.cfg.env.env)
            prompts.append(np.asarray(self.policy.codec.encode_prompt(env.reset(task, seed=0)), dtype=np.int64))
        lengths = np.array([p.size for p in prompts])
        ends = np.cumsum(lengths)
        packed = _Chains(input_ids=np.concatenate(prompts), position_ids=np.concatenate([np.arange(n) for n in lengths]),
                         end=np.repeat(ends, lengths).astype(np.int32))
        with self.policy.compute():
            hidden = tree_forward(self.model, packed, backend=self.backend)
        batch = PrefixBatch(depth=torch.zeros(len(tasks), dtype=torch.long), prefix_len=torch.as_tensor(lengths),
                            hidden=hidden[torch.as_tensor(ends - 1)].float().cpu())
        return self.predictor.predict(batch)

    @torch.no_grad()
    def _predict_nodes(self, forest: RolloutForest, nodes: np.ndarray) -> np.ndarray:
        packed = pack(forest)
        with self.policy.compute():
            hidden = tree_forward(self.model, packed, backend=self.backend)
        return self.predictor.predict(prefix_batch(forest, packed, nodes, hidden))

    def _predictions(self, forest, counts, v, anchor_nodes, p_anchor, anchor_r, informed) -> StepBatch:
        """The predictions made before this step's outcomes, on the final forest's nodes, with the
        chance each gave that the node's subtree turns out mixed."""
        active = counts > 0
        roots = np.array([forest.root_of(i) for i in np.flatnonzero(active)], dtype=np.int64)
        v_roots, m = np.asarray(v)[active], counts[active]
        root_contrast = 1 - v_roots**m - (1 - v_roots) ** m
        q = anchor_r * p_anchor + (1 - anchor_r) * (1 - p_anchor)  # chance a continuation repeats the outcome
        return StepBatch(predicted_nodes=np.concatenate([roots, anchor_nodes]).astype(np.int64),
                         predicted=np.concatenate([v_roots, p_anchor]), contrast=np.concatenate([root_contrast, 1 - q]),
                         informed=informed)

    def _update(self, forest: RolloutForest, batch: StepBatch) -> dict[str, float]:
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if batch.informed and batch.predicted_nodes.size:  # calibration of predictions made before the outcomes
            rates, counts, mixed = forest.subtree_success_rates(), forest.subtree_leaf_counts(), forest.is_mixed()
            nodes = batch.predicted_nodes
            cal = calibration(batch.predicted, rates[nodes], counts[nodes], mixed[nodes], batch.contrast)
            metrics.update({f"predictor/{k}": v for k, v in cal.items()})

        o = cfg.optim
        lr = learning_rate(self.step, lr=o.lr, steps=cfg.steps, schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                           min_lr_ratio=o.min_lr_ratio)
        advantages, kind = compute_advantages(forest, cfg.optim.advantage)
        full = pack(forest)
        weights_all = leaf_weights(forest, full, cfg.optim.loss_agg)
        target_nodes, targets, target_weights = training_targets(forest)
        target_tree = forest.tree_root()[target_nodes]  # which micro-batch (tree) holds each target
        batches = [(roots, full if len(roots) == forest.roots.size else pack(forest, roots=roots))
                   # a tree larger than micro_batch_tokens runs alone (TRACE may give one prompt many leaves)
                   for roots in split_by_tokens(forest, cfg.optim.micro_batch_tokens, oversized="alone")]
        hidden_rows: dict[int, torch.Tensor] = {}
        ratio_dev, ratio_max_dev = 0.0, 0.0  # first epoch only
        for epoch in range(cfg.optim.epochs):
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss_total, clip_weighted, entropy_total = 0.0, 0.0, 0.0
            for roots, packed in batches:
                weights = packed_loss_weights(forest, packed, advantages, kind, loss_agg=cfg.optim.loss_agg,
                                              leaf_weight=weights_all)
                pos, neg, kl_w = weights.to_torch(device=self.policy.device)
                with self.policy.compute():  # forwards under autocast (master weights); backward outside
                    hidden = tree_forward(self.model, packed, backend=self.backend)
                    if epoch == 0:  # the predictor learns from the policy that generated the step
                        in_batch = target_nodes[np.isin(target_tree, roots)]
                        for node, row in zip(in_batch, packed.node_end[in_batch] - 1):
                            hidden_rows[int(node)] = hidden[int(row)].detach().float().cpu()
                    loss, m = self._packed_loss(packed, hidden, pos, neg, kl_w)
                self.scaler.scale(loss).backward()
                loss_total += loss.item()
                clip_weighted += m["clip_fraction"].item() * float(kl_w.sum())
                entropy_total += m["entropy"].item()
                if epoch == 0:  # before any update: how far the trainer's logprobs are from the sampler's
                    ratio_dev += m["ratio_abs_dev"].item() * float(kl_w.sum())
                    ratio_max_dev = max(ratio_max_dev, m["ratio_max_dev"].item())
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unless float16)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.model.eval()

        # predictor: every root and internal node, from the hidden states of this forward
        order = [i for i, u in enumerate(target_nodes) if int(u) in hidden_rows]
        nodes = target_nodes[order]
        depth, prefix_len = forest.depth[nodes], full.position_ids[full.node_end[nodes] - 1] + 1
        pb = PrefixBatch(depth=torch.as_tensor(depth, dtype=torch.long), prefix_len=torch.as_tensor(prefix_len),
                         hidden=torch.stack([hidden_rows[int(u)] for u in nodes]) if len(nodes) else None)
        if len(nodes):
            metrics.update(self.predictor.observe(pb, targets[order], target_weights[order]))
        if self.scaler.is_enabled():
            metrics["grad_scale"] = float(self.scaler.get_scale())
        metrics.update({"loss": loss_total, "grad_norm": float(grad_norm), "lr": lr, "clip_fraction": clip_weighted,
                        "entropy": entropy_total,
                        "sampler/ratio_abs_dev": ratio_dev, "sampler/ratio_max_dev": ratio_max_dev,  # first epoch
                        "tokens_packed": full.num_tokens, "tokens_leaf_paths": full.num_leaf_path_tokens,
                        "dedup_ratio": full.num_leaf_path_tokens / max(full.num_tokens, 1)})
        return metrics

    def _packed_loss(self, packed, hidden, pos, neg, kl_w):
        """Logprobs of the model tokens only (the others carry no loss), then the clipped surrogate."""
        device = hidden.device
        use = packed.loss_mask[packed.label_pos]
        rows = torch.as_tensor(packed.label_rows[use], device=device)
        labels = torch.as_tensor(packed.labels[use], device=device)
        temperature = self.cfg.generation.temperature or 1.0  # greedy sampling records untempered logprobs
        weight = self.model.get_output_embeddings().weight  # under autocast the op takes both in the compute dtype
        coef = self.cfg.optim.entropy_coef
        pair_lp, entropy = linear_logprob(hidden, weight, rows, labels, temperature=temperature, backend=self.backend,
                                          return_entropy=True)
        positions = torch.as_tensor(packed.label_pos[use], device=device)
        token_lp = torch.zeros(packed.num_tokens, device=device, dtype=pair_lp.dtype).index_copy(0, positions, pair_lp)
        old = torch.nan_to_num(torch.as_tensor(packed.old_logprobs, device=device), nan=0.0)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref_hidden = tree_forward(self.reference, packed, backend=self.backend)
                ref_pairs = linear_logprob(ref_hidden, self.reference.get_output_embeddings().weight, rows, labels,
                                           temperature=temperature, backend=self.backend)
            ref = torch.zeros_like(token_lp).index_copy(0, torch.as_tensor(packed.label_pos[use], device=device), ref_pairs)
        loss, metrics = packed_policy_loss(token_lp, old, pos, neg, kl_w, eps_low=self.cfg.optim.eps_low,
                                           eps_high=self.cfg.optim.eps_high, ref_logprobs=ref, kl_coef=self.cfg.optim.kl_coef)
        # entropy of the sampling distribution behind each model token, aggregated like the loss
        token_entropy = (kl_w[positions] * entropy[rows]).sum()
        metrics["entropy"] = token_entropy.detach()
        return loss - coef * token_entropy, metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_tasks: int | None = None) -> dict[str, float]:
        """Success on the held-out split, one episode per task: `eval/success` samples like training
        does, `eval/success_greedy` decodes greedily. Seeds are fixed, so evaluations compare."""
        tasks = self.eval_tasks[: num_tasks or self.cfg.eval_tasks]
        result = {"eval/tasks": len(tasks)}
        training_sampling = self.engine.sampling
        try:  # the training engine and its KV pool, with evaluation's decoding settings
            for name, greedy in (("eval/success", False), ("eval/success_greedy", True)):
                self.engine.sampling = [self._sampling(greedy)]
                self.engine.reseed(self.cfg.seed + 7919)
                with self._kv_capacity_as_config_error(), self.policy.compute():
                    trajectories = self.engine.rollout(tasks, [1] * len(tasks))
                self.engine.release_all()
                result[name] = float(np.mean([t.reward or 0.0 for t in trajectories]))
        finally:
            self.engine.sampling = training_sampling
        return result

    # ------------------------------------------------------------------ the loop, checkpoints
    def fit(self, progress=None) -> list[dict]:
        """Train until cfg.steps; returns this call's metrics. Writes run_dir/metrics.png at the end."""
        history = []
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.cfg.steps:
                metrics.update(self.evaluate())
            self._log(metrics)
            history.append(metrics)
            if progress is not None:
                progress(metrics)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save()
        rows = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        if rows:
            plot_runs({self.cfg.allocation.mode: [rows]}, self.run_dir / "metrics.png")
        return history

    def _log(self, metrics: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, np.integer)) else v)
                                     for k, v in metrics.items()}) + "\n")
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float, np.floating, np.integer)) and key != "step":
                    self._tensorboard.add_scalar(key, float(value), self.step)
            self._tensorboard.flush()

    def save(self) -> Path:
        state = {"step": self.step, "leaves_sampled": self.leaves_sampled, "config": to_dict(self.cfg),
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "grad_scaler": self.scaler.state_dict(),
                 "predictor": self.predictor.state_dict(), "rng": ckpt.rng_state()}
        return ckpt.save_checkpoint(self.run_dir, self.step, state)

    def _load_latest(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            raise ConfigError(f"resume: {self.run_dir} has no checkpoint to resume from")
        state = ckpt.load_checkpoint(path)
        saved = state["config"]
        for key in ("seed", "model", "env", "allocation", "optim"):
            if saved[key] != to_dict(self.cfg)[key]:
                raise ConfigError(f"resume: {key} differs from the run's saved config.yaml; resume with the same config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("grad_scaler"):  # absent in checkpoints from before loss scaling; empty when disabled
            self.scaler.load_state_dict(state["grad_scaler"])
        self.predictor.load_state_dict(state["predictor"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.leaves_sampled = int(state["step"]), int(state["leaves_sampled"])
        # metrics written after the checkpoint belong to steps that will run again
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if json.loads(line).get("step", 0) <= self.step]
        (self.run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _tensorboard_writer(folder: Path):
    """TensorBoard event writer when the tensorboard package is installed (optional), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


@dataclass
class _Chains:
    """Independent sequences packed back to back: the packed-tree fields tree_forward reads."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    end: np.ndarray


def _forest_trajectories(trajectories: list[EngineTrajectory]):
    """Engine output -> forest input; an episode the engine cut off (no reward) counts as failed."""
    converted = to_forest_trajectories(trajectories)
    return [t if t.reward is not None else dataclasses.replace(t, reward=0.0) for t in converted]


def _anchors(trajectories: list[EngineTrajectory], forest: RolloutForest, which):
    """The non-final turns that trajectories[i] (i in `which`) generated itself (a continuation's
    start after its branch point): engine anchors, their forest nodes (`forest` is built from
    `trajectories`, in order) and the index of the trajectory each belongs to."""
    anchors, nodes, owner = [], [], []
    for i in which:
        traj = trajectories[i]
        first = 1 if traj.branch_from is None else traj.branch_from[1] + 1
        for t in range(first, traj.num_turns):
            anchors.append(Anchor(traj.uid, t))
            nodes.append(forest.turn_nodes[i][t])
            owner.append(i)
    return anchors, np.asarray(nodes, dtype=np.int64), np.asarray(owner, dtype=np.int64)


@dataclasses.dataclass
class _Expansion:
    """What stage 2 sampled, and the predictions it made on the way (over all rounds)."""

    forest: RolloutForest  # the bare rollouts and every continuation so far
    nodes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # anchor forest nodes
    predicted: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # Vhat of each anchor
    outcome: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # reward of its trajectory
    reassigned: int = 0  # budget moved to other prompts because a prompt had no anchor in a round
    rounds: int = 0

    def add(self, nodes, predicted, outcome, moved):
        self.nodes = np.concatenate([self.nodes, nodes])
        self.predicted = np.concatenate([self.predicted, predicted])
        self.outcome = np.concatenate([self.outcome, outcome])
        self.reassigned += moved
        self.rounds += 1


def _round_shares(budget: np.ndarray, rounds: int) -> list[np.ndarray]:
    """budget[i] split over `rounds`: as even as integers allow, the first rounds one more."""
    budget = np.asarray(budget, dtype=np.int64)
    return [budget // rounds + (r < budget % rounds) for r in range(rounds)]


def _prefix_budgets(budget: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-prompt continuation budgets. A prompt whose bare rollouts all ended after one turn has no
    anchor; its share goes to the prompts that have anchors (in proportion to their budgets, ties to
    the lowest ids) so every step samples the same number of leaves. Returns (budgets, moved)."""
    budget = np.asarray(budget, dtype=np.int64).copy()
    has_anchor = np.zeros(budget.size, dtype=bool)
    has_anchor[group] = True
    moved = int(budget[~has_anchor].sum())
    budget[~has_anchor] = 0
    if moved and has_anchor.any():
        base = np.where(has_anchor, np.maximum(budget, 1), 0).astype(np.float64)
        share = np.floor(moved * base / base.sum()).astype(np.int64)
        rest = moved - int(share.sum())
        share[np.flatnonzero(has_anchor)[:rest]] += 1
        budget += share
    return budget, moved
