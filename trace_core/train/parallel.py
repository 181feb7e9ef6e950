"""The policy under DDP or FSDP2, and the full weights the rollout engine generates from.

DDP: every rank holds the whole model; the engine generates from it directly (its weights are current after every
optimizer step). FSDP2: `fully_shard` on every decoder layer and on the root (embeddings, final norm, lm-head), with
a MixedPrecisionPolicy computing in model.dtype; the engine cannot run a sharded model (each module's call
all-gathers its weights, and ranks decode different numbers of steps), so it generates from a full copy that
`RolloutWeights.refresh` fills from the shards once per step (distributed.rollout_weights).
"""

from __future__ import annotations

import copy

import torch

from trace_core.train.config import DistributedConfig
from trace_core.train.distributed import World


def wrap(model: torch.nn.Module, cfg: DistributedConfig, world: World, compute_dtype: torch.dtype) -> torch.nn.Module:
    """The module the policy update calls: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if cfg.strategy == "ddp":
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world.size,))
    param_dtype = next(model.parameters()).dtype
    # compute in model.dtype over the stored (master) parameters; gradients reduced in fp32 when masters are fp32
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=param_dtype)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)  # the root holds embeddings, final norm and lm-head


def set_gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context for one micro-batch's backward: gradients are reduced across ranks only when `enabled` (the
    last micro-batch of an optimizer step), accumulating locally before."""
    import contextlib

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


class RolloutWeights:
    """A full copy of the policy for the engine (FSDP2), made from the unsharded model before it is sharded.

    refresh(model) all-gathers the sharded parameters once (a collective: every rank calls it at the same point)
    and copies them in; the copy costs one full model per rank (in the parameters' dtype, or in the compute
    dtype with rollout_weights=compute_dtype)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        if dtype is not None:
            self.model.to(dtype)
        self.version = 0  # the trainer's update count the copy holds

    def refresh(self, sharded: torch.nn.Module, version: int) -> None:
        if version == self.version:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                if name in full:
                    tensor.copy_(full[name])
        self.version = version
