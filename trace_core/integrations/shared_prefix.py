"""Per-token log-probs of a flat batch with every shared prefix computed once.

A drop-in for the per-token logprob function of trainers built on flat batches (verl's
`compute_log_prob` / actor update, TRL's GRPO `_get_per_token_logps`): same inputs (padded
`input_ids` and `attention_mask`), same output layout, same gradients, but the n completions of a
prompt run its prompt once. The batch is packed as prefix trees (`trace_core.packing.flat`),
run through the model with tree attention (`integrations.hf.tree_forward`) and scored with the
fused lm-head + log-softmax gather (`trace_kernels.linear_logprob`), so neither the repeated
prefixes nor the [tokens x vocab] logits are ever materialised.

    logprobs = shared_prefix_logprobs(model, input_ids, attention_mask)        # [B, L]
    completion_logprobs = logprobs[:, -logits_to_keep:]                        # TRL / verl slice

Sharing only happens inside the batch given: keep a prompt's completions in one micro-batch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from trace_core.model.tree_forward import autocast_off, transformers_model, tree_forward_with_head
from trace_core.packing.flat import SharedPrefixPack, as_numpy, pack_shared_prefixes
from trace_kernels import linear_logprob


def shared_prefix_logprobs(
    model: torch.nn.Module,
    input_ids,
    attention_mask=None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    packed: SharedPrefixPack | None = None,
    score_mask=None,
    lm_head_fp32: bool = False,
    backend: str | None = None,
):
    """log p(input_ids[b, t] | input_ids[b, :t]) for every position, from one packed tree pass.

    model: a transformers causal LM (Llama / Qwen2 / Qwen3 family); also a PEFT model around one
        (adapters anywhere but on the lm_head), DDP or FSDP2 (`fully_shard`): the call runs through
        the model's own forward and scores inside the lm_head's call (see `tree_forward_with_head`).
    input_ids [B, L], attention_mask [B, L] (None: no padding): padded rows, each row's tokens one
        contiguous run (left and/or right padding); a mask with a hole inside a row raises
        SequenceBatchError (a ValueError) naming attention_mask and the row.
    temperature: logits are divided by it, as in the sampler.
    packed: the `pack_shared_prefixes(input_ids, attention_mask)` result, to reuse it across calls
        on the same batch (old, reference and current policy logprobs).
    score_mask: bool [B, L], the positions whose logprob (and entropy) you need, e.g. the completion
        tokens; the lm-head work is done only for them (a prompt's rows are skipped), and every
        other position gives 0. None: every position.
    lm_head_fp32: score in fp32 (hidden states and lm_head weight upcast, autocast off), as TRL's
        `cast_lm_head_to_fp32`; default: the model's (or autocast's) dtype with fp32 accumulation.
    backend: "triton" / "cpu" to force the kernels' path (default: automatic).

    Returns logprobs [B, L] fp32 on the model's device, 0 where nothing is predicted (padding and
    each row's first token); with return_entropy=True also entropy [B, L]: the entropy of the
    distribution that predicted input_ids[b, t] (0 where logprobs is). Differentiable in the
    model's parameters; a shared token's gradient is the sum over the rows through it, exactly
    as in the per-sequence computation.
    """
    if packed is None:
        packed = pack_shared_prefixes(input_ids, attention_mask)
    elif tuple(packed.token_index.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"packed: was built for a batch of shape {tuple(packed.token_index.shape)}, "
            f"but input_ids has shape {tuple(input_ids.shape)}"
        )
    hf_model = transformers_model(model)
    if lm_head_has_adapter(hf_model):
        raise ValueError(
            "model: the lm_head carries a PEFT adapter (target_modules or modules_to_save); "
            "shared_prefix_logprobs reads lm_head.weight and would miss it: leave lm_head out of the adapter"
        )
    device = next(hf_model.parameters()).device
    pair_index, pair_rows, pair_labels = _scored_pairs(packed, score_mask)
    rows = torch.as_tensor(pair_rows, device=device)
    labels = torch.as_tensor(pair_labels, device=device)

    def score(hidden: torch.Tensor, lm_head: torch.nn.Module):  # hidden [N, H]
        """Pair logprobs (and row entropies), run inside the lm_head's own call: there its weight is
        whole even when FSDP2 shards it between calls."""
        if labels.numel() == 0:  # nothing to score (single-token rows, or an empty score_mask)
            return 0.0 * hidden.float().sum()  # keeps the graph (and DDP's bookkeeping) intact
        weight, bias = lm_head.weight, lm_head.bias
        if lm_head_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = bias.float() if bias is not None else None
        with autocast_off(device.type) if lm_head_fp32 else contextlib.nullcontext():
            return linear_logprob(
                hidden,
                weight,
                rows,
                labels,
                temperature=temperature,
                bias=bias,
                return_entropy=return_entropy,
                backend=backend,
            )

    result = tree_forward_with_head(model, packed, score, backend=backend)
    pair_index = torch.as_tensor(pair_index, device=device)  # [B, L]
    if labels.numel() == 0:
        zeros = torch.zeros(pair_index.shape, device=device) + result
        return (zeros, zeros.clone()) if return_entropy else zeros
    pair_logprobs, row_entropy = result if return_entropy else (result, None)

    predicted = pair_index >= 0
    safe = pair_index.clamp(min=0)
    zero = pair_logprobs.new_zeros(())
    logprobs = torch.where(predicted, pair_logprobs[safe], zero)
    if not return_entropy:
        return logprobs
    predicting_row = rows[safe]  # the packed row whose distribution predicted input (b, t)
    return logprobs, torch.where(predicted, row_entropy[predicting_row], zero)


def lm_head_has_adapter(hf_model: torch.nn.Module) -> bool:
    """A PEFT LoRA (`base_layer`) or trained copy (`modules_to_save`) on the lm_head: linear_logprob
    reads lm_head.weight directly and would miss it."""
    head = hf_model.get_output_embeddings()
    return head is not None and (hasattr(head, "base_layer") or hasattr(head, "modules_to_save"))


def _scored_pairs(packed: SharedPrefixPack, score_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair_index [B, L], label_rows [K], labels [K]) restricted to the pairs that `score_mask`
    positions use (all pairs when it is None); pair_index is renumbered to 0..K-1, -1 elsewhere."""
    if score_mask is None:
        return packed.pair_index, packed.label_rows, packed.labels
    mask = as_numpy(score_mask)
    if mask.shape != packed.pair_index.shape:
        raise ValueError(f"score_mask: has shape {mask.shape}, expected {packed.pair_index.shape} like input_ids")
    if mask.dtype != bool:
        raise TypeError(f"score_mask: must be boolean, got dtype {mask.dtype}")
    wanted = mask & (packed.pair_index >= 0)
    needed = np.unique(packed.pair_index[wanted])
    renumber = np.full(packed.labels.size, -1, np.int64)
    renumber[needed] = np.arange(needed.size)
    pair_index = np.where(wanted, renumber[np.maximum(packed.pair_index, 0)], -1)
    return pair_index, packed.label_rows[needed], packed.labels[needed]
