"""trace_core: rollout trees, packing, allocation, advantages and the TRACE trainer."""

__version__ = "0.1.0"
