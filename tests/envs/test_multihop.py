"""Multi-hop lookup env: parsing policy, transitions and rewards, flaky tool vs the exact rate, splits,
errors naming fields, resume and reseed, and the tiny model + engine playing it end to end."""

import pickle

import numpy as np
import pytest
import torch

from trace_core.envs import make_env, make_task_source
from trace_core.envs.base import Env, EnvError, EpisodeStateError
from trace_core.envs.multihop.env import MultiHopEnv, parse_hop_action
from trace_core.envs.multihop.policies import (
    POLICIES,
    exact_success_rate,
    reactive_action,
    rollout_success_rate,
    success_from,
)
from trace_core.envs.multihop.tasks import LEVELS, HopTaskSource, generate_hop_tasks, parse_hop_task, split_of

TASK = {
    "id": "t",
    "level": 1,
    "hops": 2,
    "noise": 0.0,
    "max_turns": 4,
    "start": "e3",
    "answer": "e1",
    "facts": [["e1", "e5"], ["e3", "e7"], ["e7", "e1"]],
}


def flaky(**over):
    return {**TASK, "noise": 0.5, "max_turns": 6, **over}


def test_env_satisfies_protocol_and_is_registered():
    assert isinstance(MultiHopEnv(), Env)
    env = make_env("multihop", max_turns=3, on_invalid="end")
    assert isinstance(env, MultiHopEnv) and env.turn_cap == 3 and env.on_invalid == "end"
    tasks = make_task_source("multihop", num_train=4, num_eval=3, seed=1, levels=[2]).tasks("eval")
    assert len(tasks) == 3 and all(t["hops"] == 3 for t in tasks)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("e3", ("lookup", "e3")),
        ("lookup e3", ("lookup", "e3")),
        ("  Answer E7 \n", ("answer", None)),
        ("answer", ("answer", None)),
        ("E0<eot>", ("lookup", "e0")),
        ("<eot> e2 left 1", ("lookup", "e2")),
        ("", None),
        ("lookup", None),
        ("lookup e8", None),
        ("e8", None),
        ("left", None),
        ("e3 lookup", ("lookup", "e3")),
        ("search e3", None),
    ],
)
def test_action_parser_policy(text, expected):
    parsed, reason = parse_hop_action(text)
    assert parsed == expected
    assert (reason is None) == (expected is not None)


def test_following_the_chain_wins_and_observations_are_short_words():
    env = MultiHopEnv()
    assert env.reset(TASK, seed=0) == "level 1 turns 4 left 2 e3"
    step = env.step("e3")
    assert (step.observation, step.done, step.info["result"]) == ("left 1 e7", False, "found")
    step = env.step("e7 left 0")  # words after the action are ignored, and reported
    assert step.observation == "left 0 e1" and step.info["ignored_text"] == "left 0"
    step = env.step("answer e5")  # the answer is the entity held; a word after it is ignored
    assert step.done and step.reward == 1.0 and step.observation == "" and step.info["end_reason"] == "correct"
    assert step.info["answer"] == "e1" and step.info["ignored_text"] == "e5"
    with pytest.raises(EpisodeStateError):
        env.step("answer")


def test_wrong_answers_distractors_and_missing_facts():
    env = MultiHopEnv()
    env.reset(TASK, seed=0)
    env.step("lookup e3")
    step = env.step("answer")  # holding e7, one hop short
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "wrong" and step.info["answer"] == "e7"
    env.reset(TASK, seed=0)
    env.step("lookup e3"), env.step("lookup e7")
    step = env.step("lookup e1")  # one hop too many: a distractor fact, the count stays at 0
    assert step.observation == "left 0 e5"
    step = env.step("answer")
    assert step.reward == 0.0 and step.info["answer"] == "e5"
    env.reset(TASK, seed=0)
    step = env.step("e4")  # nothing known about e4: the count does not move
    assert step.observation == "none left 2 e4" and step.info["result"] == "none"


def test_turn_limit_and_invalid_actions():
    env = MultiHopEnv()
    env.reset(TASK, seed=0)
    step = env.step("jump e3")
    assert step.observation == "invalid left 2 e3" and not step.done and "invalid_reason" in step.info
    step = env.step("e3")  # an invalid action draws no randomness and moves nothing
    assert step.observation == "left 1 e7"
    env.step("lookup e7")
    step = env.step("lookup e1")  # fourth turn, not an answer: the limit ends the episode
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "turn_limit"
    env = MultiHopEnv(on_invalid="end")
    env.reset(TASK, seed=0)
    step = env.step("lookup")
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "invalid_action"
    env = MultiHopEnv(max_turns=2)  # the env's cap lowers the task's limit
    env.reset(TASK, seed=0)
    assert env.max_turns == 2
    env.step("lookup e3")
    assert env.step("lookup e7").info["end_reason"] == "turn_limit"


def test_tool_failures_use_a_turn_and_keep_the_count():
    env = MultiHopEnv()
    results = set()
    for seed in range(40):
        env.reset(flaky(), seed=seed)
        step = env.step("lookup e3")
        results.add(step.info["result"])
        if step.info["result"] == "fail":
            assert step.observation == "fail left 2 e3" and env.left == 2
        else:
            assert step.observation == "left 1 e7"
    assert results == {"fail", "found"}


def test_env_transitions_match_the_exact_rate():
    """Monte Carlo through the env agrees with the binomial rate of the optimal policy."""
    tasks = [flaky(max_turns=m, noise=p) for m, p in ((3, 0.0), (4, 0.3), (5, 0.5), (4, 0.6))]
    for task in tasks:
        exact = exact_success_rate(task)
        for name in ("optimal", "reactive"):
            mc = rollout_success_rate([task], POLICIES[name], episodes_per_task=400, seed=3)
            sigma = max(np.sqrt(exact * (1 - exact) / 400), 1 / 400)
            assert abs(mc - exact) <= 4 * sigma + 1e-9, (task, name, mc, exact)
    assert exact_success_rate(flaky(max_turns=4, noise=0.2)) == pytest.approx(0.8**3 + 3 * 0.8**2 * 0.2)


def test_scripted_rates_per_level():
    """Anchors: optimal 1.0 at level 0 falling with level, random far below at every level."""
    optimal, random = [], []
    for level in LEVELS:
        tasks = generate_hop_tasks(60, split="eval", seed=0, levels=[level])
        optimal.append(rollout_success_rate(tasks, POLICIES["optimal"], episodes_per_task=4, seed=1))
        random.append(rollout_success_rate(tasks, POLICIES["random"], episodes_per_task=4, seed=1))
        assert np.mean([exact_success_rate(t) for t in tasks]) == pytest.approx(optimal[-1], abs=0.08)
    assert optimal[0] == 1.0 and all(a > b for a, b in zip(optimal, optimal[1:]))
    assert optimal[-1] > 0.2 and all(o > r + 0.2 for o, r in zip(optimal, random))
    assert all(0.02 < r < 0.25 for r in random)


def test_success_varies_across_turn_prefixes():
    """After the first lookup of a level-3 task, the optimal policy's chance depends on whether the tool failed."""
    task = generate_hop_tasks(1, split="train", seed=5, levels=[3])[0]
    env = MultiHopEnv()
    values = {}
    for seed in range(20):
        env.reset(task, seed=seed)
        result = env.step(f"lookup {task['start']}").info["result"]
        values[result] = success_from(env.left, env.turns_left, task["noise"])
    assert set(values) == {"found", "fail"}
    assert values["found"] - values["fail"] > 0.2
    assert exact_success_rate(task) == pytest.approx(0.6 * values["found"] + 0.4 * values["fail"])


def test_restore_equals_replaying_the_prefix():
    env = MultiHopEnv()
    env.reset(flaky(), seed=7)
    env.step("lookup e3")
    snap = pickle.loads(pickle.dumps(env.snapshot()))
    rest = [env.step(a).observation for a in ("lookup e7", "lookup e1", "lookup e5")]
    other = MultiHopEnv()
    other.restore(snap)
    assert [other.step(a).observation for a in ("lookup e7", "lookup e1", "lookup e5")] == rest


def test_reseed_changes_future_and_same_seed_repeats():
    env = MultiHopEnv(max_turns=12)
    env.reset(flaky(max_turns=12), seed=0)
    snap = env.snapshot()

    def future(seed):
        env.restore(snap, seed=seed)
        return [env.step("lookup e3").info["result"] for _ in range(10)]

    assert future(5) == future(5)
    assert len({tuple(future(s)) for s in range(6)}) > 1


def test_snapshot_errors():
    with pytest.raises(EpisodeStateError):
        MultiHopEnv().snapshot()
    with pytest.raises(EpisodeStateError):
        MultiHopEnv().step("lookup e3")
    with pytest.raises(EnvError, match="snapshot"):
        MultiHopEnv().restore({"x": 1})
    env = MultiHopEnv()
    env.reset(TASK)
    with pytest.raises(EnvError, match="seed"):
        env.restore(env.snapshot(), seed=-1)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("hops", 0, "'hops'"),
        ("noise", 1.0, "'noise'"),
        ("noise", "x", "'noise'"),
        ("max_turns", 0, "'max_turns'"),
        ("start", "e9", "'start'"),
        ("answer", "e7", "'answer' is e7 but 2 hops from e3 end at e1"),
        ("facts", [["e3", "e7"]], "no 2-hop chain"),
        ("facts", [["e3", "e3"]], "'facts'"),
        ("facts", [["e3", "e7"], ["e3", "e1"]], "repeats a subject"),
        ("facts", [["e3"]], "'facts'"),
        ("facts", "e3 e7", "'facts'"),
    ],
)
def test_task_errors_name_the_field(field, value, message):
    with pytest.raises(EnvError, match=message):
        MultiHopEnv().reset({**TASK, field: value})
    with pytest.raises(EnvError, match="missing the field 'answer'"):
        parse_hop_task({k: v for k, v in TASK.items() if k != "answer"})


def test_config_errors_name_the_field():
    with pytest.raises(EnvError, match="on_invalid"):
        MultiHopEnv(on_invalid="skip")
    with pytest.raises(EnvError, match="max_turns"):
        MultiHopEnv(max_turns=0)
    with pytest.raises(EnvError, match="num_tasks"):
        generate_hop_tasks(0)
    with pytest.raises(EnvError, match="split"):
        generate_hop_tasks(3, split="test")
    with pytest.raises(EnvError, match="levels"):
        generate_hop_tasks(3, levels=[7])
    with pytest.raises(EnvError, match="levels"):
        HopTaskSource(levels=[])
    with pytest.raises(EnvError, match="num_eval"):
        HopTaskSource(num_eval=-1)
    with pytest.raises(EnvError, match="seed"):
        generate_hop_tasks(3, seed=-2)
    with pytest.raises(EnvError, match="unknown option"):
        make_env("multihop", noise=0.1)


def test_generator_is_seeded_graded_and_splits_are_disjoint():
    source = HopTaskSource(num_train=300, num_eval=60, seed=1)
    train, evals = source.tasks("train"), source.tasks("eval")
    assert train == HopTaskSource(num_train=300, num_eval=60, seed=1).tasks("train")
    assert train != HopTaskSource(num_train=300, num_eval=60, seed=2).tasks("train")
    assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "eval" for t in evals)
    key = lambda t: (t["hops"], t["noise"], t["max_turns"], t["start"], str(sorted(map(tuple, t["facts"]))))
    assert not {key(t) for t in train} & {key(t) for t in evals}
    assert len({key(t) for t in evals}) > 40  # the held-out tasks are varied, not a few repeated
    for task in train + evals:
        spec = LEVELS[task["level"]]
        parsed = parse_hop_task(task)  # every generated task is valid: its chain ends at its answer
        assert parsed.hops == spec.hops and task["noise"] == spec.noise
        assert task["max_turns"] == spec.hops + 1 + spec.spare_turns
        assert len(task["facts"]) == spec.hops + spec.distractors
    assert {t["level"] for t in train} == set(LEVELS)


def test_reactive_policy_reads_the_observation():
    assert reactive_action("level 2 turns 5 left 3 e4") == "e4"
    assert reactive_action("fail left 1 e6") == "e6"
    assert reactive_action("left 0 e2") == "answer"


def test_tiny_model_and_engine_play_episodes_end_to_end():
    """model.name=tiny builds the env's word tokenizer; the engine plays one-word turns through the env,
    and an episode is rewarded exactly when it answers holding the task's answer."""
    from trace_core.forest import RolloutForest
    from trace_core.model.policy import build_policy
    from trace_core.rollout import HFRolloutEngine, SamplingParams
    from trace_core.train.config import ModelConfig

    policy = build_policy(ModelConfig(device="cpu"), "multihop", seed=0)
    tok = policy.tokenizer
    tasks = generate_hop_tasks(6, split="eval", seed=0)
    env = MultiHopEnv()
    for task in tasks:  # every prompt word is one known token
        ids = tok(env.reset(task, seed=0), add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) == 7
    # random-init logits are flat: lean towards the level-0 chain's words so episodes end both ways
    tasks = [{**TASK, "level": 0, "hops": 1, "max_turns": 3, "answer": "e7"}] * 6
    bias = torch.zeros(len(tok))
    for word in ("answer", "e3"):
        bias[tok.convert_tokens_to_ids(word)] = 2.0
    policy.model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    engine = HFRolloutEngine(
        policy.model,
        policy.codec,
        MultiHopEnv,
        sampling=SamplingParams(temperature=1.0, max_tokens=1, stop_token_ids=policy.stop_token_ids),
        num_pages=256,
        page_size=16,
        decode_backend="cpu",
        seed=0,
    )
    forest = RolloutForest()
    out = engine.rollout(forest, engine.prefill(tasks), [8] * len(tasks))
    rewards = forest.reward[out.leaves]
    assert len(rewards) == 48 and set(np.unique(rewards)) <= {0.0, 1.0}
    reasons = [info["end_reason"] for info in out.info]
    assert set(reasons) <= {"correct", "wrong", "turn_limit"} and "correct" in reasons and "wrong" in reasons
    for leaf, info, reward in zip(out.leaves.tolist(), out.info, rewards.tolist()):
        task = tasks[int(forest.prompt_id[leaf])]
        assert (reward == 1.0) == (info["end_reason"] == "correct")
        if info["end_reason"] in ("correct", "wrong"):
            assert info["action"] == "answer" and (info["answer"] == task["answer"]) == (reward == 1.0)
        seq = forest.leaf_sequence(leaf)
        model_tokens = int(np.asarray(seq.loss_mask).sum())
        assert model_tokens <= task["max_turns"]  # one token a turn


def test_every_multihop_word_is_one_known_token():
    from trace_core.model.word_tokenizer import word_tokenizer_for

    tok = word_tokenizer_for("multihop")
    env = MultiHopEnv(max_turns=12)
    texts = []
    for task in generate_hop_tasks(40, seed=0):
        texts.append(env.reset({**task, "noise": 0.5, "max_turns": 6}, seed=0))
        texts += [env.step(a).observation for a in (task["start"], "jump", "e0", "e1", "e2")]
    assert any(t.startswith("fail") for t in texts) and any(t.startswith("invalid") for t in texts)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and tok.unk_token_id not in ids, text
    actions = ["answer", *(f"e{i}" for i in range(8))]
    assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in actions)
    assert len(tok) == 27  # one-word actions from a small vocabulary: a random-init policy explores it


def test_word_tokenizers_by_env_name(monkeypatch):
    from trace_core.model import word_tokenizer as wt
    from trace_core.model.policy import load_tiny
    from trace_core.train.config import ModelConfig
    from trace_core.train.config_loader import ConfigError

    assert wt.word_tokenizer_for("search_qa") is None
    with pytest.raises(ConfigError, match="needs an env with a built-in word tokenizer"):
        load_tiny(ModelConfig(), "search_qa", 0, torch.float32)
    with pytest.raises(EnvError, match="env_name"):
        wt.register_word_tokenizer("gridworld", wt.multihop_tokenizer)
    monkeypatch.setattr(wt, "WORD_TOKENIZERS", dict(wt.WORD_TOKENIZERS))
    wt.register_word_tokenizer("my_env", lambda: wt.build_word_tokenizer(["go", "stop"]))
    model, tok, stop = load_tiny(ModelConfig(), "my_env", 0, torch.float32)
    assert len(tok) == 7 and model.config.vocab_size == 7 and stop == (tok.convert_tokens_to_ids(wt.EOT),)
    model, tok, _ = load_tiny(ModelConfig(), "multihop", 0, torch.float32)
    assert model.config.vocab_size == len(tok) == 27
