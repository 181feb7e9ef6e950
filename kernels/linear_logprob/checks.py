"""Argument validation for `linear_logprob` and its reference (one place, so both raise alike).

Shape, dtype, device and temperature checks are cheap and always run. Value checks (labels in
[0, V), rows in [0, N), finite hidden / weight / bias) read the data, which synchronises a GPU
stream; `check_values=False` skips them for speed once the caller trusts its inputs.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_CHECK_BLOCK_ELEMENTS = 1 << 24  # finiteness is checked in blocks of this many elements (a 16 MiB mask)

# Smallest accepted temperature: 1/temperature <= 1e4 keeps the scaled logits of any fp16 / bf16-range
# model far inside fp32 (fp16 products are below ~4e9 per hidden unit). Lower temperatures are greedy
# sampling in all but name, and their 1/temperature gradients are as extreme.
MIN_TEMPERATURE = 1e-4


def check_linear_logprob_inputs(
    op: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    bias: torch.Tensor | None,
    *,
    check_values: bool,
) -> None:
    """Raise a ValueError/TypeError naming the offending argument.

    hidden [N, H] float, weight [V, H] same dtype, bias [V] same dtype or None,
    rows / labels int32|int64 [M], temperature a finite real >= MIN_TEMPERATURE.
    """
    named = {"hidden": hidden, "weight": weight, "rows": rows, "labels": labels}
    if bias is not None:
        named["bias"] = bias
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")

    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    n_rows, hidden_size = hidden.shape
    if hidden_size < 1:
        raise ValueError(f"{op}: hidden must have a hidden size H >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(
            f"{op}: weight must be 2-D [V, H={hidden_size}] (H from hidden), got shape {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if vocab < 1:
        raise ValueError(
            f"{op}: weight must have at least one vocabulary row (V >= 1), got shape {tuple(weight.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise ValueError(f"{op}: bias must be 1-D [V={vocab}] (V from weight), got shape {tuple(bias.shape)}")
    for name in ("rows", "labels"):
        if named[name].dim() != 1:
            raise ValueError(f"{op}: {name} must be 1-D [M], got shape {tuple(named[name].shape)}")
    if labels.shape[0] != rows.shape[0]:
        raise ValueError(
            f"{op}: labels must have the same length M as rows, got {labels.shape[0]} labels and {rows.shape[0]} rows"
        )

    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    for name in ("weight", "bias"):
        if name in named and named[name].dtype != hidden.dtype:
            raise TypeError(f"{op}: {name} dtype {named[name].dtype} must match hidden dtype {hidden.dtype}")
    for name in ("rows", "labels"):
        if named[name].dtype not in _INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32 or int64, got {named[name].dtype}")

    for name, tensor in named.items():
        if tensor.device != hidden.device:
            raise ValueError(
                f"{op}: {name} is on {tensor.device} but hidden is on {hidden.device}; move both to one device"
            )

    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"{op}: temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if float(temperature) < MIN_TEMPERATURE:
        raise ValueError(
            f"{op}: temperature {temperature} is below the supported minimum {MIN_TEMPERATURE}: logits scaled "
            f"by 1/temperature can overflow fp32 to inf and the logprobs to NaN (for greedy decoding, sample "
            "with temperature 0 and score untempered, temperature=1)"
        )

    if not check_values:
        return
    _check_index_range(op, "rows", rows, n_rows, "N", "hidden rows")
    _check_index_range(op, "labels", labels, vocab, "V", "vocabulary size")
    for name in ("hidden", "weight", "bias"):
        tensor = named.get(name)
        if tensor is None:
            continue
        where = _first_non_finite(tensor)
        if where is not None:
            raise ValueError(f"{op}: {name} contains a non-finite value (NaN or inf), first at index {where}")


def _first_non_finite(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first NaN / inf, or None; scanned in row blocks so the temporary mask stays
    small even for a [V, H] lm-head weight (one host sync unless something is found)."""
    if tensor.numel() == 0:
        return None
    rows_per_block = max(1, _CHECK_BLOCK_ELEMENTS // max(1, tensor[0].numel()))
    blocks = tensor.split(rows_per_block)
    bad = torch.stack([~torch.isfinite(block).all() for block in blocks])
    if not bool(bad.any()):
        return None
    b = int(torch.nonzero(bad)[0, 0])
    inner = torch.nonzero(~torch.isfinite(blocks[b]))[0].tolist()
    return (inner[0] + b * rows_per_block, *inner[1:])


def _check_index_range(op: str, name: str, index: torch.Tensor, limit: int, symbol: str, meaning: str) -> None:
    if index.numel() == 0:
        return
    bad = (index < 0) | (index >= limit)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"{op}: {name} must lie in [0, {symbol}={limit}) ({meaning}); {name}[{first}] = {int(index[first])}"
        )
