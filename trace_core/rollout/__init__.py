"""Rollout engines: the protocol the trainer uses, and the built-in HF engine on the paged tree KV cache."""
from trace_core.rollout.codec import HFTextCodec, TextCodec
from trace_core.rollout.engine import HFRolloutEngine
from trace_core.rollout.protocol import Anchor, EngineTrajectory, RolloutEngine, SamplingParams, to_forest_trajectories

__all__ = ["Anchor", "EngineTrajectory", "HFRolloutEngine", "HFTextCodec", "RolloutEngine", "SamplingParams",
           "TextCodec", "to_forest_trajectories"]
