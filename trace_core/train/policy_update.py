"""Policy update of a step (docs/method.md step 6): the packed tree forward, the fused logprob and
the exact packed clipped-surrogate loss, over micro-batches of whole trees, then one optimizer step
per epoch."""

from __future__ import annotations

import copy

import numpy as np
import torch

from trace_core.forest import RolloutForest
from trace_core.loss import leaf_weights, packed_loss_weights, packed_policy_loss
from trace_core.model.policy import Policy
from trace_core.model.tree_forward import tree_forward
from trace_core.packing.forest import PackedTree, pack, split_by_tokens
from trace_core.train.config import OptimConfig
from trace_kernels import linear_logprob


class PolicyUpdater:
    """Owns the optimizer state of the policy: AdamW over the (fp32 master) weights, a loss scaler
    for float16 compute, and the frozen reference model when the KL term is on.

    temperature  the sampling temperature the logprobs are recomputed at (0: untempered)
    backend      kernel backend for tree attention and the fused logprob (None: auto)
    """

    def __init__(self, policy: Policy, optim: OptimConfig, *, temperature: float, backend: str | None):
        self.policy, self.model, self.cfg = policy, policy.model, optim
        self.temperature = temperature or 1.0  # greedy sampling records untempered logprobs
        self.backend = backend
        # the trainable parameters only: with LoRA the frozen base weights get no optimizer state (all of them otherwise)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=optim.lr, weight_decay=optim.weight_decay)
        # float16 compute over fp32 master weights: scale the loss so small gradients do not flush
        # to zero in fp16 (bf16 has fp32's range and needs none); a step with inf/nan grads is skipped
        self.scaler = torch.amp.GradScaler(
            policy.device.type, enabled=policy.autocast and policy.compute_dtype == torch.float16
        )
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False) if optim.kl_coef > 0 else None

    def update(self, forest: RolloutForest, advantages: np.ndarray, kind: str, lr: float) -> dict[str, float]:
        """`optim.epochs` optimizer steps on `forest` with per-leaf (or per-node, `kind`) advantages [n]."""
        cfg = self.cfg
        full = pack(forest)
        weights_all = leaf_weights(forest, full, cfg.loss_agg)
        batches = [
            full if len(roots) == forest.roots.size else pack(forest, roots=roots)
            # a tree larger than micro_batch_tokens runs alone (TRACE may give one prompt many leaves)
            for roots in split_by_tokens(forest, cfg.micro_batch_tokens, oversized="alone")
        ]
        ratio_dev, ratio_max_dev = 0.0, 0.0  # first epoch only
        for epoch in range(cfg.epochs):
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss_total, clip_weighted, entropy_total = 0.0, 0.0, 0.0
            for packed in batches:
                weights = packed_loss_weights(
                    forest, packed, advantages, kind, loss_agg=cfg.loss_agg, leaf_weight=weights_all
                )
                pos, neg, kl_w = weights.to_torch(device=self.policy.device)
                with self.policy.compute():  # forwards under autocast (master weights); backward outside
                    hidden = tree_forward(self.model, packed, backend=self.backend)
                    loss, m = self.packed_loss(packed, hidden, pos, neg, kl_w)
                self.scaler.scale(loss).backward()
                loss_total += loss.item()
                clip_weighted += m["clip_fraction"].item() * float(kl_w.sum())
                entropy_total += m["entropy"].item()
                if epoch == 0:  # before any update: how far the trainer's logprobs are from the sampler's
                    ratio_dev += m["ratio_abs_dev"].item() * float(kl_w.sum())
                    ratio_max_dev = max(ratio_max_dev, m["ratio_max_dev"].item())
            self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unless float16)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.model.eval()
        metrics = {
            "loss": loss_total,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "clip_fraction": clip_weighted,
            "entropy": entropy_total,
            "sampler/ratio_abs_dev": ratio_dev,
            "sampler/ratio_max_dev": ratio_max_dev,  # first epoch
            "tokens_packed": full.num_tokens,
            "tokens_leaf_paths": full.num_leaf_path_tokens,
            "dedup_ratio": full.num_leaf_path_tokens / max(full.num_tokens, 1),
        }
        if self.scaler.is_enabled():
            metrics["grad_scale"] = float(self.scaler.get_scale())
        return metrics

    def packed_loss(self, packed: PackedTree, hidden: torch.Tensor, pos, neg, kl_w):
        """Logprobs of the model tokens only (the others carry no loss), then the clipped surrogate.

        hidden [N, H] over the packed tokens; pos / neg / kl_w [N] per-token loss weights."""
        device = hidden.device
        use = packed.loss_mask[packed.label_pos]
        rows = torch.as_tensor(packed.label_rows[use], device=device)
        labels = torch.as_tensor(packed.labels[use], device=device)
        positions = torch.as_tensor(packed.label_pos[use], device=device)
        token_lp, entropy = self._token_logprobs(self.model, hidden, packed.num_tokens, rows, labels, positions)
        # the engine records every sampled token's logprob; the loss refuses a NaN where a token carries weight
        old = torch.as_tensor(packed.old_logprobs, device=device)
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref_hidden = tree_forward(self.reference, packed, backend=self.backend)
                ref, _ = self._token_logprobs(
                    self.reference, ref_hidden, packed.num_tokens, rows, labels, positions, entropy=False
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

    def _token_logprobs(self, model, hidden, num_tokens, rows, labels, positions, *, entropy: bool = True):
        """[N] logprob of each labelled packed token (0 elsewhere), and [N] per-row entropies (None when
        `entropy` is False: the reference model's KL term needs none)."""
        weight = model.get_output_embeddings().weight  # under autocast the op takes both in the compute dtype
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
