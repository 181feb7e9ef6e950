"""Rollout engines: the protocol the trainer uses, and the built-in HF engine on the paged tree KV cache."""
from .codec import HFTextCodec, TextCodec
from .hf_engine import HFRolloutEngine
from .protocol import Anchor, EngineTrajectory, RolloutEngine, SamplingParams, to_forest_trajectories

__all__ = ["Anchor", "EngineTrajectory", "HFRolloutEngine", "HFTextCodec", "RolloutEngine", "SamplingParams",
           "TextCodec", "to_forest_trajectories"]
