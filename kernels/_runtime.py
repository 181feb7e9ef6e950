"""Choosing between the Triton path and the pure-PyTorch reference of an op.

Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (how the tests exercise
kernels without a GPU). Anything else takes the reference. The choice is logged once per
(op, backend, reason) so a benchmark can never be silently timing the slow path.
"""
from __future__ import annotations

import enum
import importlib.util
import logging
import os

import torch

log = logging.getLogger("trace_kernels")
_announced: set[tuple[str, str, str]] = set()


class Backend(str, enum.Enum):
    TRITON = "triton"
    REFERENCE = "reference"


def interpreter_enabled() -> bool:
    """True when Triton kernels are interpreted on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(op: str, *tensors: torch.Tensor, force: Backend | str | None = None) -> Backend:
    """Pick the backend for `op` given its input tensors.

    force: "triton" or "reference" to override (a forced Triton path that cannot run raises).
    """
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    can_triton = triton_installed() and (device == "cuda" or (device == "cpu" and interpreter_enabled()))
    if force is not None:
        backend = Backend(force)
        if backend is Backend.TRITON and not can_triton:
            raise RuntimeError(
                f"{op}: the Triton path was forced but cannot run on {device} tensors "
                f"(needs CUDA, or CPU with TRITON_INTERPRET=1, and triton installed)"
            )
        reason = "forced"
    elif can_triton:
        backend, reason = Backend.TRITON, ("interpreter" if device == "cpu" else "cuda")
    else:
        backend, reason = Backend.REFERENCE, f"{device} without triton"
    key = (op, backend.value, reason)
    if key not in _announced:
        _announced.add(key)
        log.info("%s: using the %s path (%s)", op, backend.value, reason)
    return backend
