"""trace_kernels: Triton kernels for tree-structured RL (installed from the folder kernels/).

One folder per op, each with the same parts: __init__ (the public op and its input checks),
triton.py (the kernels), cpu.py (the pure-PyTorch path for where Triton cannot run), naive.py (the
oracle the tests compare against). `_runtime.select_backend` picks the Triton path on CUDA (or under
TRITON_INTERPRET=1 with CPU tensors) and the CPU path otherwise; every op takes backend=None /
"triton" / "cpu" to force one. Developer tools (compile checks, autotune report) are in tools/.

    tree_attention          attention over a packed rollout tree (key j visible to query i iff j <= i < end[j])
    linear_logprob          fused lm-head + log-softmax gather (+ entropy), never [tokens x vocab]
    tree_decode_attention   one decode step of many branches over the paged tree KV cache
"""

from ._runtime import Backend, interpreter_enabled, select_backend
from .linear_logprob import LinearLogprobFunction, linear_logprob
from .linear_logprob.naive import linear_logprob_reference
from .tree_attention import TreeAttentionFunction, block_skip_metadata, check_tree_end, tree_attention
from .tree_attention.cpu import tree_attention_torch
from .tree_attention.naive import tree_attention_reference
from .tree_decode import TreeDecodeMeta, build_tree_decode_meta, tree_decode_attention

__all__ = [
    "Backend",
    "LinearLogprobFunction",
    "TreeAttentionFunction",
    "TreeDecodeMeta",
    "block_skip_metadata",
    "build_tree_decode_meta",
    "check_tree_end",
    "interpreter_enabled",
    "linear_logprob",
    "linear_logprob_reference",
    "select_backend",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_torch",
    "tree_decode_attention",
]
