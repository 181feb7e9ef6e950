"""Policy update of a step (docs/method.md step 6): the packed tree forward, the fused logprob and
the exact packed clipped-surrogate loss, over micro-batches of whole trees, then one optimizer step
per epoch.

Over N ranks (trace_core/train/distributed.py) each rank packs the trees of its own prompts; the loss's
denominator (model tokens, or leaves) is summed over the ranks, so the ranks' losses add up to the loss one
process computes on the whole step, and the gradients are summed (DDP / FSDP2 average them: the loss is scaled
by N). Every rank runs the same number of micro-batches (a rank with fewer runs empty ones), because each
forward and backward of a wrapped model is a collective; gradients are reduced once, after the last.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch

from trace_core.forest import RolloutForest
from trace_core.loss import leaf_weights, loss_denominator, packed_loss_weights, packed_policy_loss
from trace_core.model.policy import Policy
from trace_core.model.tree_forward import tree_forward, tree_forward_with_head
from trace_core.packing.forest import PackedTree, pack, split_by_tokens
from trace_core.train.config import OptimConfig
from trace_core.train.distributed import SINGLE, World
from trace_kernels import linear_logprob


class PolicyUpdater:
    """Owns the optimizer state of the policy: AdamW over the (fp32 master) weights, a loss scaler
    for float16 compute, and the frozen reference model when the KL term is on.

    temperature  the sampling temperature the logprobs are recomputed at (0: untempered)
    backend      kernel backend for tree attention and the fused logprob (None: auto)
    world, wrap  several ranks: wrap(model) -> the DDP / FSDP2 module the update runs (trace_core/train/parallel.py)
    """

    def __init__(
        self,
        policy: Policy,
        optim: OptimConfig,
        *,
        temperature: float,
        backend: str | None,
        world: World = SINGLE,
        wrap=None,
    ):
        self.policy, self.model, self.cfg = policy, policy.model, optim
        self.temperature = temperature or 1.0  # greedy sampling records untempered logprobs
        self.backend = backend
        self.world = world
        self.version = 0  # optimizer steps taken (FSDP2's rollout copy refreshes when it changes)
        # the frozen reference is a plain full copy on every rank, made before FSDP2 shards the model in place
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if optim.kl_coef > 0 else None
        self.train_model = wrap(self.model) if wrap is not None else self.model  # what forwards and backwards run
        # the trainable parameters only: with LoRA the frozen base weights get no optimizer state (all of them otherwise)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
        # float16 compute over fp32 master weights: scale the loss so small gradients do not flush
        # to zero in fp16 (bf16 has fp32's range and needs none); a step with inf/nan grads is skipped
        self.scaler = torch.amp.GradScaler(
            policy.device.type, enabled=policy.autocast and policy.compute_dtype == torch.float16
        )

    def update(self, forest: RolloutForest, advantages: np.ndarray, kind: str, lr: float) -> dict[str, float]:
        """`optim.epochs` optimizer steps on `forest` with per-leaf (or per-node, `kind`) advantages [n]."""
        cfg, world = self.cfg, self.world
        if world.distributed:
            return self._update_sharded(forest, advantages, kind, lr)
        full = pack(forest)
        weights_all = leaf_weights(forest, full, cfg.loss_agg)
        batches = [
            full if len(roots) == forest.roots.size else pack(forest, roots=roots)
            # a tree larger than micro_batch_tokens runs alone (TRACE may give one prompt many leaves)
            for roots in split_by_tokens(forest, cfg.micro_batch_tokens, oversized="alone")
        ]
        return self._run(forest, full, batches, weights_all, advantages, kind, lr)

    def _update_sharded(self, forest: RolloutForest, advantages: np.ndarray, kind: str, lr: float) -> dict[str, float]:
        """This rank's part of the step's update (module doc): global denominator, equal micro-batch counts."""
        cfg, world = self.cfg, self.world
        full = pack(forest) if forest.roots.size else None
        total = world.sum(loss_denominator(full, cfg.loss_agg) if full is not None else 0)
        weights_all = leaf_weights(forest, full, cfg.loss_agg, total=total) if full is not None else None
        batches: list[PackedTree | None] = (
            [
                full if len(roots) == forest.roots.size else pack(forest, roots=roots)
                for roots in split_by_tokens(forest, cfg.micro_batch_tokens, oversized="alone")
            ]
            if full is not None
            else []
        )
        batches += [None] * (int(world.max(len(batches))) - len(batches))  # None: an empty micro-batch
        return self._run(forest, full, batches, weights_all, advantages, kind, lr)

    def _run(self, forest, full, batches, weights_all, advantages, kind, lr) -> dict[str, float]:
        """`optim.epochs` optimizer steps over `batches` (micro-batches of `full`; None: an empty one)."""
        cfg, world = self.cfg, self.world
        model = self.train_model
        ratio_dev, ratio_max_dev = 0.0, 0.0  # first epoch only
        for epoch in range(cfg.epochs):
            model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss_total, clip_weighted, entropy_total = 0.0, 0.0, 0.0
            for i, packed in enumerate(batches):
                if packed is None:
                    packed, (pos, neg, kl_w) = _empty_batch(self.policy.device)
                else:
                    weights = packed_loss_weights(
                        forest, packed, advantages, kind, loss_agg=cfg.loss_agg, leaf_weight=weights_all
                    )
                    pos, neg, kl_w = weights.to_torch(device=self.policy.device)
                sync = parallel_sync(model, i == len(batches) - 1) if world.distributed else _NULL
                with sync:  # gradients are reduced across ranks after the last micro-batch only
                    with self.policy.compute():  # forwards under autocast (master weights); backward outside
                        loss, m = self.packed_loss(packed, None, pos, neg, kl_w)
                    # DDP / FSDP2 average the ranks' gradients; the ranks' losses already add up to the step's
                    self.scaler.scale(loss * world.size if world.distributed else loss).backward()
                loss_total += loss.item()
                clip_weighted += m["clip_fraction"].item() * float(kl_w.sum())
                entropy_total += m["entropy"].item()
                if epoch == 0:  # before any update: how far the trainer's logprobs are from the sampler's
                    ratio_dev += m["ratio_abs_dev"].item() * float(kl_w.sum())
                    ratio_max_dev = max(ratio_max_dev, m["ratio_max_dev"].item())
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unless float16)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor over the shards' norms
                grad_norm = grad_norm.full_tensor()
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.version += 1
        model.eval()
        metrics = {
            "loss": loss_total,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "clip_fraction": clip_weighted,
            "entropy": entropy_total,
            "sampler/ratio_abs_dev": ratio_dev,
            "sampler/ratio_max_dev": ratio_max_dev,  # first epoch
            "tokens_packed": full.num_tokens if full is not None else 0,
            "tokens_leaf_paths": full.num_leaf_path_tokens if full is not None else 0,
            "dedup_ratio": full.num_leaf_path_tokens / max(full.num_tokens, 1) if full is not None else 0.0,
        }
        if self.scaler.is_enabled():
            metrics["grad_scale"] = float(self.scaler.get_scale())
        return metrics

    def packed_loss(self, packed: PackedTree, hidden: torch.Tensor | None, pos, neg, kl_w):
        """Logprobs of the model tokens only (the others carry no loss), then the clipped surrogate.

        hidden [N, H] over the packed tokens, or None: the packed forward runs here, through the training module
        (DDP / FSDP2), with the fused logprob inside the lm-head's call (where FSDP2 has gathered its weight).
        pos / neg / kl_w [N] per-token loss weights."""
        device = self.policy.device
        use = packed.loss_mask[packed.label_pos]
        rows = torch.as_tensor(packed.label_rows[use], device=device)
        labels = torch.as_tensor(packed.labels[use], device=device)
        positions = torch.as_tensor(packed.label_pos[use], device=device)
        if hidden is None:
            token_lp, entropy = tree_forward_with_head(
                self.train_model,
                packed,
                lambda h, head: self._token_logprobs(head, h, packed.num_tokens, rows, labels, positions),
                backend=self.backend,
            )
        else:
            token_lp, entropy = self._token_logprobs(
                self.model.get_output_embeddings(), hidden, packed.num_tokens, rows, labels, positions
            )
        # the engine records every sampled token's logprob; the loss refuses a NaN where a token carries weight
        old = torch.as_tensor(packed.old_logprobs, device=device)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref_hidden = tree_forward(self.reference, packed, backend=self.backend)
                ref, _ = self._token_logprobs(
                    self.reference.get_output_embeddings(),
                    ref_hidden,
                    packed.num_tokens,
                    rows,
                    labels,
                    positions,
                    entropy=False,
                )
        loss, metrics = packed_policy_loss(
            token_lp,
            old,
            pos,
            neg,
            kl_w,
            eps_low=self.cfg.eps_low,
            eps_high=self.cfg.eps_high,
            ref_logprobs=ref,
            kl_coef=self.cfg.kl_coef,
        )
        # entropy of the sampling distribution behind each model token, aggregated like the loss
        token_entropy = (kl_w[positions] * entropy[rows]).sum()
        metrics["entropy"] = token_entropy.detach()
        return loss - self.cfg.entropy_coef * token_entropy, metrics

    def _token_logprobs(self, head, hidden, num_tokens, rows, labels, positions, *, entropy: bool = True):
        """[N] logprob of each labelled packed token (0 elsewhere), and [N] per-row entropies (None when
        `entropy` is False: the reference model's KL term needs none). head: the model's lm-head."""
        weight = head.weight  # under autocast the op takes both in the compute dtype
        out = linear_logprob(
            hidden, weight, rows, labels, temperature=self.temperature, backend=self.backend, return_entropy=entropy
        )
        pair_lp, row_entropy = out if entropy else (out, None)
        token_lp = torch.zeros(num_tokens, device=hidden.device, dtype=pair_lp.dtype).index_copy(0, positions, pair_lp)
        return token_lp, row_entropy

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("grad_scaler"):  # absent in checkpoints from before loss scaling; empty when disabled
            self.scaler.load_state_dict(state["grad_scaler"])


_NULL = contextlib.nullcontext()


def parallel_sync(model: torch.nn.Module, last: bool):
    from trace_core.train.parallel import set_gradient_sync

    return set_gradient_sync(model, last)


def _empty_batch(device) -> tuple[PackedTree, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A one-turn tree with zero loss weights: a rank without (more) trees still runs the forward and backward
    every rank must (each is a collective under DDP / FSDP2) and adds nothing to the gradients."""
    forest = RolloutForest()
    leaf = forest.add_node(forest.add_root(0, [0]), [0], [True], [0.0])
    forest.set_reward(leaf, 0.0)
    packed = pack(forest)
    zeros = torch.zeros(packed.num_tokens, dtype=torch.float32, device=device)
    return packed, (zeros, zeros.clone(), zeros.clone())
