"""TRL adapter: GRPOTrainer scoring completions with each shared prompt computed once.

TRL's GRPOTrainer scores a batch (old, reference and current-policy log-probs) by running every
row, prompt and completion, through the model; a group's `num_generations` rows repeat one prompt.
`SharedPrefixGRPOTrainer` replaces that scoring with `shared_prefix_logprobs`: rows are packed as
prefix trees (any shared prefix, found by token, even in TRL's shuffled training micro-batches) and
run once with tree attention and the fused logprob op. Same outputs and gradients as TRL's own
scoring (tested); generation, rewards and the loss are TRL's.

    from trace_core.integrations.trl_grpo import SharedPrefixGRPOTrainer
    trainer = SharedPrefixGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), ...)

`SharedPrefixLogprobsMixin` does the same for your own GRPOTrainer subclass (put it first in the
bases). Multi-process DDP and FSDP2 (`fully_shard`) training work: the packed forward runs through
the model's own forward (DDP synchronises gradients, FSDP2 gathers parameters) and scores inside
the lm_head's call, where its weight is whole. Falls back to TRL's scoring, saying why once, where
the packed forward does not apply: multimodal inputs, MoE aux loss, logit soft-capping or scaling,
a PEFT adapter on the lm_head (PEFT adapters elsewhere are fine), and FSDP1 or DeepSpeed wrappers.
"""

from __future__ import annotations

import logging

import torch
from trl import GRPOTrainer

from trace_core.integrations.shared_prefix import lm_head_has_adapter, shared_prefix_logprobs
from trace_core.model.tree_forward import transformers_model
from trace_core.packing.flat import shared_prefix_micro_batches

log = logging.getLogger(__name__)

_MULTIMODAL = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class SharedPrefixLogprobsMixin:
    """Overrides GRPOTrainer._get_per_token_logps_and_entropies (TRL >= 1.0 signature)."""

    shared_prefix_calls = 0  # packed scoring calls this trainer made (the fallback does not count)

    def _shared_prefix_blocker(self, model, compute_aux_loss: bool, multimodal: dict) -> str | None:
        """Why the packed forward cannot score this call, or None."""
        if any(value is not None for value in multimodal.values()):
            return "multimodal inputs"
        if compute_aux_loss:
            return "the MoE load-balancing aux loss"
        hf_model = transformers_model(model)
        if hf_model is not transformers_model(self.accelerator.unwrap_model(model)):
            # accelerate unwrapped something we do not: FSDP1 (flat parameters) or DeepSpeed
            return "a distributed wrapper other than DDP and FSDP2 (FSDP1, DeepSpeed)"
        if lm_head_has_adapter(hf_model):
            return "a PEFT adapter on the lm_head"
        text_config = hf_model.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None) not in (
            None,
            1,
            1.0,
        ):
            return "logit soft-capping or scaling"
        return None

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        blocker = self._shared_prefix_blocker(model, compute_aux_loss, multimodal)
        if blocker is not None:
            if not getattr(self, "_shared_prefix_warned", False):
                log.warning("SharedPrefixGRPOTrainer: %s; scoring with TRL's per-row forward instead", blocker)
                self._shared_prefix_warned = True
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )

        # TRL scores in chunks of `batch_size` rows to bound memory. Here a chunk is a budget of
        # batch_size x width *packed* tokens (never more than TRL's chunk runs), filled with rows in
        # token order, so a prompt's completions share one pass even across TRL's chunk borders.
        B, width = input_ids.shape
        if batch_size is None or batch_size >= B:
            groups = [torch.arange(B)]
        else:
            groups = [
                torch.as_tensor(rows)
                for rows in shared_prefix_micro_batches(input_ids, attention_mask, max_tokens=batch_size * width)
            ]
        completion = torch.zeros_like(attention_mask, dtype=torch.bool)
        completion[:, -logits_to_keep:] = True  # TRL reads these columns only: score nothing else
        logps, entropies = [], []
        for rows in groups:
            rows = rows.to(input_ids.device)
            with self.accelerator.autocast():
                result = shared_prefix_logprobs(
                    model,
                    input_ids[rows],
                    attention_mask[rows],
                    temperature=self.temperature,
                    return_entropy=compute_entropy,
                    score_mask=completion[rows],
                    lm_head_fp32=bool(getattr(self.args, "cast_lm_head_to_fp32", False)),
                )
            logp, entropy = result if compute_entropy else (result, None)
            logps.append(logp[:, -logits_to_keep:])
            if compute_entropy:
                entropies.append(entropy[:, -logits_to_keep:])
            self.shared_prefix_calls += 1
        inverse = torch.argsort(torch.cat(groups)).to(input_ids.device)  # back to the caller's row order
        return torch.cat(logps)[inverse], torch.cat(entropies)[inverse] if compute_entropy else None, None


class SharedPrefixGRPOTrainer(SharedPrefixLogprobsMixin, GRPOTrainer):
    """trl.GRPOTrainer whose log-prob scoring computes each shared prefix once (see the module)."""
