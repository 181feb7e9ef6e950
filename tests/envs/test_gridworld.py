"""Grid world: parsing policy, transitions vs exact DP, scripted rates, turn limit, resume and reseed."""

import pickle

import numpy as np
import pytest

from trace_core.envs.base import Env, EnvError, EpisodeStateError
from trace_core.envs.gridworld.env import GridWorldEnv, parse_grid_action
from trace_core.envs.gridworld.policies import (
    POLICIES,
    exact_success_rate,
    greedy_action,
    optimal_action,
    rollout_success_rate,
    success_table,
)
from trace_core.envs.gridworld.tasks import LEVELS, GridTaskSource, generate_grid_tasks, parse_grid_task, split_of

OPEN_TASK = {
    "id": "t",
    "level": 1,
    "size": 4,
    "slip": 0.0,
    "max_turns": 4,
    "start": [0, 0],
    "goal": [0, 3],
    "walls": [[1, 1]],
    "holes": [[1, 0]],
}


def slippery(**over):
    return {**OPEN_TASK, "slip": 0.5, "max_turns": 8, **over}


def play(env, actions):
    out = []
    for a in actions:
        step = env.step(a)
        out.append((step.observation, step.done, step.reward, env.position, env.turn))
        if step.done:
            break
    return out


def test_env_satisfies_protocol():
    assert isinstance(GridWorldEnv(), Env)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("north", "north"),
        ("  East \n", "east"),
        ("west<eot>", "west"),
        ("south <eos>", "south"),
        ("north east", "north"),
        ("", None),
        ("up", None),
        ("<eot>", None),
        ("goal north", None),
        ("<eot> west", "west"),
    ],
)
def test_action_parser_policy(text, expected):
    direction, reason = parse_grid_action(text)
    assert direction == expected
    assert (reason is None) == (expected is not None)


def test_prompt_and_observation_are_short_words():
    env = GridWorldEnv()
    prompt = env.reset(OPEN_TASK, seed=0)
    assert prompt == "level 1 turns 4 goal 3 east wall north hole south wall west"
    step = env.step("east")
    assert step.observation == "goal 2 east wall north wall south" and not step.done
    assert step.info["position"] == [0, 1] and "ignored_text" not in step.info
    step = env.step("east goal 3 <eot>")  # words after the move are ignored, and reported
    assert step.info["position"] == [0, 2] and step.info["ignored_text"] == "goal 3"


def test_goal_hole_and_turn_limit():
    env = GridWorldEnv()
    env.reset(OPEN_TASK, seed=0)
    last = play(env, ["east", "east", "east"])[-1]
    assert last[1:3] == (True, 1.0)
    env.reset(OPEN_TASK, seed=0)
    step = env.step("south")
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "hole" and step.observation == ""
    env.reset(OPEN_TASK, seed=0)
    trace = play(env, ["west", "north", "west", "north"])  # bumps the edge four times
    assert [t[1] for t in trace] == [False, False, False, True]
    assert trace[-1][2] == 0.0 and env.turn == env.max_turns == 4
    with pytest.raises(EpisodeStateError, match="episode is over"):
        env.step("east")


def test_invalid_action_continue_uses_the_turn_without_moving():
    env = GridWorldEnv(on_invalid="continue")
    env.reset(slippery(), seed=3)
    state = env.snapshot()
    step = env.step("jump")
    assert not step.done and step.observation.startswith("invalid goal 3 east")
    assert env.position == (0, 0) and env.turn == 1 and "unknown action" in step.info["invalid_reason"]
    assert env.snapshot()["rng"] == state["rng"]  # no randomness drawn for an invalid turn
    env.reset(OPEN_TASK, seed=0)
    trace = play(env, ["?"] * 5)
    assert len(trace) == 4 and trace[-1][1:3] == (True, 0.0)


def test_invalid_action_end_policy():
    env = GridWorldEnv(on_invalid="end")
    env.reset(OPEN_TASK, seed=0)
    step = env.step("wall east")
    assert step.done and step.reward == 0.0 and step.info["end_reason"] == "invalid_action"


def test_env_cap_on_turns():
    env = GridWorldEnv(max_turns=2)
    env.reset(OPEN_TASK, seed=0)
    assert env.max_turns == 2
    assert play(env, ["east", "east"])[-1][1:3] == (True, 0.0)


def test_restore_equals_replaying_the_prefix():
    task = slippery()
    rng = np.random.default_rng(0)
    for trial in range(20):
        actions = [["north", "south", "east", "west"][i] for i in rng.integers(4, size=8)]
        cut = int(rng.integers(1, 5))
        a = GridWorldEnv()
        a.reset(task, seed=trial)
        prefix = play(a, actions[:cut])
        if prefix[-1][1]:
            continue
        snap = pickle.loads(pickle.dumps(a.snapshot()))  # snapshots are picklable
        rest_a = play(a, actions[cut:])
        b = GridWorldEnv()
        b.reset(OPEN_TASK, seed=123)  # a used env: restore must overwrite everything
        b.step("east")
        b.restore(snap)
        assert play(b, actions[cut:]) == rest_a
        c = GridWorldEnv()
        c.reset(task, seed=trial)
        assert play(c, actions) == prefix + rest_a  # same seed from reset -> same episode


def test_reseed_changes_future_and_same_seed_repeats():
    env = GridWorldEnv()
    env.reset(slippery(), seed=0)
    env.step("east")
    snap = env.snapshot()
    moves = ["south"] * 6

    def continuation(seed):
        env.restore(snap, seed=seed)
        return play(env, moves)

    futures = {seed: continuation(seed) for seed in range(12)}
    assert len({repr(f) for f in futures.values()}) > 3  # slip 0.5: seeds give different futures
    assert continuation(5) == futures[5]
    assert continuation(None) == continuation(None)  # no seed: the snapshot's own RNG state


def test_snapshot_errors():
    with pytest.raises(EpisodeStateError, match="reset"):
        GridWorldEnv().snapshot()
    with pytest.raises(EpisodeStateError, match="reset"):
        GridWorldEnv().step("north")
    with pytest.raises(EnvError, match="snapshot"):
        GridWorldEnv().restore({"position": [0, 0]})
    env = GridWorldEnv()
    with pytest.raises(EnvError, match="seed"):
        env.reset(OPEN_TASK, seed=-1)
    env.reset(OPEN_TASK, seed=0)
    with pytest.raises(EnvError, match="seed"):
        env.restore(env.snapshot(), seed="abc")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("size", 0, "'size'"),
        ("slip", 1.5, "'slip'"),
        ("max_turns", 0, "'max_turns'"),
        ("start", [0, 9], "'start'"),
        ("goal", [0, 0], "'start' and 'goal'"),
        ("walls", "x", "'walls'"),
        ("goal", [1, 1], "'goal'"),
        ("start", "a", "'start'"),
    ],
)
def test_task_errors_name_the_field(field, value, message):
    with pytest.raises(EnvError, match=message):
        GridWorldEnv().reset({**OPEN_TASK, field: value})
    with pytest.raises(EnvError, match="missing the field 'goal'"):
        parse_grid_task({k: v for k, v in OPEN_TASK.items() if k != "goal"})


def test_config_errors_name_the_field():
    with pytest.raises(EnvError, match="on_invalid"):
        GridWorldEnv(on_invalid="skip")
    with pytest.raises(EnvError, match="max_turns"):
        GridWorldEnv(max_turns=0)
    with pytest.raises(EnvError, match="num_tasks"):
        generate_grid_tasks(0)
    with pytest.raises(EnvError, match="split"):
        generate_grid_tasks(3, split="test")
    with pytest.raises(EnvError, match="levels"):
        generate_grid_tasks(3, levels=[7])
    with pytest.raises(EnvError, match="num_eval"):
        GridTaskSource(num_eval=-1)


def test_generator_is_seeded_graded_and_splits_are_disjoint():
    source = GridTaskSource(num_train=200, num_eval=40, seed=1)
    train, evals = source.tasks("train"), source.tasks("eval")
    assert train == GridTaskSource(num_train=200, num_eval=40, seed=1).tasks("train")
    assert train != GridTaskSource(num_train=200, num_eval=40, seed=2).tasks("train")
    assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "eval" for t in evals)
    key = lambda t: (
        t["size"],
        t["slip"],
        t["max_turns"],
        tuple(t["start"]),
        tuple(t["goal"]),
        str(t["walls"]),
        str(t["holes"]),
    )
    assert not {key(t) for t in train} & {key(t) for t in evals}
    for task in train:
        spec = LEVELS[task["level"]]
        assert spec.distance[0] <= task["shortest_path"] <= spec.distance[1]
        assert task["max_turns"] == task["shortest_path"] + spec.spare_turns


def test_env_transitions_match_the_exact_tables():
    """Monte Carlo through the env agrees with the DP over the task's transition model."""
    tasks = list(generate_grid_tasks(12, split="eval", seed=4, levels=[2, 3]))[:4]
    for task in tasks:
        for name in ("optimal", "random"):
            exact = exact_success_rate(task, name)
            mc = rollout_success_rate([task], POLICIES[name], episodes_per_task=300, seed=11)
            sigma = max(np.sqrt(exact * (1 - exact) / 300), 1 / 300)
            assert abs(mc - exact) <= 4 * sigma + 1e-9, (task["id"], name, mc, exact)


def test_scripted_rates_per_level_and_variation():
    """Anchors for training: optimal >> random at every level, graded difficulty, varied values."""
    optimal, random = {}, {}
    for level in LEVELS:
        tasks = generate_grid_tasks(40, split="eval", seed=0, levels=[level])
        optimal[level] = np.array([exact_success_rate(t, "optimal") for t in tasks])
        random[level] = np.array([exact_success_rate(t, "random") for t in tasks])
        assert optimal[level].mean() > random[level].mean() + 0.2
    assert optimal[0].min() == 1.0  # no slip, enough turns: the optimal policy always wins
    means = [optimal[level].mean() for level in sorted(LEVELS)]
    assert all(a > b for a, b in zip(means, means[1:]))  # graded difficulty
    # success varies across prompts: across levels, and between layouts of one level
    assert np.concatenate(list(optimal.values())).std() > 0.2
    assert all(np.ptp(optimal[level]) > 0.2 for level in (2, 3))


def test_success_varies_across_turn_prefixes():
    task = generate_grid_tasks(1, split="train", seed=5, levels=[3])[0]
    layout = parse_grid_task(task)
    table = success_table(layout)
    env = GridWorldEnv()
    values = []
    for seed in range(30):
        env.reset(task, seed=seed)
        step = env.step(optimal_action(layout, env.position, env.turns_left))
        if not step.done:
            values.append(table[env.turns_left][env.position])
    assert len(values) > 10 and max(values) - min(values) > 0.2


def test_greedy_policy_reads_the_observation():
    assert greedy_action("level 2 turns 7 goal 2 north 1 east wall south") == "north"
    assert greedy_action("goal 1 north 3 east hole east") == "north"
    assert greedy_action("goal 2 west wall west hole north") == "south"


def test_reference_success_is_the_exact_success_of_the_scripted_policies():
    """GridTaskSource.reference_success (drawn in the plots): the random-direction policy's exact success equals
    its Monte-Carlo rate through the env; the optimal policy beats it; both are probabilities."""
    from trace_core.envs.gridworld import GridTaskSource
    from trace_core.envs.gridworld.policies import random_policy, rollout_success_rate

    source = GridTaskSource(num_train=4, num_eval=30, levels=[0, 1])
    tasks = source.tasks("eval")
    levels = source.reference_success(tasks)
    assert set(levels) == {"random policy", "optimal policy"}
    monte_carlo = rollout_success_rate(tasks, random_policy, episodes_per_task=200, seed=1)
    assert levels["random policy"] == pytest.approx(monte_carlo, abs=0.03)
    assert 0 < levels["random policy"] < levels["optimal policy"] <= 1
