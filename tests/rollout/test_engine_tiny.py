"""Built-in rollout engine on a tiny random Qwen3, decode attention through the Triton kernel
(interpreter on CPU; the models sit on CUDA when there is one, see engine_helpers): equality with
model.generate, recorded logprobs, forking without recompute, and the forest it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import (
    CharCodec,
    CounterEnv,
    episodes,
    fresh_logprobs,
    generate_greedy,
    run_rollout,
    tiny_model,
    tiny_qwen3,
)
from trace_core.forest import RolloutForest
from trace_core.model.tree_forward import tree_forward
from trace_core.packing.forest import pack
from trace_core.rollout import HFRolloutEngine, SamplingParams
from trace_core.rollout.kv_cache import CacheCapacityError

VOCAB = 64
TASKS = [{"prompt": "count to five"}, {"prompt": "abc"}]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3()


def _engine(model, *, turns=3, max_tokens=4, temperature=0.0, top_p=1.0, noisy=False, num_pages=256, seed=0):
    return HFRolloutEngine(
        model,
        CharCodec(VOCAB),
        lambda: CounterEnv(turns, noisy),
        sampling=SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens),
        num_pages=num_pages,
        page_size=4,
        decode_backend="triton",
        seed=seed,
    )


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_greedy_single_turn_equals_model_generate(model, family):
    model = model if family == "qwen3" else tiny_model(family)
    engine = _engine(model, turns=1, max_tokens=9)
    forest = RolloutForest(vocab_size=VOCAB)
    eps = run_rollout(engine, forest, TASKS, [2, 1])
    codec = CharCodec(VOCAB)
    assert [e.prompt_id for e in eps] == [0, 0, 1] and forest.roots.size == 2
    for ep in eps:
        prompt = codec.encode_prompt(TASKS[ep.prompt_id]["prompt"])
        assert ep.token_ids[: len(prompt)] == prompt and ep.turn_starts == [len(prompt)]
        assert ep.token_ids[len(prompt) :] == generate_greedy(model, prompt, 9)
        assert ep.finished and ep.reward in (0.0, 1.0)


def test_multi_turn_logprobs_equal_a_fresh_forward(model):
    engine = _engine(model, turns=3, max_tokens=5)
    for ep in run_rollout(engine, RolloutForest(vocab_size=VOCAB), TASKS, [2, 2]):
        assert ep.num_turns == 3 and ep.finished
        mask = np.asarray(ep.model_mask)
        expected = fresh_logprobs(model, ep.token_ids).numpy()
        got = np.asarray(ep.logprobs)
        assert np.all(got[mask] <= 0) and np.all(got[~mask] == 0)
        np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)
        # observations are the env's, appended after each turn's 5 model tokens
        assert ep.turn_tokens(1)[5:] == CharCodec(VOCAB).encode_prompt("<1:5>")


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_are_the_tempered_model_logprobs(model, temperature, top_p):
    engine = _engine(model, turns=2, max_tokens=6, temperature=temperature, top_p=top_p, seed=3)
    eps = run_rollout(engine, RolloutForest(vocab_size=VOCAB), TASKS, [3, 3])
    assert len({tuple(e.token_ids) for e in eps}) > 2  # it really samples
    for ep in eps:
        mask = np.asarray(ep.model_mask)
        expected = fresh_logprobs(model, ep.token_ids, temperature).numpy()
        np.testing.assert_allclose(np.asarray(ep.logprobs)[mask], expected[mask], atol=1e-4, rtol=0)


def test_continuation_equals_generating_from_scratch_and_skips_the_prefix(model):
    engine = _engine(model, turns=3, max_tokens=4)
    forest = RolloutForest(vocab_size=VOCAB)
    (base,) = run_rollout(engine, forest, TASKS[:1], [1])
    run_before = engine.tokens_run
    anchors = [base.nodes[1], base.nodes[2]]  # after turn 1 and after turn 2
    conts = episodes(forest, engine.expand(forest, anchors, [2, 1]))
    for cont, t in zip(conts, [1, 1, 2]):
        # the continuation hangs under its anchor: it shares the prompt and turns 1..t as nodes
        assert cont.nodes[: t + 1] == base.nodes[: t + 1] and cont.nodes[t + 1] not in base.nodes
        # deterministic env + greedy: the continuation repeats the bare rollout ...
        assert cont.token_ids == base.token_ids and cont.turn_starts == base.turn_starts
        # ... and equals model.generate on the same prefix
        prefix = cont.token_ids[: cont.turn_starts[t]]
        assert cont.turn_tokens(t + 1)[:4] == generate_greedy(model, prefix, 4)
    # no prefix recompute: the model ran only the continuations' new tokens (the last sampled token
    # of an episode is never fed back)
    new_tokens = sum(len(c.token_ids) - c.turn_starts[t] - 1 for c, t in zip(conts, [1, 1, 2]))
    assert engine.tokens_run - run_before == new_tokens
    assert forest.num_children[base.nodes[1]] == 3 and forest.leaves.size == 4


def test_the_engine_writes_one_forest_across_calls(model):
    engine = _engine(model, turns=3, max_tokens=3, temperature=1.0, noisy=True, seed=5)
    forest = RolloutForest(vocab_size=VOCAB)
    prompts = engine.prefill(TASKS + [{"prompt": "dropped"}])
    bare = episodes(forest, engine.rollout(forest, prompts, [2, 1, 0]))
    conts = episodes(forest, engine.expand(forest, [bare[0].nodes[1], bare[2].nodes[2]], [3, 2]))
    # a continuation of a continuation (recursive expansion) also forks from retained pages
    deeper = episodes(forest, engine.expand(forest, [conts[0].nodes[2]], [1]))
    forest.validate(require_rewards=True)
    eps = bare + conts + deeper
    # a prompt with count 0 never enters the forest; every episode is one leaf
    assert forest.roots.size == 2 and sorted(forest.prompt_id[forest.roots]) == [0, 1]
    assert sorted(forest.leaves.tolist()) == sorted(e.leaf for e in eps)
    assert all(forest.episode_leaf([n])[0] == e.leaf for e in bare for n in e.nodes[1:])  # turns, not roots
    for ep in conts + deeper:
        mask = np.asarray(ep.model_mask)
        expected = fresh_logprobs(model, ep.token_ids).numpy()
        np.testing.assert_allclose(np.asarray(ep.logprobs)[mask], expected[mask], atol=1e-4, rtol=0)
    engine.release_all()
    assert engine.cache.free_pages == engine.cache.num_pages and engine.cache.num_nodes == 0
    with pytest.raises(ValueError, match=r"anchors\[0\]: node .* not a non-final turn"):
        engine.expand(forest, [bare[0].nodes[1]], [1])


def test_hidden_states_are_the_packed_forwards_at_each_prefix(model):
    """The predictor reads the engine's hidden states: they equal a fresh packed forward of the
    forest at the last token of every root and turn prefix, so no extra forward is needed."""
    engine = _engine(model, turns=3, max_tokens=3, temperature=1.0, noisy=True, seed=2)
    forest = RolloutForest(vocab_size=VOCAB)
    prompts = engine.prefill(TASKS)
    bare = engine.rollout(forest, prompts, [2, 2])
    anchors = bare.nodes[(forest.depth[bare.nodes] >= 1) & (forest.num_children[bare.nodes] > 0)]
    engine.expand(forest, anchors[:2], [1, 1])
    nodes = np.flatnonzero(forest.num_children > 0)  # every root and internal node
    packed = pack(forest)
    with torch.no_grad():
        expected = tree_forward(model, packed, backend="reference")[torch.as_tensor(packed.node_end[nodes] - 1)]
    got = engine.hidden_states(nodes)
    assert got.shape == (nodes.size, model.config.hidden_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float().cpu(), atol=1e-4, rtol=1e-4)
    roots = forest.roots
    torch.testing.assert_close(engine.hidden_states(roots), prompts.hidden, atol=0, rtol=0)
    assert (forest.path_lengths()[nodes] == packed.position_ids[packed.node_end[nodes] - 1] + 1).all()
    with pytest.raises(ValueError, match="nodes: node .* is not a root or non-final turn"):
        engine.hidden_states(forest.leaves[:1])


def test_bad_requests_name_the_field(model):
    engine = _engine(model, turns=2, max_tokens=2)
    forest = RolloutForest(vocab_size=VOCAB)
    (base,) = run_rollout(engine, forest, TASKS[:1], [1])
    with pytest.raises(ValueError, match=r"anchors\[0\]: node .* not a non-final turn"):
        engine.expand(forest, [base.leaf], [1])  # an episode's last turn is never a branch point
    with pytest.raises(ValueError, match=r"anchors\[0\]: node .* never roots"):
        engine.expand(forest, [base.nodes[0]], [1])
    prompts = engine.prefill(TASKS)
    with pytest.raises(ValueError, match="counts: 1 counts for 2 items"):
        engine.rollout(forest, prompts, [1])
    with pytest.raises(ValueError, match="counts: must be non-negative"):
        engine.rollout(forest, prompts, [1, -1])
    with pytest.raises(ValueError, match="forest: this engine holds nodes of another forest"):
        engine.rollout(RolloutForest(vocab_size=VOCAB), prompts, [1, 0])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="prompt .* outside the model's vocab"):
        HFRolloutEngine(model, CharCodec(70), lambda: CounterEnv(1), decode_backend="triton").prefill(
            [{"prompt": "ZZ"}]
        )


def test_out_of_pages_is_a_clear_error(model):
    engine = _engine(model, turns=3, max_tokens=8, num_pages=6)
    with pytest.raises(CacheCapacityError, match="out of pages"):
        run_rollout(engine, RolloutForest(vocab_size=VOCAB), TASKS, [4, 4])


def test_stop_token_ids_and_stop_strings_end_the_turn(model):
    (free_run,) = run_rollout(_engine(model, turns=1, max_tokens=8), RolloutForest(), TASKS[:1], [1])
    start = free_run.turn_starts[0]
    turn = free_run.token_ids[start:]
    stop_at = next(i for i in range(1, 8) if turn[i] not in turn[:i])  # first position with a new token
    codec = CharCodec(VOCAB)
    for params in (
        SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=(turn[stop_at],)),
        SamplingParams(temperature=0.0, max_tokens=8, stop_strings=(codec.decode(turn[stop_at - 1 : stop_at + 1]),)),
    ):
        engine = HFRolloutEngine(
            model, codec, lambda: CounterEnv(1), sampling=params, num_pages=64, page_size=4, decode_backend="triton"
        )
        (ep,) = run_rollout(engine, RolloutForest(), TASKS[:1], [1])
        assert ep.token_ids[start:] == turn[: stop_at + 1]  # the stopping token is kept


def test_episode_cut_at_max_turns_counts_as_failed(model):
    class NeverDone(CounterEnv):
        def step(self, action):
            out = super().step(action)
            return type(out)("ok", False, None, out.info)

    engine = HFRolloutEngine(
        model,
        CharCodec(VOCAB),
        lambda: NeverDone(2),
        sampling=SamplingParams(temperature=0.0, max_tokens=2),
        num_pages=64,
        page_size=4,
        decode_backend="triton",
    )
    forest = RolloutForest()
    out = engine.rollout(forest, engine.prefill(TASKS[:1]), [1])
    (ep,) = episodes(forest, out)
    assert ep.num_turns == 2 and not ep.finished and ep.reward == 0.0
    assert out.info == ({"turn": 2},)  # the env's info on the episode's last turn


def test_private_prefix_ablation_matches_forking_but_recomputes(model):
    engine = _engine(model, turns=2, max_tokens=3)
    forest = RolloutForest(vocab_size=VOCAB)
    (base,) = run_rollout(engine, forest, TASKS[:1], [1])
    runs = []
    for share in (True, False):
        before = engine.tokens_run
        (cont,) = episodes(forest, engine.expand(forest, [base.nodes[1]], [1], share_prefix=share))
        runs.append((cont.token_ids, engine.tokens_run - before))
    assert runs[0][0] == runs[1][0] == base.token_ids
    assert runs[1][1] - runs[0][1] == base.turn_starts[1]  # the private copy re-ran the whole prefix


def test_codec_errors_name_the_field():
    from types import SimpleNamespace

    from trace_core.rollout import HFTextCodec

    with pytest.raises(ValueError, match="observation_template"):
        HFTextCodec(SimpleNamespace(eos_token_id=2), observation_template="no placeholder")


def test_episodes_whose_turn_ends_in_the_same_round_step_together(model):
    """An env class with `step_batch` gets one call per decode round for all its branches (a batched
    tool, e.g. one retrieval request), with the same results as stepping one by one."""
    calls = []

    class BatchedCounterEnv(CounterEnv):
        @staticmethod
        def step_batch(envs, actions):
            calls.append(len(envs))
            return [env.step(action) for env, action in zip(envs, actions)]

    def run(env_cls):
        engine = HFRolloutEngine(
            model,
            CharCodec(VOCAB),
            lambda: env_cls(3, True),
            sampling=SamplingParams(temperature=0.0, max_tokens=3),
            num_pages=256,
            page_size=4,
            decode_backend="triton",
            seed=1,
        )
        return run_rollout(engine, RolloutForest(vocab_size=VOCAB), TASKS, [3, 2])

    batched, plain = run(BatchedCounterEnv), run(CounterEnv)
    assert [e.token_ids for e in batched] == [e.token_ids for e in plain]
    assert [e.reward for e in batched] == [e.reward for e in plain]
    assert calls == [5, 5, 5]  # 3 turns; every branch's turn ends in the same round (3 greedy tokens)


class CoinEnv(CounterEnv):
    """Two turns; the episode succeeds with probability p, drawn from the env's seeded randomness."""

    def __init__(self, p: float):
        super().__init__(max_turns=2)
        self.p = p

    def step(self, action):
        out = super().step(action)
        if out.done:
            return type(out)("", True, float(self.rng.random() < self.p), out.info)
        return out


@pytest.mark.slow  # 2 x 1,200 sampled episodes
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_oracle_success_rates_converge_to_the_known_rate_and_leave_training_sampling_alone(model, p):
    def engine():
        return HFRolloutEngine(
            model,
            CharCodec(VOCAB),
            lambda: CoinEnv(p),
            num_pages=4096,
            page_size=4,
            sampling=SamplingParams(temperature=1.0, max_tokens=2),
            decode_backend="cpu",  # hundreds of branches: the interpreted kernel would take minutes
            seed=4,
        )

    plain, probed = engine(), engine()
    forest, probed_forest = RolloutForest(vocab_size=VOCAB), RolloutForest(vocab_size=VOCAB)
    prompts = probed.prefill(TASKS)
    rates = probed.success_rates(prompts=prompts, samples=300)
    assert rates.shape == (2,) and np.abs(rates - p).max() < 0.09  # binomial sd at n=300: <= 0.029
    bare = probed.rollout(probed_forest, prompts, [2, 2])
    turn1 = bare.nodes[probed_forest.depth[bare.nodes] == 1]
    node_rates = probed.success_rates(forest=probed_forest, nodes=turn1, samples=300)
    assert np.abs(node_rates - p).max() < 0.09
    assert probed.oracle_tokens == 2 * 300 * 4 + 4 * 300 * 2 and probed.generated_tokens == 4 * 4
    # the probing sampled from its own streams: the training rollouts are those of an engine that never probed
    reference = plain.rollout(forest, plain.prefill(TASKS), [2, 2])
    assert [forest.leaf_sequence(u).token_ids.tolist() for u in reference.leaves] == [
        probed_forest.leaf_sequence(u).token_ids.tolist() for u in bare.leaves
    ]
    assert forest.reward[reference.leaves].tolist() == probed_forest.reward[bare.leaves].tolist()
