"""Registers the built-in envs by name. Factories are given as "module:attribute" paths that the
registry imports on first use, so `import trace_core.envs` stays cheap (no transformers / bm25s)."""

from __future__ import annotations

from trace_core.envs.registry import register_env

register_env(
    "gridworld", "trace_core.envs.gridworld.env:GridWorldEnv", "trace_core.envs.gridworld.tasks:GridTaskSource"
)
register_env(
    "search_qa",
    "trace_core.envs.search_qa.sources:make_search_qa_env",
    "trace_core.envs.search_qa.sources:QATaskSource",
)
register_env("multihop", "trace_core.envs.multihop.env:MultiHopEnv", "trace_core.envs.multihop.tasks:HopTaskSource")
register_env("bfcl", "trace_core.envs.bfcl.env:BFCLEnv", "trace_core.envs.bfcl.data:BFCLTaskSource")
