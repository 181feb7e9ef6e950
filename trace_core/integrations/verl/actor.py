"""Shared-prefix training in verl's FSDP2 actor: each shared prefix of a micro-batch computed once.

verl 0.9.1's actor (`verl.workers.engine_workers.ActorRolloutRefWorker` -> `TrainingWorker`) runs
the engine that `verl.workers.engine.EngineRegistry` holds for ("language_model", strategy) on the
process's device and vendor: `FSDPEngineWithLMHead`. `SharedPrefixFSDPEngine` subclasses it and, when
its engine config says `shared_prefix: true`, replaces two methods:

- `forward_backward_batch`: micro-batches from `group_preserving_micro_batches` (rows that share a
  prefix stay in one micro-batch; token budget = verl's `max_token_len_per_gpu` with dynamic batch
  size, else `micro_batch_size_per_gpu` rows of the longest row), the same count on every
  data-parallel rank, outputs put back in the caller's row order;
- `forward_step`: the micro-batch's rows packed as prefix trees and scored by
  `trace_core.integrations.shared_prefix.shared_prefix_logprobs` (tree attention, the fused
  lm-head + log-softmax inside the lm_head's own call, where FSDP2 has gathered its weight), laid out
  as verl's `log_probs` / `entropy` nested tensors, then verl's own loss function.

The switch (docs/verl.md):

    actor_rollout_ref.actor.fsdp_config._target_=trace_core.integrations.verl.actor.SharedPrefixFSDPEngineConfig
    +actor_rollout_ref.actor.fsdp_config.shared_prefix=true
    actor_rollout_ref.actor.strategy=fsdp2

Hydra imports this module in each worker when it builds that config, and the import registers the
engine (`register_engine`) through `EngineRegistry.register` for the process's (device, vendor)
key, which verl's lookup tries before its device-wide default. With `shared_prefix` false or absent
(e.g. a reference model whose config was left alone) the engine is exactly verl's.

Outputs differ from verl's only where nothing reads them: log-probs and entropies are computed for
the response tokens alone (prompt positions hold 0; verl's loss and `no_padding_2_padding` read the
response slice). Unsupported inputs fall back to verl's forward for that micro-batch, saying why once:
multimodal inputs, 3-D (mrope) or non-contiguous position ids, per-row temperatures, top-k
distillation, `calculate_sum_pi_squared`, logit soft-capping or scaling in the model.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_id, get_device_name, get_vendor
from verl.utils.seqlen_balancing import restore_dynamic_batch
from verl.workers.config import FSDPEngineConfig
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import detach_tree, postprocess_batch_func

from trace_core.integrations.shared_prefix import shared_prefix_logprobs
from trace_core.integrations.verl.micro_batches import group_preserving_micro_batches

log = logging.getLogger(__name__)

CONFIG_TARGET = "trace_core.integrations.verl.actor.SharedPrefixFSDPEngineConfig"


@dataclass
class SharedPrefixFSDPEngineConfig(FSDPEngineConfig):
    """verl's FSDPEngineConfig plus `shared_prefix` (bool): score through shared-prefix packing."""

    shared_prefix: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.shared_prefix, bool):
            raise ValueError(
                f"fsdp_config.shared_prefix: must be true or false, got {self.shared_prefix!r} "
                f"({type(self.shared_prefix).__name__})"
            )


class SharedPrefixFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDPEngineWithLMHead; with `engine_config.shared_prefix` the forwards share prefixes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shared_prefix = bool(getattr(self.engine_config, "shared_prefix", False))
        self.shared_prefix_calls = 0  # packed forwards run (the fallback does not count)
        # (micro-batches the budget gave this rank, micro-batches run) of the last calls: ranks run
        # the largest count, so a rank may split its own further
        self.micro_batch_counts: deque[tuple[int, int]] = deque(maxlen=16)
        self._fallback_warned = False
        if self.shared_prefix:
            check_shared_prefix_config(self.engine_config)

    # -- micro-batches ---------------------------------------------------------------------------

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        """verl's FSDPEngine.forward_backward_batch with group-preserving micro-batches."""
        if not self.shared_prefix:
            return super().forward_backward_batch(data, loss_function, forward_only)
        tu.assign_non_tensor(data, sp_size=self.ulysses_sequence_parallel_size)
        return_model_output = tu.get_non_tensor_data(data=data, key="return_model_output", default=False)
        # the loss is normalised by the global token count, so it does not depend on the micro-batches
        batch_num_tokens = data["loss_mask"].sum().to(get_device_id())
        torch.distributed.all_reduce(
            batch_num_tokens, op=torch.distributed.ReduceOp.SUM, group=self.get_data_parallel_group()
        )
        tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens.item())
        tu.assign_non_tensor(data, dp_size=self.get_data_parallel_size())

        indices = self._micro_batch_rows(data)
        micro_batches = [tu.index_select_tensor_dict(data, torch.as_tensor(rows)) for rows in indices]
        output_lst = []
        scaler = getattr(self, "scaler", None)
        for k, micro_batch in enumerate(micro_batches):
            grad_ctx = torch.no_grad() if forward_only else nullcontext()
            sync_ctx = (
                nullcontext()
                if forward_only
                else self._gradient_sync_context(is_last_micro_batch=k == len(micro_batches) - 1)
            )
            with grad_ctx, sync_ctx, torch.profiler.record_function(f"micro_batch{k}"):
                loss, meta_info = self.forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
                if not forward_only:
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    if not return_model_output:
                        meta_info.pop("model_output", None)
            output_lst.append(meta_info)

        indices = [rows.tolist() for rows in indices]
        output = postprocess_batch_func(output_lst=output_lst, indices=indices, data=data)
        if not tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True):
            # verl restores the caller's row order only for its dynamic batches; ours always reorder
            output["model_output"] = {k: restore_dynamic_batch(v, indices) for k, v in output["model_output"].items()}
        return output

    def _micro_batch_rows(self, data) -> list[np.ndarray]:
        """Row indices per micro-batch, the same number of micro-batches on every dp rank."""
        input_ids = data["input_ids"]
        offsets = input_ids.offsets().cpu().numpy()
        values = input_ids.values().cpu().numpy()
        rows = [values[offsets[b] : offsets[b + 1]] for b in range(len(offsets) - 1)]
        if tu.get_non_tensor_data(data=data, key="use_dynamic_bsz", default=True):
            max_tokens = int(tu.get_non_tensor_data(data=data, key="max_token_len_per_gpu", default=None))
        else:
            rows_per_batch = int(tu.get_non_tensor_data(data=data, key="micro_batch_size_per_gpu", default=None))
            max_tokens = rows_per_batch * max(len(r) for r in rows)
        batches = group_preserving_micro_batches(rows, max_tokens=max_tokens)
        local = len(batches)
        count = torch.tensor([local], device=get_device_id())
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX, group=self.get_data_parallel_group())
        if int(count.item()) > len(batches):
            if int(count.item()) > len(rows):
                raise RuntimeError(
                    f"shared-prefix micro-batches: another data-parallel rank runs {int(count.item())} "
                    f"micro-batches but this one has only {len(rows)} rows; raise the token budget "
                    "(max_token_len_per_gpu / micro_batch_size_per_gpu) or the batch size"
                )
            batches = group_preserving_micro_batches(rows, max_tokens=max_tokens, count=int(count.item()))
        self.micro_batch_counts.append((local, len(batches)))
        return batches

    # -- forward ---------------------------------------------------------------------------------

    def forward_step(self, micro_batch, loss_function, forward_only):
        """verl's forward_step with the logits path replaced by `shared_prefix_logprobs`."""
        blocker = self._blocker(micro_batch) if self.shared_prefix else "off"
        if blocker is not None:
            if blocker != "off" and not self._fallback_warned:
                log.warning("shared-prefix actor: %s; this micro-batch runs verl's own forward", blocker)
                self._fallback_warned = True
            return super().forward_step(micro_batch, loss_function, forward_only)

        micro_batch = micro_batch.to(get_device_id())
        autocast_dtype = getattr(self, "_autocast_dtype", torch.bfloat16)
        autocast_ctx = (
            nullcontext()
            if autocast_dtype == torch.float32
            else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype)
        )
        with autocast_ctx:
            model_output = self.shared_prefix_outputs(micro_batch)
            self.shared_prefix_calls += 1
            if loss_function is not None:
                loss, metrics = loss_function(
                    model_output=model_output, data=micro_batch, dp_group=self.get_data_parallel_group()
                )
            else:
                assert forward_only, "forward_only must be True when loss_function is None"
                loss, metrics = torch.tensor(1.0, device=get_device_name()), {}
        return loss, {"model_output": detach_tree(model_output), "loss": loss.detach().item(), "metrics": metrics}

    def shared_prefix_outputs(self, micro_batch) -> dict[str, torch.Tensor]:
        """{"log_probs": nested [B, j], "entropy" (if asked)} in verl's layout: position t of a row
        holds log p(token t+1 | tokens <= t) (the row's last position: 0)."""
        input_ids = micro_batch["input_ids"]  # nested [B, j]: each row prompt + response, no padding
        offsets = input_ids.offsets()
        lengths = offsets.diff()
        batch, width = len(lengths), int(lengths.max())
        ids = torch.nested.to_padded_tensor(input_ids, padding=0, output_size=(batch, width))
        columns = torch.arange(width, device=ids.device)
        mask = columns[None, :] < lengths[:, None]  # right-padded
        # score only the response tokens: all that verl's loss and no_padding_2_padding read
        score = mask & (columns[None, :] >= (lengths - response_lengths(micro_batch, lengths))[:, None])
        calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        result = shared_prefix_logprobs(
            self.module,
            ids,
            mask,
            temperature=scalar_temperature(micro_batch["temperature"]),
            return_entropy=calculate_entropy,
            score_mask=score,
        )
        logprobs, entropy = result if calculate_entropy else (result, None)

        def verl_layout(per_token: torch.Tensor) -> torch.Tensor:
            """ours[b, t] scores token t; verl's position t scores token t + 1."""
            shifted = torch.cat([per_token[:, 1:], per_token.new_zeros(batch, 1)], 1)
            return torch.nested.nested_tensor_from_jagged(shifted[mask], offsets)

        model_output = {"log_probs": verl_layout(logprobs)}
        if calculate_entropy:
            model_output["entropy"] = verl_layout(entropy)
        return model_output

    def _blocker(self, micro_batch) -> str | None:
        """Why this micro-batch cannot take the packed forward, or None."""
        hf_config = getattr(self.model_config, "hf_config", None)
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        if getattr(text_config, "final_logit_softcapping", None) or getattr(text_config, "logit_scale", None) not in (
            None,
            1,
            1.0,
        ):
            return "logit soft-capping or scaling (the packed scoring reads raw lm_head logits)"
        if "multi_modal_inputs" in micro_batch:
            return "multimodal inputs"
        if tu.get_non_tensor_data(data=micro_batch, key="distillation_use_topk", default=False):
            return "top-k distillation"
        if tu.get_non_tensor_data(data=micro_batch, key="calculate_sum_pi_squared", default=False):
            return "calculate_sum_pi_squared"
        temperature = micro_batch["temperature"]
        if isinstance(temperature, torch.Tensor) and temperature.numel() > 1 and (temperature != temperature[0]).any():
            return "per-row temperatures"
        position_ids = micro_batch["position_ids"]
        if position_ids.dim() == 3:
            return "3-D (mrope) position ids"
        # packed positions are path depths 0, 1, 2, ...: rows whose position ids are anything else
        # (e.g. several sequences packed in one row) need verl's own forward
        lengths = position_ids.offsets().diff().tolist()
        expected = torch.cat([torch.arange(n, device=position_ids.device) for n in lengths])
        if not torch.equal(position_ids.values().to(expected.dtype), expected):
            return "position ids that do not count 0, 1, 2, ... along each row"
        return None


def response_lengths(micro_batch, lengths: torch.Tensor) -> torch.Tensor:
    """[B] response length of each row, as verl's no_padding_2_padding reads it; the whole row when
    the micro-batch has no prompts / responses (every position then gets scored)."""
    if "prompts" not in micro_batch or "responses" not in micro_batch:
        return lengths
    prompts = micro_batch["prompts"]
    if prompts.is_nested:
        return micro_batch["responses"].offsets().diff().to(lengths.device)
    return micro_batch["attention_mask"][:, prompts.shape[1] :].sum(dim=1).to(lengths.device)


def scalar_temperature(temperature) -> float:
    """verl's temperature (a float, or a [B] tensor of equal values: `_blocker` checked) as a float."""
    if isinstance(temperature, torch.Tensor):
        return float(temperature.reshape(-1)[0])
    return float(temperature)


def check_shared_prefix_config(engine_config) -> None:
    """Config values the packed forward cannot honour: raise, naming the field."""
    prefix = "fsdp_config.shared_prefix=true"
    if engine_config.strategy != "fsdp2":
        raise ValueError(
            f"{prefix} needs strategy=fsdp2 (actor_rollout_ref.actor.strategy / .ref.strategy), "
            f"got {engine_config.strategy!r}: FSDP1's flat parameters hide the lm_head weight the "
            "packed scoring reads"
        )
    if getattr(engine_config, "ulysses_sequence_parallel_size", 1) != 1:
        raise ValueError(
            f"{prefix} does not support ulysses_sequence_parallel_size="
            f"{engine_config.ulysses_sequence_parallel_size}: set it to 1 (a packed tree is not split across ranks)"
        )
    if getattr(engine_config, "use_fused_kernels", False):
        raise ValueError(
            f"{prefix} replaces verl's fused lm-head kernels (it has its own): set "
            "actor_rollout_ref.model.use_fused_kernels=false"
        )


def register_engine() -> type[SharedPrefixFSDPEngine]:
    """Make `SharedPrefixFSDPEngine` the ("language_model", fsdp / fsdp2) engine of this process.

    Registered with `EngineRegistry.register` for the (device, vendor) key that verl's
    `get_engine_cls` tries first (VERL_ENGINE_DEVICE / VERL_ENGINE_VENDOR honoured, as there).
    Idempotent; raises if another engine already holds that key.
    """
    device = os.getenv("VERL_ENGINE_DEVICE") or get_device_name()
    vendor = os.getenv("VERL_ENGINE_VENDOR") or get_vendor()
    missing = []
    for backend in ("fsdp", "fsdp2"):
        current = EngineRegistry.get_engine_cls("language_model", backend)
        if issubclass(current, SharedPrefixFSDPEngine):
            continue
        if current is not FSDPEngineWithLMHead:
            raise RuntimeError(
                f"register_engine: verl's engine for language_model/{backend} on ({device}, {vendor}) is "
                f"{current.__module__}.{current.__qualname__}, not FSDPEngineWithLMHead; the shared-prefix "
                "engine extends verl's FSDP engine only"
            )
        missing.append(backend)
    if missing:
        EngineRegistry.register(model_type="language_model", backend=missing, device=device, vendor=vendor)(
            SharedPrefixFSDPEngine
        )
    return SharedPrefixFSDPEngine


register_engine()
