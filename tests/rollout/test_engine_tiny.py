"""Built-in rollout engine on a tiny random Qwen3, decode attention through the Triton kernel
(interpreter on CPU; the models sit on CUDA when there is one, see engine_helpers): equality with
model.generate, recorded logprobs, forking without recompute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_helpers import CharCodec, CounterEnv, fresh_logprobs, generate_greedy, tiny_model, tiny_qwen3

from trace_core.rollout import Anchor, HFRolloutEngine, SamplingParams, to_forest_trajectories
from trace_core.rollout.kv_cache import CacheCapacityError
from trace_core.forest import RolloutForest

VOCAB = 64
TASKS = [{"prompt": "count to five"}, {"prompt": "abc"}]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


def _engine(model, *, turns=3, max_tokens=4, temperature=0.0, top_p=1.0, noisy=False, num_pages=256, seed=0):
    return HFRolloutEngine(model, CharCodec(VOCAB), lambda: CounterEnv(turns, noisy),
                           sampling=SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens),
                           num_pages=num_pages, page_size=4, decode_backend="triton", seed=seed)


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_greedy_single_turn_equals_model_generate(model, family):
    model = model if family == "qwen3" else tiny_model(family)
    engine = _engine(model, turns=1, max_tokens=9)
    trajs = engine.rollout(TASKS, [2, 1])
    codec = CharCodec(VOCAB)
    for traj in trajs:
        prompt = codec.encode_prompt(TASKS[traj.prompt_id]["prompt"])
        assert traj.token_ids[: len(prompt)] == prompt and traj.turn_starts == [len(prompt)]
        assert traj.token_ids[len(prompt):] == generate_greedy(model, prompt, 9)
        assert traj.finished and traj.reward in (0.0, 1.0)


def test_multi_turn_logprobs_equal_a_fresh_forward(model):
    engine = _engine(model, turns=3, max_tokens=5)
    trajs = engine.rollout(TASKS, [2, 2])
    for traj in trajs:
        assert traj.num_turns == 3 and traj.finished
        mask = np.asarray(traj.model_mask)
        expected = fresh_logprobs(model, traj.token_ids).numpy()
        got = np.asarray(traj.logprobs)
        assert np.all(got[mask] <= 0) and np.all(got[~mask] == 0)
        np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)
        # observations are the env's, appended after each turn's 5 model tokens
        assert traj.turn_tokens(1)[5:] == CharCodec(VOCAB).encode_prompt(f"<1:5>")


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_are_the_tempered_model_logprobs(model, temperature, top_p):
    engine = _engine(model, turns=2, max_tokens=6, temperature=temperature, top_p=top_p, seed=3)
    trajs = engine.rollout(TASKS, [3, 3])
    assert len({tuple(t.token_ids) for t in trajs}) > 2  # it really samples
    for traj in trajs:
        mask = np.asarray(traj.model_mask)
        expected = fresh_logprobs(model, traj.token_ids, temperature).numpy()
        np.testing.assert_allclose(np.asarray(traj.logprobs)[mask], expected[mask], atol=1e-4, rtol=0)


def test_continuation_equals_generating_from_scratch_and_skips_the_prefix(model):
    engine = _engine(model, turns=3, max_tokens=4)
    (base,) = engine.rollout(TASKS[:1], [1])
    run_before = engine.tokens_run
    conts = engine.expand([Anchor(base.uid, 1), Anchor(base.uid, 2)], [2, 1])
    assert [c.branch_from for c in conts] == [(base.uid, 1), (base.uid, 1), (base.uid, 2)]
    for cont in conts:
        # deterministic env + greedy: the continuation repeats the bare rollout ...
        assert cont.token_ids == base.token_ids and cont.turn_starts == base.turn_starts
        # ... and equals model.generate on the same prefix
        t = cont.branch_from[1]
        prefix = cont.token_ids[: cont.turn_starts[t]]
        assert cont.turn_tokens(t + 1)[:4] == generate_greedy(model, prefix, 4)
    # no prefix recompute: the model ran only the continuations' new tokens (the last sampled token
    # of an episode is never fed back)
    new_tokens = sum(len(c.token_ids) - c.turn_starts[c.branch_from[1]] - 1 for c in conts)
    assert engine.tokens_run - run_before == new_tokens


def test_expansion_with_fresh_env_seeds_and_forest_building(model):
    engine = _engine(model, turns=3, max_tokens=3, temperature=1.0, noisy=True, seed=5)
    bare = engine.rollout(TASKS, [2, 1])
    conts = engine.expand([Anchor(bare[0].uid, 1), Anchor(bare[2].uid, 2)], [3, 2])
    # a continuation of a continuation (recursive expansion) also forks from retained pages
    deeper = engine.expand([Anchor(conts[0].uid, 2)], [1])
    trajs = bare + conts + deeper
    forest = RolloutForest.from_trajectories(to_forest_trajectories(trajs), vocab_size=VOCAB)
    forest.validate(require_rewards=True)
    assert forest.leaves.size == len(trajs) and forest.roots.size == 2
    for traj in conts + deeper:
        mask = np.asarray(traj.model_mask)
        expected = fresh_logprobs(model, traj.token_ids).numpy()
        np.testing.assert_allclose(np.asarray(traj.logprobs)[mask], expected[mask], atol=1e-4, rtol=0)
    engine.release_all()
    assert engine.cache.free_pages == engine.cache.num_pages and engine.cache.num_nodes == 0
    with pytest.raises(ValueError, match=r"anchors\[0\]: trajectory uid .* unknown or was released"):
        engine.expand([Anchor(bare[0].uid, 1)], [1])


def test_bad_requests_name_the_field(model):
    engine = _engine(model, turns=2, max_tokens=2)
    (base,) = engine.rollout(TASKS[:1], [1])
    with pytest.raises(ValueError, match=r"anchors\[0\]: turn 2 is not a branch point"):
        engine.expand([Anchor(base.uid, 2)], [1])
    with pytest.raises(ValueError, match="counts: 1 counts for 2 items"):
        engine.rollout(TASKS, [1])
    with pytest.raises(ValueError, match="counts: must be non-negative"):
        engine.rollout(TASKS, [1, -1])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt .* outside the model's vocab"):
        HFRolloutEngine(model, CharCodec(70), lambda: CounterEnv(1), decode_backend="triton").rollout(
            [{"prompt": "ZZ"}], [1])


def test_out_of_pages_is_a_clear_error(model):
    engine = _engine(model, turns=3, max_tokens=8, num_pages=6)
    with pytest.raises(CacheCapacityError, match="out of pages"):
        engine.rollout(TASKS, [4, 4])


def test_stop_token_ids_and_stop_strings_end_the_turn(model):
    (free_run,) = _engine(model, turns=1, max_tokens=8).rollout(TASKS[:1], [1])
    start = free_run.turn_starts[0]
    turn = free_run.token_ids[start:]
    stop_at = next(i for i in range(1, 8) if turn[i] not in turn[:i])  # first position with a new token
    codec = CharCodec(VOCAB)
    for params in (SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(turn[stop_at],)),
                   SamplingParams(temperature=0.0, max_tokens=8, stop_strings=(codec.decode(turn[stop_at - 1 : stop_at + 1]),))):
        engine = HFRolloutEngine(model, codec, lambda: CounterEnv(1), sampling=params, num_pages=64, page_size=4,
                                 decode_backend="triton")
        (traj,) = engine.rollout(TASKS[:1], [1])
        assert traj.token_ids[start:] == turn[: stop_at + 1]  # the stopping token is kept


def test_episode_cut_at_max_turns_has_no_reward(model):
    class NeverDone(CounterEnv):
        def step(self, action):
            out = super().step(action)
            return type(out)("ok", False, None, out.info)

    engine = HFRolloutEngine(model, CharCodec(VOCAB), lambda: NeverDone(2),
                             sampling=SamplingParams(temperature=0.0, max_tokens=2), num_pages=64, page_size=4,
                             decode_backend="triton")
    (traj,) = engine.rollout(TASKS[:1], [1])
    assert traj.num_turns == 2 and not traj.finished and traj.reward is None


def test_private_prefix_ablation_matches_forking_but_recomputes(model):
    engine = _engine(model, turns=2, max_tokens=3)
    (base,) = engine.rollout(TASKS[:1], [1])
    runs = []
    for share in (True, False):
        before = engine.tokens_run
        (cont,) = engine.expand([Anchor(base.uid, 1)], [1], share_prefix=share)
        runs.append((cont.token_ids, engine.tokens_run - before))
    assert runs[0][0] == runs[1][0] == base.token_ids
    assert runs[1][1] - runs[0][1] == base.turn_starts[1]  # the private copy re-ran the whole prefix


def test_forest_conversion_and_codec_errors_name_the_field():
    from types import SimpleNamespace

    from trace_core.rollout import EngineTrajectory, HFTextCodec

    cont = EngineTrajectory(uid=5, prompt_id=0, token_ids=[1, 2, 3], model_mask=[False, True, True],
                            logprobs=[0.0, -1.0, -1.0], turn_starts=[1, 2], reward=1.0, finished=True,
                            branch_from=(4, 1))
    with pytest.raises(ValueError, match=r"trajectories\[0\].branch_from: trajectory uid 4 is not earlier"):
        to_forest_trajectories([cont])
    with pytest.raises(ValueError, match="observation_template"):
        HFTextCodec(SimpleNamespace(eos_token_id=2), observation_template="no placeholder")
