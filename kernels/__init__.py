"""trace_kernels: Triton kernels for tree-structured RL (installed from the folder kernels/).

Every op has a pure-PyTorch reference with the same signature; `_runtime.select_backend` picks the
Triton path on CUDA (or under TRITON_INTERPRET=1 with CPU tensors) and the reference otherwise.
"""
from ._runtime import Backend, interpreter_enabled, select_backend

__all__ = ["Backend", "interpreter_enabled", "select_backend"]
