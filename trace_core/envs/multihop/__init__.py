"""A multi-hop lookup env with a flaky tool, word-level text (registered as "multihop").

- env.py       `MultiHopEnv`: prompt, lookups, observations, rewards; action parsing and the
               handling of malformed actions
- tasks.py     tasks as JSON-serialisable dicts: difficulty levels (`LevelSpec`), a seeded generator
               with train / eval splits (`generate_hop_tasks`), `HopTaskSource` for the trainer
- policies.py  scripted policies (random, reactive, optimal) and success probabilities: the anchors
               that tell how well a trained policy does

The trainer builds it by name through `trace_core.envs.make_env("multihop", ...)`; a tiny model
(model.name=tiny) gets its word tokenizer; an action is one word, so the default
generation.max_tokens_per_turn=1 fits.
"""

from trace_core.envs.multihop.env import MultiHopEnv
from trace_core.envs.multihop.tasks import HopTask, HopTaskSource, LevelSpec, generate_hop_tasks

__all__ = ["HopTask", "HopTaskSource", "LevelSpec", "MultiHopEnv", "generate_hop_tasks"]
