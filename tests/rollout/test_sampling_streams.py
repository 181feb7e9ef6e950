"""The engine's "episode" sampling streams: an episode samples the same tokens and env seeds whichever other
episodes share its process and batch (what lets N ranks that split a step's prompts reproduce one process),
while "batch" streams (the default) depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import CharCodec, CounterEnv, tiny_qwen3
from trace_core.forest import RolloutForest
from trace_core.rollout import HFRolloutEngine, SamplingParams

VOCAB = 64
TASKS = [{"prompt": "count to five"}, {"prompt": "abc"}, {"prompt": "xyz?"}]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


def episodes(model, streams: str, prompt_ids: list[int], counts: list[int], expand: int = 0):
    """Token sequences (root to leaf) of each prompt's episodes, keyed by prompt id."""
    engine = HFRolloutEngine(
        model,
        CharCodec(VOCAB),
        lambda: CounterEnv(3, noisy=True),  # env seeds matter: observations carry a seeded digit
        sampling=SamplingParams(temperature=1.0, max_tokens=3),
        num_pages=256,
        page_size=4,
        decode_backend="cpu",
        streams=streams,
    )
    engine.reseed(123)
    forest = RolloutForest()
    prompts = engine.prefill([TASKS[i] for i in prompt_ids], prompt_ids=prompt_ids)
    bare = engine.rollout(forest, prompts, counts)
    if expand:
        anchors = [n for n in bare.nodes if forest.depth[n] == 1 and forest.num_children[n] > 0]
        engine.expand(forest, anchors, [expand] * len(anchors))
    out: dict[int, list] = {}
    for leaf in forest.leaves:
        path = forest.leaf_path(leaf)
        out.setdefault(int(forest.prompt_id[path[0]]), []).append(
            (tuple(np.concatenate([forest.node_tokens(u) for u in path]).tolist()), float(forest.reward[leaf]))
        )
    return {p: sorted(v) for p, v in out.items()}


def test_episode_streams_do_not_depend_on_the_batch(model):
    together = episodes(model, "episode", [0, 1, 2], [2, 3, 2], expand=2)
    alone = {p: episodes(model, "episode", [p], [c], expand=2)[p] for p, c in ((0, 2), (1, 3), (2, 2))}
    split = {**episodes(model, "episode", [0], [2], expand=2), **episodes(model, "episode", [1, 2], [3, 2], expand=2)}
    assert together == alone == split
    assert len({e for eps in together.values() for e in eps}) > 5  # they do sample different episodes


def test_batch_streams_depend_on_the_batch(model):
    together = episodes(model, "batch", [0, 1], [2, 2])
    alone = episodes(model, "batch", [1], [2])
    assert together[1] != alone[1]  # the control: without episode streams, prompt 1's episodes change


def test_unknown_streams_are_refused(model):
    with pytest.raises(ValueError, match="streams"):
        HFRolloutEngine(model, CharCodec(VOCAB), lambda: CounterEnv(3), streams="rank")
