"""HF transformers integration: run a packed rollout tree through a Llama / Qwen2 / Qwen3 model.

`register()` adds the tree attention to `transformers.AttentionInterface` as "trace_tree". Because
"trace_tree" is not in `AttentionMaskInterface`, transformers' `create_causal_mask` returns None
for it right away: no dense [T, T] mask is ever built. The tree structure rides in the forward
kwargs as `tree_end` (int32 [T], see trace_core/packing.py), which transformers forwards untouched
from `model(...)` to every attention call; `position_ids` are the packed path positions, so RoPE
sees exactly the positions of the unpacked leaf sequences.

    hidden = tree_forward(model, packed)          # [T, hidden_size], final norm applied
    logits = model.lm_head(hidden)                # per packed token

or, with the model's own forward (call `register()` before loading with
attn_implementation="trace_tree", or use `model.set_attn_implementation("trace_tree")`):

    model(input_ids=ids[None], position_ids=pos[None], tree_end=end, use_cache=False)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from trace_kernels.tree_attention import check_tree_end, tree_attention

ATTENTION_NAME = "trace_tree"
TREE_END_KWARG = "tree_end"
BACKEND_KWARG = "tree_attention_backend"


def trace_tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over a packed tree.

    query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (transformers' layout, batch of one packed tree).
    kwargs must carry `tree_end` (int32 [T]); `tree_attention_backend` optionally forces a path.
    Returns (out [1, T, Hq, D], None) like transformers' sdpa path.
    """
    end = kwargs.get(TREE_END_KWARG)
    if end is None:
        raise ValueError(
            f"attn_implementation='{ATTENTION_NAME}' needs the tree metadata: pass {TREE_END_KWARG}=<int32 [T]> "
            f"to the model's forward (or use trace_core.model.tree_forward.tree_forward)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"{ATTENTION_NAME}: a packed tree has batch size 1, got query batch {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError(
            f"{ATTENTION_NAME}: attention_mask must be None; the tree structure comes from {TREE_END_KWARG}"
        )
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        raise ValueError(f"{ATTENTION_NAME}: a KV cache is not supported (use use_cache=False)")
    if dropout:
        raise ValueError(f"{ATTENTION_NAME}: attention dropout ({dropout}) is not supported")
    for unsupported in ("sliding_window", "softcap"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{ATTENTION_NAME}: {unsupported}={kwargs[unsupported]} is not supported")
    # [1, H, T, D] -> [T, H, D]: a view with unit stride along D, which the kernel takes as is
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    q, k, v = autocast_inputs(q, k, v)
    with autocast_off(q.device.type):
        out = tree_attention(q, k, v, end, scale=scaling, check_inputs=False, backend=kwargs.get(BACKEND_KWARG))
    return out.unsqueeze(0), None


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the autocast dtype when autocast is on for their device, else unchanged.

    Custom attention is not on autocast's op lists, and under autocast over fp32 master weights
    q / k / v arrive in mixed dtypes (RoPE with fp32 cos/sin, Qwen3's q_norm/k_norm with fp32
    weights promote to fp32; v stays in the linear's compute dtype). The kernels need one dtype;
    the output (in that dtype) goes to o_proj, which autocast handles."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Run a custom op on inputs already in the compute dtype as written: its reference path's fp32
    upcasts (scores, softmax) must not be cast back down by an enclosing autocast."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def register() -> None:
    """Register "trace_tree" with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, trace_tree_attention_forward)


@contextlib.contextmanager
def tree_attention_mode(model: torch.nn.Module):
    """Run `model`'s attention as "trace_tree" inside the block; the previous implementation after.

    `tree_forward` uses it for its forward. Hold it yourself over the backward as well when an
    activation-checkpointing wrapper other than transformers' own (`gradient_checkpointing_enable`,
    which `tree_forward` handles) replays layers during the backward: the replay must see
    "trace_tree" too, or it recomputes plain causal attention over the packed tokens.
    """
    register()
    previous = model.config._attn_implementation
    if previous != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        if previous != ATTENTION_NAME:
            model.set_attn_implementation(previous)


@contextlib.contextmanager
def _checkpoint_replays_in_tree_mode(model: torch.nn.Module):
    """transformers' gradient checkpointing replays each layer in the backward, after `tree_forward`
    has restored the model's attention implementation. For the call, wrap every checkpointing
    layer's function so that its replay runs under `tree_attention_mode` as the forward did."""
    wrapped = [
        m
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) and callable(getattr(m, "_gradient_checkpointing_func", None))
    ]
    originals = [m._gradient_checkpointing_func for m in wrapped]
    for module, checkpoint in zip(wrapped, originals):
        module._gradient_checkpointing_func = functools.partial(_checkpoint_in_tree_mode, checkpoint, model)
    try:
        yield
    finally:
        for module, checkpoint in zip(wrapped, originals):
            module._gradient_checkpointing_func = checkpoint


def _checkpoint_in_tree_mode(checkpoint, model, function, *args, **kwargs):
    def replayable(*inner_args, **inner_kwargs):
        with tree_attention_mode(model):
            return function(*inner_args, **inner_kwargs)

    return checkpoint(replayable, *args, **kwargs)


def _as_1d(name: str, values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dim() != 1:
        raise ValueError(f"tree_forward: packed.{name} must be 1-D [T], got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"tree_forward: packed.{name} must hold integers, got {t.dtype}")
    return t.to(device=device, dtype=dtype)


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model behind `model`: unwraps DistributedDataParallel (`.module`),
    torch.compile (`._orig_mod`) and PEFT (`get_base_model()`; the adapter layers are injected in
    the model, so they still run)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call: a torch.compile'd model runs its original module (its compiled graph was
    traced for ordinary batches, not for the packed layout and the replaced lm_head)."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, torch.nn.Module) else model


def _packed_kwargs(hf_model: torch.nn.Module, packed: Any, backend: str | None) -> dict:
    """Validated forward kwargs of a packed tree for `hf_model` (tensors on its device)."""
    device = next(hf_model.parameters()).device
    input_ids = _as_1d("input_ids", packed.input_ids, torch.long, device)
    position_ids = _as_1d("position_ids", packed.position_ids, torch.long, device)
    end = _as_1d("end", packed.end, torch.int32, device)
    T = input_ids.shape[0]
    if position_ids.shape[0] != T or end.shape[0] != T:
        raise ValueError(
            f"tree_forward: packed.input_ids ({T}), packed.position_ids ({position_ids.shape[0]}) and "
            f"packed.end ({end.shape[0]}) must have the same length"
        )
    if T == 0:
        raise ValueError("tree_forward: the packed tree has no tokens")
    check_tree_end(end)  # once here; the layers skip the check
    vocab = hf_model.get_input_embeddings().num_embeddings
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"tree_forward: packed.input_ids must lie in [0, {vocab}) (the model's vocabulary)")
    if int(position_ids.min()) < 0:
        raise ValueError("tree_forward: packed.position_ids must be >= 0")
    return dict(
        input_ids=input_ids[None],
        position_ids=position_ids[None],
        use_cache=False,
        **{TREE_END_KWARG: end, BACKEND_KWARG: backend},
    )


def tree_forward_with_head(
    model: torch.nn.Module, packed: Any, head_fn: Callable, *, backend: str | None = None
) -> Any:
    """Run the causal LM's own forward over a packed tree, its lm_head computing
    `head_fn(hidden [T, hidden_size], lm_head)` instead of logits; returns that result (a tensor or
    a tuple of tensors).

    The call goes through `model` as given, so wrappers do their part: DDP prepares its gradient
    synchronisation, FSDP2 gathers each module's parameters, and `head_fn` runs inside the
    lm_head's own call, where its weight is whole. The result leaves the lm_head as its output (the
    tensors flattened into one [1, N, 1] "logits" tensor) and comes back from the model's output:
    an FSDP2 unit around the lm_head (verl wraps it in one of its own, resharded after forward)
    re-gathers its weight for the backward only when the gradient flows through its output.
    Accepts what `tree_forward` accepts (a causal LM).
    """
    hf_model = transformers_model(model)
    head = hf_model.get_output_embeddings()
    if head is None:
        raise ValueError("model: has no output embeddings (lm_head); pass a causal LM, not its base model")
    kwargs = _packed_kwargs(hf_model, packed, backend)
    layout: dict[str, Any] = {}  # how the result was flattened: its tensors' shapes, tuple or not

    def scoring_forward(hidden: torch.Tensor) -> torch.Tensor:  # [1, T, H] from the model's forward
        result = head_fn(hidden[0], head)
        parts = list(result) if isinstance(result, tuple) else [result]
        layout.update(shapes=[part.shape for part in parts], is_tuple=isinstance(result, tuple))
        return torch.cat([part.reshape(1, -1, 1) for part in parts], dim=1)  # a new tensor, not a view

    previous = head.__dict__.get("forward")  # an instance-level forward (e.g. TRL's fp32 head) comes back after
    head.forward = scoring_forward
    try:
        with tree_attention_mode(hf_model), _checkpoint_replays_in_tree_mode(hf_model):
            output = _eager(model)(**kwargs)
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
    flat = (output.logits if hasattr(output, "logits") else output[0]).reshape(-1)
    sizes = [shape.numel() for shape in layout["shapes"]]
    if flat.numel() != sum(sizes):
        raise RuntimeError(
            f"model: its forward changed the lm_head's output ({sum(sizes)} values in, {flat.numel()} out); "
            "tree_forward_with_head needs a causal LM that returns its lm_head's output as its logits"
        )
    parts = [chunk.reshape(shape) for chunk, shape in zip(flat.split(sizes), layout["shapes"], strict=True)]
    return tuple(parts) if layout["is_tuple"] else parts[0]


def tree_forward(model: torch.nn.Module, packed: Any, *, backend: str | None = None) -> torch.Tensor:
    """Last hidden states of every packed token, each prefix computed once.

    model: a transformers causal LM (Llama / Qwen2 / Qwen3 family) or its base model; also a PEFT
        model around one (its adapters run as usual), a DistributedDataParallel (the backward then
        synchronises gradients) or an FSDP2 (`fully_shard`) model: the call runs through the
        model's own forward, so every wrapper does its part. A torch.compile'd model runs its
        original module, eagerly (a packed tree's size changes every step).
    packed: a PackedTree (or any object) with `input_ids` (int [T]), `position_ids` (int [T], path
        positions) and `end` (int [T]); numpy arrays or tensors.
    backend: "triton" / "cpu" to force the attention path (default: automatic).
    Returns hidden [T, hidden_size] (after the final norm; apply `model.lm_head` for logits).
    The model's attention implementation is switched to "trace_tree" for the call and restored;
    layers under transformers' gradient checkpointing replay with "trace_tree" in the backward too.
    """
    hf_model = transformers_model(model)
    if hf_model.get_output_embeddings() is not None:  # a causal LM: hidden states are what reaches its head
        return tree_forward_with_head(model, packed, lambda hidden, head: hidden, backend=backend)
    kwargs = _packed_kwargs(hf_model, packed, backend)  # a base model: its output is the hidden states
    with tree_attention_mode(hf_model), _checkpoint_replays_in_tree_mode(hf_model):
        return _eager(model)(**kwargs).last_hidden_state[0]
