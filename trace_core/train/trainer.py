"""The TRACE trainer. One step, in the order of docs/method.md, data flowing one way:

    env -> engine.prefill (prompts + hidden states) -> predictor -> Stage 1 -> engine.rollout
        -> predictor -> Stage 2 -> engine.expand -> forest complete -> advantages
        -> policy update (pack -> tree forward -> fused logprob -> packed loss -> optimizer)
        -> predictor update (subtree success rates, on the hidden states the engine kept)

The engine writes every turn into the step's `RolloutForest` as it generates; nothing is flattened
and rebuilt. Every allocation (`allocation.mode`, or `root_strategy` / `prefix_strategy`) samples the
same number of leaves per step. The run directory (trace_core/train/run_dir.py) holds config.yaml,
metrics.jsonl and atomic, checksummed checkpoints, and is locked for the trainer's lifetime; a new run refuses
a directory that holds anything (`overwrite=True` deletes the run files first), `resume=True` continues a run
exactly where its newest intact checkpoint left it, and `Trainer.for_evaluation` loads a checkpoint without
touching any directory.

Under torchrun (several processes) the step's prompts are split over the ranks and everything the allocation
needs is exchanged so N ranks do what one process does (trace_core/train/distributed.py); rank 0 owns the run
directory, and checkpoints are sharded (trace_core/train/dist_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trace_core.advantage import compute_advantages
from trace_core.allocation import Allocation
from trace_core.allocation.objective import repeat_probability, root_mixed_probability
from trace_core.envs import make_env, make_task_source
from trace_core.forest import RolloutForest
from trace_core.model.lora import load_trainable_state_dict, trainable_state_dict
from trace_core.model.policy import build_policy, resolve_device
from trace_core.predictor import (
    EncoderPredictor,
    MLPHeadPredictor,
    PrefixBatch,
    SuccessPredictor,
    calibration,
    prefix_tokens,
    training_targets,
)
from trace_core.rollout import Generated, HFRolloutEngine, Prompts, SamplingParams
from trace_core.rollout.kv_cache import CacheCapacityError, page_bytes
from trace_core.rollout.paged_runner import kv_geometry
from trace_core.train import checkpoint as ckpt
from trace_core.train import dist_checkpoint, distributed, parallel
from trace_core.train import run_dir as runs
from trace_core.train.config import LoraConfig, TrainConfig, gib, host_memory
from trace_core.train.config_loader import ConfigError, from_dict, merge, save_config, to_dict
from trace_core.train.expansion import Expansion, expand_prefixes
from trace_core.train.metrics_log import MetricsLog
from trace_core.train.policy_update import PolicyUpdater
from trace_core.train.schedule import learning_rate
from trace_core.train.stats import mean_interval

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
class Predictions:
    """What the step predicted before the outcomes were known, for the calibration metrics.

    nodes [K] forest nodes (active roots, then anchors); value [K] their Vhat; contrast [K] the
    chance each gave that the node's subtree turns out mixed."""

    nodes: np.ndarray
    value: np.ndarray
    contrast: np.ndarray


def warn_if_triton_interpreted() -> bool:
    """Warn (once per call) when TRITON_INTERPRET is set: every Triton kernel then runs in the interpreter."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if value.strip().lower() not in ("", "0", "false", "no", "off"):
        log.warning(
            "TRITON_INTERPRET=%s is set: every Triton kernel runs in the Triton interpreter, about 1000x slower "
            "(a 0.3 s step takes minutes). Unset it (`unset TRITON_INTERPRET`) unless you are debugging kernels.",
            value,
        )
        return True
    return False


class Trainer:
    """Trainer(cfg): a new run in cfg.run_dir (None: a fresh runs/<mode>-<date>-<time>), which must be empty
    (overwrite=True deletes its run files first); resume=True continues the run there. The directory is locked
    until `close()` (or the end of the process); `with Trainer(cfg) as trainer:` closes it."""

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, _read_only: bool = False):
        warn_if_triton_interpreted()
        self.read_only = _read_only
        self.lock: runs.RunLock | None = None
        self.metrics: MetricsLog | None = None
        created = False
        self.world = (
            distributed.SINGLE
            if _read_only
            else distributed.setup(cfg.distributed.backend, resolve_device(cfg.model.device).type)
        )
        if _read_only:
            self.cfg = cfg
            self.run_dir = Path(cfg.run_dir) if cfg.run_dir else None
        elif self.world.distributed:
            cfg.check_world_size(self.world.size)
            created = self._open_run_dir_shared(cfg, resume=resume, overwrite=overwrite)
        else:
            self.cfg, created = self._claim_run_dir(cfg, resume=resume, overwrite=overwrite)
            self.run_dir = Path(self.cfg.run_dir)
        cfg = self.cfg
        try:
            self._build(cfg, resume=resume, overwrite=overwrite)
        except BaseException:
            self.close()
            if created and self.run_dir is not None and not runs.contents(self.run_dir):
                (self.run_dir / runs.LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
            raise

    def _claim_run_dir(self, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> tuple[TrainConfig, bool]:
        """Check the run directory before creating anything (a new run's must be empty or new, a resumed one must
        hold config.yaml; None names a fresh runs/<mode>-<date>-<time>), then create and lock it (held until
        close(): a second trainer there fails now). Returns (cfg with its run_dir, whether it was created)."""
        if resume and overwrite:
            raise ConfigError("--overwrite", "--resume continues a run and --overwrite deletes one: pick one")
        created = False
        if cfg.run_dir is None:
            if resume:
                raise ConfigError("run_dir", "resume: name the run to continue, e.g. run_dir=runs/latest")
            cfg = copy.copy(cfg)
            cfg.run_dir = str(runs.default_run_dir(cfg.allocation.mode))
            created = True
        elif not resume:
            runs.check_new(cfg.run_dir, overwrite=overwrite)
        elif not (Path(cfg.run_dir) / "config.yaml").is_file():
            raise ConfigError("resume", f"{cfg.run_dir} is not a run directory (no config.yaml); nothing to resume")
        created = created or not Path(cfg.run_dir).exists()
        self.lock = runs.acquire(cfg.run_dir)
        return cfg, created

    def _open_run_dir_shared(self, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> bool:
        """Several ranks: rank 0 checks, creates and locks the run directory as one process does; every rank
        learns its path (a fresh default name is rank 0's) or rank 0's error. Returns whether it was created."""
        error, created = None, False
        if self.world.is_main:
            try:
                cfg, created = self._claim_run_dir(cfg, resume=resume, overwrite=overwrite)
            except ConfigError as err:
                error = err
        shared = self.world.broadcast((cfg.run_dir, None if error is None else (error.field, error.detail)))
        if error is not None:
            raise error
        if shared[1] is not None:
            raise ConfigError(*shared[1])
        if cfg.run_dir != shared[0]:
            cfg = copy.copy(cfg)
            cfg.run_dir = shared[0]
        self.cfg, self.run_dir = cfg, Path(shared[0])
        return created

    def _build(self, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> None:
        torch.manual_seed(cfg.seed)
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.allocation: Allocation = cfg.allocation.build()
        self.policy = build_policy(cfg.model, cfg.env.name, cfg.seed)
        self.model = self.policy.model
        try:
            source = make_task_source(cfg.env.name, **cfg.env.tasks)
            self.train_tasks, self.eval_tasks = source.tasks("train"), source.tasks("eval")
            probe = make_env(cfg.env.name, **cfg.env.env)  # fail now on bad env options, not mid-step
            self.env_metrics = tuple(getattr(probe, "eval_metrics", ()))  # what evaluate averages
            self._reference_success = getattr(source, "reference_success", None)  # optional (envs/base.py)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"env: {err}") from None
        if len(self.train_tasks) < cfg.allocation.candidates:
            raise ConfigError(
                f"allocation.candidates: {cfg.allocation.candidates} prompts per step, but the train "
                f"split has only {len(self.train_tasks)} tasks"
            )
        self.predictor = self._make_predictor()  # replicated: every rank trains it on the same gathered batch
        self.backend = None if cfg.model.attention_backend == "auto" else cfg.model.attention_backend
        self.rollout_weights: parallel.RolloutWeights | None = None
        wrap = None
        if self.world.distributed:
            d = cfg.distributed
            if d.strategy == "fsdp2":  # the engine's full copy, made before the model is sharded in place
                dtype = self.policy.compute_dtype if d.rollout_weights == "compute_dtype" else None
                self.rollout_weights = parallel.RolloutWeights(self.model, dtype)
            wrap = lambda model: parallel.wrap(model, d, self.world, self.policy.compute_dtype)
        self.updater = PolicyUpdater(
            self.policy,
            cfg.optim,
            temperature=cfg.generation.temperature,
            backend=self.backend,
            world=self.world,
            wrap=wrap,
        )
        self.engine = self._make_engine()
        self.step = 0
        self.leaves_sampled = 0
        if self.read_only:
            return
        if resume:
            self._load_latest()
        elif self.world.is_main:
            runs.prepare_new(self.run_dir, overwrite=overwrite)
            save_config(cfg, self.run_dir / "config.yaml")
            self.metrics = MetricsLog(self.run_dir, fresh=True, logging_cfg=cfg.logging)
        self.world.barrier()  # the other ranks write checkpoints there only once rank 0 has prepared it

    @classmethod
    def for_evaluation(cls, path: str | Path, *, overrides: dict | None = None) -> tuple[Trainer, dict]:
        """A trainer holding the weights of the checkpoint file at `path` (verified against its manifest when
        one lies beside it), built from the config the checkpoint embeds (with `overrides`, a nested mapping of
        settings that do not change the weights, e.g. a smaller KV cache for `trace export`). It reads only: no
        directory is created, locked or written. Returns (trainer, the checkpoint's state). A sharded checkpoint
        (the directory a multi-process run writes) is read whole into one process, without a process group."""
        sharded = Path(path).is_dir()
        state = dist_checkpoint.read_trainer_state(Path(path)) if sharded else ckpt.load_checkpoint(path)
        saved = merge(dict(state["config"]), overrides or {})
        saved["run_dir"] = None  # where the run was is irrelevant here (the file may have been copied out)
        cfg = from_dict(TrainConfig, saved)
        trainer = cls(cfg, _read_only=True)
        if sharded:
            dist_checkpoint.load_full_model(Path(path), trainer.model)
        else:
            load_trainable_state_dict(trainer.model, state["model"])
        trainer.step, trainer.leaves_sampled = int(state["step"]), int(state.get("leaves_sampled", 0))
        return trainer, state

    def close(self) -> None:
        """Release the run directory (its lock); the trainer must not write there afterwards."""
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.updater.optimizer

    # ------------------------------------------------------------------ one training step
    def train_step(self) -> dict[str, float]:
        """One step of docs/method.md; returns its metrics."""
        if self.world.distributed:
            return self._train_step_sharded()
        cfg, _a, timer = self.cfg, self.cfg.allocation, PhaseTimer()
        rng = np.random.default_rng([cfg.seed, self.step])  # a pure function of (seed, step): resumable
        self.engine.reseed(int(rng.integers(2**62)))
        oracle = self.cfg.predictor.backend == "oracle"  # analysis: Monte-Carlo predictions, no cold start
        informed = self.allocation.uses_predictor and (oracle or self.predictor.ready)
        oracle_before = self.engine.oracle_tokens
        allocation = self.allocation if informed else self.allocation.cold()  # cold start: step 1 of the method
        alloc_rng = np.random.default_rng([cfg.seed, self.step, 1])  # the strategies' own stream (random anchors)
        forest = RolloutForest(vocab_size=self.model.get_input_embeddings().num_embeddings)
        tokens_before = self.engine.generated_tokens
        self.model.eval()

        with timer("rollout"), self._generating():
            prompts = self.engine.prefill(self._candidates(rng))
        with timer("predict"):
            v = self._predict_prompts(prompts) if informed else np.full(len(prompts), 0.5)
        counts = self._allocate_roots(allocation, v, alloc_rng)  # Stage 1
        with timer("rollout"), self._generating():
            bare = self.engine.rollout(forest, prompts, counts)  # bare rollouts
        with timer("expand"), self._generating():
            expansion = self._expand(forest, bare, allocation, counts, informed, alloc_rng)  # Stage 2
        generated_tokens = self.engine.generated_tokens - tokens_before
        predictor_batch = self._predictor_targets(forest)  # rewards -> subtree success rates
        head = self._head_calibration(forest, prompts, counts, expansion) if oracle and self.predictor.ready else {}
        self.engine.release_all()

        metrics = self._calibration(forest, prompts, v, counts, expansion) if informed else {}
        metrics.update(head)
        with timer("train"):
            metrics.update(self._update_policy(forest))  # advantages -> packed loss -> step
            metrics.update(self._update_predictor(*predictor_batch))
        self.step += 1
        self.leaves_sampled += int(forest.leaves.size)
        metrics.update(self._rollout_metrics(forest, bare, counts, expansion, generated_tokens, informed))
        metrics.update({f"time/{k}": s for k, s in timer.seconds.items()})
        if oracle:
            metrics["oracle_tokens"] = self.engine.oracle_tokens - oracle_before  # outside the budget
        return metrics

    def _train_step_sharded(self) -> dict[str, float]:
        """`train_step` over several ranks (module doc of trace_core/train/distributed.py): the same global
        candidates, allocation and budget as one process; each rank generates and trains on its own prompts."""
        cfg, timer, world = self.cfg, PhaseTimer(), self.world
        rng = np.random.default_rng([cfg.seed, self.step])
        self.engine.reseed(int(rng.integers(2**62)))
        oracle = self.cfg.predictor.backend == "oracle"
        informed = self.allocation.uses_predictor and (oracle or self.predictor.ready)
        oracle_before = self.engine.oracle_tokens
        allocation = self.allocation if informed else self.allocation.cold()
        alloc_rng = np.random.default_rng([cfg.seed, self.step, 1])
        forest = RolloutForest(vocab_size=self.model.get_input_embeddings().num_embeddings)
        tokens_before = self.engine.generated_tokens
        self.model.eval()
        self._refresh_rollout_weights()
        candidates = self._candidates(rng)  # every rank draws the same B
        lo, hi = distributed.shard(len(candidates), world)
        with timer("rollout"), self._generating():
            prompts = self.engine.prefill(candidates[lo:hi], prompt_ids=range(lo, hi))
        with timer("predict"):
            v_mine = self._predict_prompts(prompts) if informed else np.full(len(prompts), 0.5)
            v = world.concat(v_mine)  # [B] in prompt order
        counts = self._allocate_roots(allocation, v, alloc_rng)  # Stage 1 on the whole step, the same on every rank
        order = distributed.NodeOrder()
        with timer("rollout"), self._generating():
            bare = self.engine.rollout(forest, prompts, counts[lo:hi])
        order.add_bare(forest, bare.nodes)
        with timer("expand"), self._generating():
            expansion = self._expand(forest, bare, allocation, counts, informed, alloc_rng, order=order)
        generated_tokens = self.engine.generated_tokens - tokens_before
        predictor_batch = self._predictor_targets(forest, order)
        self.engine.release_all()

        metrics = self._calibration(forest, prompts, v_mine, counts[lo:hi], expansion) if informed else {}
        with timer("train"):
            update = self._update_policy(forest)
            metrics.update(self._update_predictor(*predictor_batch))
        sums = {
            "leaves": int(forest.leaves.size),
            "reward_leaves": float(forest.reward[forest.leaves].sum()),
            "reward_bare": float(forest.reward[bare.leaves].sum()),
            "bare": int(bare.leaves.size),
            "mixed_roots": int(forest.is_mixed()[forest.roots].sum()),
            "roots": int(forest.roots.size),
            "generated_tokens": generated_tokens,
            "oracle_tokens": self.engine.oracle_tokens - oracle_before,
        }
        local = {
            **update,
            **{f"sum/{k}": x for k, x in sums.items()},
            **{f"time/{k}": x for k, x in timer.seconds.items()},
        }
        rules = {k: "sum" for k in local if k.startswith("sum/")}
        rules.update({k: "max" for k in local if k.startswith("time/")})
        rules.update(dict.fromkeys(("loss", "clip_fraction", "entropy", "sampler/ratio_abs_dev"), "sum"))
        rules.update({"tokens_packed": "sum", "tokens_leaf_paths": "sum", "sampler/ratio_max_dev": "max"})
        total = distributed.reduce_metrics(world, local, rules)
        total["dedup_ratio"] = total["tokens_leaf_paths"] / max(total["tokens_packed"], 1)
        self.step += 1
        self.leaves_sampled += int(total["sum/leaves"])
        metrics.update({k: x for k, x in total.items() if not k.startswith("sum/")})
        metrics.update(
            {
                "step": self.step,
                "leaves": int(total["sum/leaves"]),
                "leaves_sampled": self.leaves_sampled,
                "prompts": int((counts > 0).sum()),
                "success_leaves": total["sum/reward_leaves"] / max(total["sum/leaves"], 1),
                "success_bare": total["sum/reward_bare"] / max(total["sum/bare"], 1),
                "effective_ratio": total["sum/mixed_roots"] / max(total["sum/roots"], 1),
                "generated_tokens": int(total["sum/generated_tokens"]),
                "predictor_informed": float(informed),
                "continuation_budget_reassigned": expansion.reassigned,  # computed on the whole step
                "expansion_rounds_run": expansion.rounds,
            }
        )
        if oracle:
            metrics["oracle_tokens"] = int(total["sum/oracle_tokens"])
        return metrics

    def _refresh_rollout_weights(self) -> None:
        """FSDP2: bring the engine's full copy up to the current policy (a collective; no-op when current)."""
        if self.rollout_weights is not None:
            self.rollout_weights.refresh(self.updater.train_model, self.updater.version)

    def _candidates(self, rng: np.random.Generator) -> list:
        """B prompts drawn from the train split without replacement."""
        a = self.cfg.allocation
        return [self.train_tasks[i] for i in rng.choice(len(self.train_tasks), a.candidates, replace=False)]

    def _allocate_roots(self, allocation: Allocation, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stage 1. v [B] predicted success of each candidate -> [B] bare rollouts per prompt."""
        a = self.cfg.allocation
        budget = allocation.bare_budget(a.roots, a.continuations_per_root)
        counts = allocation.root(v, budget, m_min=a.m_min, m_max=a.m_max, eps=a.eps, rng=rng)
        return np.asarray(counts, dtype=np.int64)

    def _expand(
        self,
        forest: RolloutForest,
        bare: Generated,
        allocation: Allocation,
        counts: np.ndarray,
        informed: bool,
        rng: np.random.Generator,
        order: distributed.NodeOrder | None = None,
    ) -> Expansion:
        """Stage 2: each prompt's m_i * N continuations over the anchors of its tree (train/expansion.py).
        Several ranks: `counts` [B] is the whole step's, each round's anchors are exchanged (`order`)."""
        a = self.cfg.allocation
        budget = allocation.continuation_budget(counts, a.continuations_per_root)
        if not budget.any():
            return Expansion()
        exchange = None if order is None else distributed.AnchorExchange(self.world, order, forest)
        return expand_prefixes(
            forest,
            bare,
            budget,
            rounds=a.expansion_rounds,
            predict=lambda nodes: self._predict_nodes(forest, nodes) if informed else np.full(nodes.size, 0.5),
            allocate=lambda p, r, group, k: allocation.prefix(p, r, group, k, k_max=a.k_max, eps=a.eps, rng=rng),
            expand=lambda anchors, k: self.engine.expand(forest, anchors, k),
            exchange=exchange,
        )

    # ------------------------------------------------------------------ the predictor
    def _make_predictor(self) -> SuccessPredictor:
        """predictor.backend: an MLP head on the policy's hidden states, or a separate encoder model
        (built like the policy from predictor.encoder, with the policy's tokenizer) reading the tokens."""
        cfg = self.cfg.predictor
        if cfg.backend in ("mlp_head", "oracle"):  # the oracle still trains a head, for its calibration numbers
            return MLPHeadPredictor(self.model.config.hidden_size, cfg)
        try:  # the encoder is a model name like model.name (a Hub id is checked here); it trains whole, no LoRA
            model_cfg = dataclasses.replace(
                self.cfg.model, name=cfg.encoder, gradient_checkpointing=False, lora=LoraConfig()
            )
        except ConfigError as err:
            raise ConfigError("predictor.encoder", err.detail) from None
        encoder = build_policy(model_cfg, self.cfg.env.name, self.cfg.seed + 1)
        if encoder.tokenizer.get_vocab() != self.policy.tokenizer.get_vocab():
            raise ConfigError(
                "predictor.encoder",
                f"{cfg.encoder!r} has another tokenizer than the policy; it reads the policy's tokens",
            )
        base = getattr(encoder.model, "model", encoder.model)  # the transformer without its lm-head
        return EncoderPredictor(base, cfg, pad_token_id=self.policy.tokenizer.pad_token_id or 0)

    def _predict_prompts(self, prompts: Prompts) -> np.ndarray:
        """[B] Vhat of each prompt, from the hidden state the engine's prefill computed (mlp_head), the
        prompt tokens (encoder), or extra episodes (oracle)."""
        if self.cfg.predictor.backend == "oracle":
            with self._generating():
                return self.engine.success_rates(prompts=prompts, samples=self.cfg.predictor.oracle_samples)
        return self._learned_prompt_predictions(prompts)

    def _learned_prompt_predictions(self, prompts: Prompts) -> np.ndarray:
        """[B] the trained predictor's Vhat of each prompt (never the oracle)."""
        return self.predictor.predict(
            PrefixBatch(
                depth=torch.zeros(len(prompts), dtype=torch.long),
                prefix_len=torch.as_tensor(prompts.lengths),
                hidden=prompts.hidden,
                token_ids=[np.asarray(t) for t in prompts.token_ids] if self.predictor.reads_tokens else None,
            )
        )

    def _prefix_batch(self, forest: RolloutForest, nodes: np.ndarray) -> PrefixBatch:
        """Predictor inputs of forest nodes (roots or turn prefixes) the engine wrote this step."""
        return PrefixBatch(
            depth=torch.as_tensor(forest.depth[nodes], dtype=torch.long),
            prefix_len=torch.as_tensor(forest.path_lengths()[nodes]),
            hidden=self.engine.hidden_states(nodes),
            token_ids=self._path_tokens(forest, nodes),
        )

    def _path_tokens(self, forest: RolloutForest, nodes: np.ndarray) -> list[np.ndarray] | None:
        """Each node's prefix tokens (root to node) when the predictor reads tokens (encoder, n-grams), else None."""
        if not self.predictor.reads_tokens:
            return None
        return prefix_tokens(forest, nodes)

    def _predict_nodes(self, forest: RolloutForest, nodes: np.ndarray) -> np.ndarray:
        if self.cfg.predictor.backend == "oracle":
            return self.engine.success_rates(forest=forest, nodes=nodes, samples=self.cfg.predictor.oracle_samples)
        return self.predictor.predict(self._prefix_batch(forest, nodes))

    def _predictor_targets(
        self, forest: RolloutForest, order: distributed.NodeOrder | None = None
    ) -> tuple[PrefixBatch, np.ndarray, np.ndarray]:
        """Every root and internal node: its inputs, subtree success rate [K] and leaves under it [K]. Several
        ranks (`order`): every rank's nodes, in the order one process would hold them, on every rank."""
        nodes, targets, weights = training_targets(forest)
        batch = self._prefix_batch(forest, nodes)
        if order is None:
            return batch, targets, weights
        payload = {"depth": batch.depth, "prefix_len": batch.prefix_len, "targets": targets, "weights": weights}
        payload.update({k: getattr(batch, k) for k in ("hidden", "token_ids") if getattr(batch, k) is not None})
        merged, _ = self.world.gather_sorted(order.of(nodes), payload)
        whole = PrefixBatch(
            depth=merged["depth"],
            prefix_len=merged["prefix_len"],
            hidden=merged.get("hidden"),
            token_ids=merged.get("token_ids"),
        )
        return whole, merged["targets"], merged["weights"]

    def _update_predictor(self, batch: PrefixBatch, targets: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """Regress Vhat onto subtree success rates (docs/method.md step 5); never enters the policy loss."""
        return self.predictor.observe(batch, targets, weights) if len(batch) else {}

    def _calibration(self, forest, prompts: Prompts, v, counts, expansion: Expansion) -> dict[str, float]:
        """How well this step's predictions, made before the outcomes, matched them."""
        a = self.cfg.allocation
        active = counts > 0
        roots = np.array([forest.root_of(i) for i in prompts.prompt_ids[active]], dtype=np.int64)
        contrast_roots = root_mixed_probability(v[active], counts[active], eps=a.eps)
        contrast_anchors = 1.0 - repeat_probability(expansion.predicted, expansion.outcome, a.eps)
        pred = Predictions(
            nodes=np.concatenate([roots, expansion.anchors]).astype(np.int64),
            value=np.concatenate([v[active], expansion.predicted]),
            contrast=np.concatenate([contrast_roots, contrast_anchors]),
        )
        rates, leaves, mixed = forest.subtree_success_rates(), forest.subtree_leaf_counts(), forest.is_mixed()
        inputs = (pred.value, rates[pred.nodes], leaves[pred.nodes], mixed[pred.nodes], pred.contrast)
        if self.world.distributed:  # over every rank's predictions
            inputs = tuple(self.world.concat(x) for x in inputs)
        cal = calibration(*inputs)
        return {f"predictor/{k}": x for k, x in cal.items()}

    def _head_calibration(self, forest, prompts: Prompts, counts, expansion: Expansion) -> dict[str, float]:
        """Oracle runs: the learned predictor's calibration on the same roots and anchors the oracle predicted
        (`predictor/head_*`), so one run shows how much the learned predictor loses against the oracle. The
        anchors are the ones the oracle's allocation picked."""
        v = self._learned_prompt_predictions(prompts)
        anchors = expansion.anchors
        predicted = self.predictor.predict(self._prefix_batch(forest, anchors)) if anchors.size else anchors * 0.0
        learned = dataclasses.replace(expansion, predicted=np.asarray(predicted, dtype=np.float64))
        cal = self._calibration(forest, prompts, v, counts, learned)
        return {k.replace("predictor/", "predictor/head_"): x for k, x in cal.items()}

    # ------------------------------------------------------------------ the policy
    def _update_policy(self, forest: RolloutForest) -> dict[str, float]:
        """Advantages on the finished forest (docs/method.md step 6), then the packed clipped loss."""
        o = self.cfg.optim
        lr = learning_rate(
            self.step,
            lr=o.lr,
            steps=self.cfg.steps,
            schedule=o.lr_schedule,
            warmup_steps=o.warmup_steps,
            min_lr_ratio=o.min_lr_ratio,
        )
        if self.world.distributed and not forest.leaves.size:  # Stage 1 gave this rank's prompts no rollout
            return self.updater.update(forest, np.zeros(forest.num_nodes), "leaf", lr)  # it still takes part
        advantages, kind = compute_advantages(forest, o.advantage)
        return self.updater.update(forest, advantages, kind, lr)

    def _rollout_metrics(
        self, forest, bare: Generated, counts, expansion: Expansion, generated_tokens: int, informed: bool
    ) -> dict[str, float]:
        return {
            "step": self.step,
            "leaves": int(forest.leaves.size),
            "leaves_sampled": self.leaves_sampled,
            "prompts": int((counts > 0).sum()),
            "success_leaves": float(forest.reward[forest.leaves].mean()),
            "success_bare": float(forest.reward[bare.leaves].mean()),
            "effective_ratio": forest.effective_ratio(),
            "generated_tokens": generated_tokens,
            "predictor_informed": float(informed),
            "continuation_budget_reassigned": expansion.reassigned,
            "expansion_rounds_run": expansion.rounds,
        }

    # ------------------------------------------------------------------ generation set-up
    def _sampling(self, greedy: bool) -> SamplingParams:
        g = self.cfg.generation
        return SamplingParams(
            temperature=0.0 if greedy else g.temperature,
            top_p=1.0 if greedy else g.top_p,
            max_tokens=g.max_tokens_per_turn,
            stop_strings=tuple(g.stop_strings),
            stop_token_ids=self.policy.stop_token_ids,
        )

    def _make_engine(self) -> HFRolloutEngine:
        g, env = self.cfg.generation, self.cfg.env
        num_pages = self._num_pages()
        self._check_cache_memory(num_pages)
        model = self.rollout_weights.model if self.rollout_weights is not None else self.model  # FSDP2: the copy
        engine = HFRolloutEngine(
            model,
            self.policy.codec,
            lambda: make_env(env.name, **env.env),
            sampling=self._sampling(greedy=False),
            num_pages=num_pages,
            page_size=g.page_size,
            decode_backend=self.backend,
            kv_dtype=self.policy.compute_dtype,
            seed=self.cfg.seed,
            streams=self.cfg.sampling_streams,
        )
        cache = engine.runner.cache
        log.info("KV cache: %d pages of %d tokens, %s", cache.num_pages, cache.page_size, _size(cache.nbytes))
        return engine

    def _num_pages(self) -> int:
        """generation.num_pages, or with "auto" the pages kv_memory_fraction of free GPU memory holds."""
        g = self.cfg.generation
        if g.num_pages != "auto":
            return g.num_pages
        device = self.policy.device
        if torch.device(device).type != "cuda":
            raise ConfigError(
                f"generation.num_pages: 'auto' sizes the KV cache from free GPU memory, but the model "
                f"is on {device}; give a number of pages"
            )
        free, _ = torch.cuda.mem_get_info(device)
        per_page = page_bytes(**kv_geometry(self.model, self.policy.compute_dtype), page_size=g.page_size)
        pages = int(g.kv_memory_fraction * free) // per_page
        if pages < 1:
            raise ConfigError(
                f"generation.num_pages: 'auto' found {free / 2**30:.2f} GiB free; "
                f"kv_memory_fraction {g.kv_memory_fraction} of it holds no page"
            )
        return pages

    def _check_cache_memory(self, num_pages: int) -> None:
        """A KV cache the device cannot hold is a ConfigError before anything is allocated (not a failed
        20 TB allocation)."""
        g = self.cfg.generation
        geometry = kv_geometry(self.model, self.policy.compute_dtype)
        needed = num_pages * page_bytes(**geometry, page_size=g.page_size)
        device = torch.device(self.policy.device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            limit, where = free, f"{device} has {gib(free)} free"
        else:
            _, available = host_memory()
            limit, where = available, f"this machine has {gib(available)} of memory available"
        if needed > limit:
            raise ConfigError(
                "generation.num_pages",
                f"the KV cache would take {gib(needed)} ({num_pages} pages x {g.page_size} tokens x "
                f"{geometry['num_layers']} layers x {geometry['num_kv_heads']} kv heads x head_dim "
                f"{geometry['head_dim']} x 2 (K, V) in {geometry['dtype']}), but {where}; lower "
                "generation.num_pages or generation.page_size",
            )

    @contextlib.contextmanager
    def _generating(self):
        """Generation runs in the compute dtype; a step that outgrows the KV cache names the setting
        to change, not the cache internals."""
        try:
            with self.policy.compute():
                yield
        except CacheCapacityError as err:
            cache = self.engine.runner.cache
            raise ConfigError(
                f"generation.num_pages: {err}. This run's cache holds {cache.num_pages} pages "
                f"({_size(cache.nbytes)}); raise generation.num_pages (or use "
                f"'auto' on a GPU) or lower allocation.roots / generation.max_tokens_per_turn"
            ) from None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, num_tasks: int | None = None) -> dict[str, float]:
        """Success on the held-out split, one episode per task: `eval/success` samples like training
        does, `eval/success_greedy` decodes greedily, each with its 95% interval over the tasks
        (`_ci_low` / `_ci_high`: Wilson for 0/1 rewards, else bootstrap). Metrics the env reports on
        an episode's last turn (its `eval_metrics`, e.g. QA's em / f1 / f1_hit) are averaged too, an
        episode without them counting 0. Seeds are fixed, so evaluations compare."""
        num_tasks = self.cfg.eval_tasks if num_tasks is None else num_tasks
        if num_tasks < 1:
            raise ConfigError("eval_tasks", f"must be >= 1, got {num_tasks}")
        tasks = self.eval_tasks[:num_tasks]
        result: dict[str, float] = {"eval/tasks": len(tasks)}
        training_sampling = self.engine.sampling
        world = self.world
        if world.distributed:  # each rank evaluates its share of the tasks; results are gathered in task order
            self._refresh_rollout_weights()
            lo, hi = distributed.shard(len(tasks), world)
            tasks = tasks[lo:hi]
        try:  # the training engine and its KV pool, with evaluation's decoding settings
            for name, greedy in (("eval/success", False), ("eval/success_greedy", True)):
                self.engine.sampling = [self._sampling(greedy)]
                self.engine.reseed(self.cfg.seed + 7919)
                forest = RolloutForest()
                with self._generating():
                    prompts = (
                        self.engine.prefill(tasks, prompt_ids=range(lo, hi))
                        if world.distributed
                        else self.engine.prefill(tasks)
                    )
                    out = self.engine.rollout(forest, prompts, [1] * len(tasks))
                self.engine.release_all()
                rewards = forest.reward[out.leaves]
                infos = list(out.info)
                if world.distributed:
                    rewards = world.concat(rewards)
                    infos = [info for part in world.all_gather(infos) for info in part]
                result[name] = float(rewards.mean())
                result[f"{name}_ci_low"], result[f"{name}_ci_high"] = mean_interval(rewards)
                for key in self.env_metrics:
                    suffix = name.removeprefix("eval/success")  # "" or "_greedy"
                    result[f"eval/{key}{suffix}"] = float(np.mean([float(i.get(key, 0.0)) for i in infos]))
        finally:
            self.engine.sampling = training_sampling
        return result

    def reference_levels(self, num_tasks: int | None = None) -> dict[str, float]:
        """`reference/<policy>`: scripted policies' success on the tasks `evaluate` uses, when the env's task
        source knows them (the grid world: the random-direction and the optimal policy, exactly)."""
        if self._reference_success is None:
            return {}
        tasks = self.eval_tasks[: self.cfg.eval_tasks if num_tasks is None else num_tasks]
        return {f"reference/{name}": value for name, value in self._reference_success(tasks).items()}

    # ------------------------------------------------------------------ the loop, checkpoints
    def fit(self, progress=None) -> list[dict]:
        """Train until cfg.steps; returns this call's metrics. Writes run_dir/metrics.png at the end."""
        self._check_writable()
        history = []
        if self.step == 0 and self.cfg.eval_at_start:  # the untrained policy: the paper's "untrained ReAct" row
            row = {"step": 0, "leaves_sampled": 0, **self.evaluate(), **self.reference_levels()}
            if self.metrics is not None:  # rank 0 writes
                self.metrics.write(row, 0)
            history.append(row)
        while self.step < self.cfg.steps:
            metrics = self.train_step()
            if (self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.cfg.steps:
                metrics.update(self.evaluate())
            if self.metrics is not None:  # rank 0 writes
                self.metrics.write(metrics, self.step)
            history.append(metrics)
            if progress is not None:
                progress(metrics)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                self.save()
        if self.metrics is not None:
            self.metrics.plot(self._run_label(), seed=self.cfg.seed)
        return history

    def _run_label(self) -> str:
        """The plot's name for this run: the mode, or root/prefix when a stage was picked; +oracle."""
        a = self.cfg.allocation
        label = a.mode if a.root_strategy is None and a.prefix_strategy is None else self.allocation.describe()
        return label + ("+oracle" if self.cfg.predictor.backend == "oracle" else "")

    def _check_writable(self) -> None:
        if not self.world.is_main and not self.read_only:  # other ranks write only their checkpoint shards
            return
        if self.read_only or self.lock is None or self.metrics is None:
            raise RuntimeError("this trainer does not own a run directory (read-only, or closed): it cannot train")

    def save(self) -> Path:
        self._check_writable()
        if self.world.distributed:  # sharded (torch.distributed.checkpoint); every rank takes part
            return dist_checkpoint.save(
                self.run_dir,
                self.step,
                self.world,
                self.updater.train_model,
                self.optimizer,
                {
                    "step": self.step,
                    "leaves_sampled": self.leaves_sampled,
                    "config": to_dict(self.cfg),
                    "predictor": self.predictor.state_dict(),
                    "grad_scaler": self.updater.scaler.state_dict(),
                },
            )
        state = {
            "step": self.step,
            "leaves_sampled": self.leaves_sampled,
            "config": to_dict(self.cfg),
            "model": trainable_state_dict(self.model),  # LoRA: the adapters only
            **self.updater.state_dict(),
            "predictor": self.predictor.state_dict(),
            "rng": ckpt.rng_state(),
        }
        return ckpt.save_checkpoint(self.run_dir, self.step, state)

    def _load_latest(self) -> None:
        """Continue from the newest intact checkpoint; what was skipped (damaged checkpoints, a bad or missing
        `latest`) is named in a warning, damaged files are moved aside (`*.corrupt`), and metrics.jsonl is
        repaired and cut back to the checkpoint's step."""
        if self.world.distributed:
            return self._load_latest_sharded()
        dist_checkpoint.check_world_size(self.run_dir, 1)  # a run of several processes: say so first
        path, state, skipped = ckpt.resumable_checkpoint(self.run_dir)
        if skipped:
            log.warning(
                "resume: skipped %s; %s",
                "; ".join(skipped),
                f"resuming from {path.name}" if path is not None else "no intact checkpoint is left",
            )
        if path is None or state is None:
            detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            raise ConfigError("resume", f"{self.run_dir} has no checkpoint to resume from{detail}")
        # rebuilt like config.yaml is on --resume: keys added since the run started (model.lora, ...) take defaults
        saved = to_dict(from_dict(TrainConfig, {**state["config"], "run_dir": None}))
        for key in ("seed", "model", "env", "allocation", "optim"):
            if saved[key] != to_dict(self.cfg)[key]:
                raise ConfigError(
                    f"resume: {key} differs from the run's saved config.yaml; resume with the same config"
                )
        load_trainable_state_dict(self.model, state["model"])
        self.updater.load_state_dict(state)
        self.predictor.load_state_dict(state["predictor"])
        ckpt.set_rng_state(state["rng"])
        self.step, self.leaves_sampled = int(state["step"]), int(state["leaves_sampled"])
        self._set_aside(path)
        self.metrics = MetricsLog(
            self.run_dir, fresh=False, logging_cfg=self.cfg.logging
        )  # repairs a partial last line or a missing file
        self.metrics.truncate_after(self.step)  # rows after the checkpoint belong to steps that run again

    def _load_latest_sharded(self) -> None:
        """Several ranks: continue from the newest intact sharded checkpoint, written with this world size."""
        path, state, skipped = dist_checkpoint.load(self.run_dir, self.world, self.updater.train_model, self.optimizer)
        if skipped and self.world.is_main:
            log.warning("resume: skipped %s; resuming from %s", "; ".join(skipped), path.name)
        saved = state["config"]
        for key in ("seed", "model", "env", "allocation", "optim"):
            if saved[key] != to_dict(self.cfg)[key]:
                raise ConfigError(
                    f"resume: {key} differs from the run's saved config.yaml; resume with the same config"
                )
        self.predictor.load_state_dict(state["predictor"])
        if state.get("grad_scaler"):
            self.updater.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.leaves_sampled = int(state["step"]), int(state["leaves_sampled"])
        self.updater.version = self.step  # the engine's FSDP2 copy still holds the initial weights: refresh it
        if self.world.is_main:
            dist_checkpoint.point_latest(path)
            self.metrics = MetricsLog(self.run_dir, fresh=False)
            self.metrics.truncate_after(self.step)

    def _set_aside(self, resumed: Path) -> None:
        """Move checkpoints that fail verification to `<name>.corrupt` (kept, out of the way of pruning and of the
        next resume) and point `latest` at the checkpoint the run resumed from."""
        folder = resumed.parent
        for other in folder.glob("step_*.pt"):
            if other != resumed and ckpt.verify(other) is not None:
                other.rename(other.with_name(other.name + ".corrupt"))
                log.warning("resume: moved the damaged checkpoint %s aside to %s.corrupt", other.name, other.name)
        ckpt._atomic_write(folder / ckpt.LATEST, lambda handle: handle.write(resumed.name.encode()))


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"
