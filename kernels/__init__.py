"""trace_kernels: Triton kernels for tree-structured RL (installed from the folder kernels/).

Every op has a pure-PyTorch reference with the same signature; `_runtime.select_backend` picks the
Triton path on CUDA (or under TRITON_INTERPRET=1 with CPU tensors) and the reference otherwise.

    tree_attention   attention over a packed rollout tree (key j visible to query i iff j <= i < end[j])
    linear_logprob   fused lm-head + log-softmax gather (+ entropy), never [tokens x vocab]
"""
from ._runtime import Backend, interpreter_enabled, select_backend
from .linear_logprob import LinearLogprobFunction, linear_logprob
from .linear_logprob_reference import linear_logprob_reference
from .tree_attention import TreeAttentionFunction, block_skip_metadata, check_tree_end, tree_attention
from .tree_attention_reference import tree_attention_reference, tree_attention_torch

__all__ = [
    "Backend", "LinearLogprobFunction", "TreeAttentionFunction", "block_skip_metadata", "check_tree_end",
    "interpreter_enabled", "linear_logprob", "linear_logprob_reference", "select_backend", "tree_attention",
    "tree_attention_reference", "tree_attention_torch",
]
