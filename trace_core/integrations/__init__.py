"""Adapters that plug trace-rl's kernels into other libraries (HF transformers, ...).

Each adapter lives in its own module and imports its library lazily, so `trace_core` never
requires an integration's dependencies to be importable.
"""
