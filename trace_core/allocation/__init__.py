"""Implementation of rollout budget allocation; the public API is trace_core.allocate."""
