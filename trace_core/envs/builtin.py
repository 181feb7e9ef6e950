"""Registers the built-in envs by name. Factories are given as "module:attribute" paths that the
registry imports on first use, so `import trace_core.envs` stays cheap (no transformers / bm25s)."""
from __future__ import annotations

from .registry import register_env

register_env("gridworld", "trace_core.envs.gridworld:GridWorldEnv", "trace_core.envs.grid_tasks:GridTaskSource")
register_env("search_qa", "trace_core.envs.qa_sources:make_search_qa_env", "trace_core.envs.qa_sources:QATaskSource")
