"""Choosing between an op's Triton path and its pure-PyTorch CPU path (the op's cpu.py).

Triton runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (how the tests exercise
kernels without a GPU). Anything else takes the CPU path. The choice is logged once per
(op, backend, reason) so a benchmark can never be silently timing the slow path.

Every op spells it the same way: `backend=None` (automatic), "triton" or "cpu". "reference", the
old name of "cpu", is still accepted (configs and callers written before the rename pass it).
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
    CPU = "cpu"  # the pure-PyTorch path: runs on any device, chosen automatically where Triton cannot run
    REFERENCE = "cpu"  # noqa: PIE796 - the old name of CPU, an alias on purpose: Backend.REFERENCE is Backend.CPU

    @classmethod
    def _missing_(cls, value):
        return cls.CPU if value == "reference" else None  # Backend("reference") is Backend.CPU


def interpreter_enabled() -> bool:
    """True when Triton kernels are interpreted on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_backend(op: str, *tensors: torch.Tensor, backend: Backend | str | None = None) -> Backend:
    """Pick the backend for `op` given its input tensors.

    backend: "triton" or "cpu" ("reference") to force a path (a forced Triton path that cannot run
    raises); None chooses.
    """
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    can_triton = triton_installed() and (device == "cuda" or (device == "cpu" and interpreter_enabled()))
    if backend is not None:
        chosen = Backend(backend)
        if chosen is Backend.TRITON and not can_triton:
            raise RuntimeError(
                f"{op}: the Triton path was forced but cannot run on {device} tensors "
                f"(needs CUDA, or CPU with TRITON_INTERPRET=1, and triton installed)"
            )
        reason = "forced"
    elif can_triton:
        chosen, reason = Backend.TRITON, ("interpreter" if device == "cpu" else "cuda")
    else:
        chosen, reason = Backend.CPU, f"{device} without triton"
    key = (op, chosen.value, reason)
    if key not in _announced:
        _announced.add(key)
        log.info("%s: using the %s path (%s)", op, chosen.value, reason)
    return chosen
