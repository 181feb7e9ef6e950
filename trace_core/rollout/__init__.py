"""Rollout: the engine protocol and the built-in HF engine, which generates over a paged tree KV
cache and writes each turn into a `RolloutForest` as a node.

    protocol.py      what a trainer asks of an engine (prefill / rollout / expand / hidden_states)
    engine.py        HFRolloutEngine: batched decode of every branch, env between turns, forking
    paged_runner.py  an HF model's forward over the paged KV cache (prefill, decode)
    kv_cache.py      the paged tree KV cache (pages owned by tree nodes, reference counts)
    sampling.py      temperature / nucleus sampling that records the tempered logprob
    (the codec, text <-> tokens, is trace_core.model.codec; re-exported here)
"""

from trace_core.model.codec import HFTextCodec, TextCodec
from trace_core.rollout.engine import HFRolloutEngine
from trace_core.rollout.protocol import Generated, Prompts, RolloutEngine, SamplingParams

__all__ = ["Generated", "HFRolloutEngine", "HFTextCodec", "Prompts", "RolloutEngine", "SamplingParams", "TextCodec"]
