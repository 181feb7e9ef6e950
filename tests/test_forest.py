"""RolloutForest: building, structure queries, values, and every validation error."""

import numpy as np
import pytest
from hypothesis import given, settings

from forest_strategies import forests
from trace_core.forest import ROLE_MODEL, ForestError, RolloutForest, Trajectory
from trace_core.synthetic_forest import synthetic_forest


def bare(prompt_id=0, reward=1.0, tail=(6, 7, 8)):
    """prompt [1, 2] | turn 1: model 3 4, obs 5 | turn 2: model `tail`."""
    tokens = [1, 2, 3, 4, 5, *tail]
    mask = [0, 0, 1, 1, 0] + [1] * len(tail)
    return Trajectory(prompt_id, tokens, mask, [2, 5], reward=reward, logprobs=[-0.5] * len(tokens))


def example_forest():
    trajs = [
        bare(reward=1.0),  # nodes: root 0, turn1 1, turn2 2
        Trajectory(0, [1, 2, 3, 4, 5, 9, 9], [0, 0, 1, 1, 0, 1, 1], [2, 5], reward=0.0, branch_from=(0, 1)),  # node 3
        bare(reward=0.0, tail=(8,)),  # a second bare rollout of prompt 0: nodes 4, 5
        Trajectory(1, [3, 3, 7], [0, 0, 1], [2], reward=1.0),  # prompt 1: root 6, turn 7
    ]
    return RolloutForest.from_trajectories(trajs, vocab_size=10)


def test_trajectories_share_prompt_and_branch_prefix():
    f = example_forest()
    assert f.parent.tolist() == [-1, 0, 1, 1, 0, 4, -1, 6]
    assert f.depth.tolist() == [0, 1, 2, 2, 1, 2, 0, 1]
    assert f.num_tokens == 2 + 3 + 3 + 2 + 3 + 1 + 2 + 1  # shared prompt and turn stored once
    assert f.leaves.tolist() == [2, 3, 5, 7]
    assert f.rollout_root().tolist() == [-1, 1, 1, 1, 4, 4, -1, 7]
    assert f.tree_root().tolist() == [0, 0, 0, 0, 0, 0, 6, 6]
    assert f.num_children.tolist() == [2, 2, 0, 0, 1, 0, 1, 0]
    assert f.turn_nodes == [[0, 1, 2], [0, 1, 3], [0, 4, 5], [6, 7]]


def test_leaf_paths_and_sequences():
    f = example_forest()
    offsets, nodes = f.leaf_paths()
    paths = [nodes[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert paths == [[0, 1, 2], [0, 1, 3], [0, 4, 5], [6, 7]]
    seq = f.leaf_sequence(3)
    assert seq.token_ids.tolist() == [1, 2, 3, 4, 5, 9, 9]
    assert seq.loss_mask.tolist() == [False, False, True, True, False, True, True]
    assert seq.reward == 0.0
    # logprobs: recorded ones at model tokens, 0 at observations, NaN where not recorded (trajectory 1)
    np.testing.assert_array_equal(seq.logprobs[:5], [0, 0, -0.5, -0.5, 0])
    assert np.isnan(seq.logprobs[5:]).all()


def test_values_effective_ratio():
    f = example_forest()
    assert f.subtree_leaf_counts().tolist() == [3, 2, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(f.subtree_success_rates(), [1 / 3, 0.5, 1, 0, 0, 0, 1, 1])
    assert f.is_mixed().tolist() == [True, True, False, False, False, False, False, False]
    assert f.effective_ratio() == 0.5
    np.testing.assert_allclose(f.subtree_sum(np.arange(8.0)), [10, 5, 2, 3, 5, 5, 7, 7])


def test_values_need_rewards():
    f = RolloutForest()
    r = f.add_root(0, [1, 2])
    f.add_node(r, [3], [True])
    with pytest.raises(ForestError, match="no reward yet"):
        f.subtree_success_rates()
    with pytest.raises(ForestError, match="no reward yet"):
        f.validate(require_rewards=True)
    f.validate()  # pending rewards are fine while generating
    with pytest.raises(ForestError, match="no prompts"):
        RolloutForest().effective_ratio()


def test_fractional_rewards_mixed_means_unequal():
    f = RolloutForest()
    r = f.add_root(0, [1])
    for value in (0.25, 0.25):
        f.set_reward(f.add_node(r, [2], [True]), value)
    assert not f.is_mixed()[r]
    f.set_reward(f.add_node(r, [2], [True]), 0.5)
    assert f.is_mixed()[r]


def test_incremental_api_matches_trajectory_builder():
    f = RolloutForest(vocab_size=10)
    root = f.add_root(0, [1, 2])
    t1 = f.add_node(root, [3, 4, 5], [1, 1, 0], [-0.5, -0.5, -0.1])
    f.set_reward(f.add_node(t1, [6, 7, 8], [1, 1, 1], [-0.5] * 3), 1.0)
    f.set_reward(f.add_node(t1, [9, 9], [1, 1]), 0.0)
    t1b = f.add_node(root, [3, 4, 5], [1, 1, 0], [-0.5] * 3)
    f.set_reward(f.add_node(t1b, [8], [1], [-0.5]), 0.0)
    r1 = f.add_root(1, [3, 3])
    f.set_reward(f.add_node(r1, [7], [1], [-0.5]), 1.0)
    g = example_forest()
    for name in ("parent", "depth", "prompt_id", "tok_start", "tok_end", "tokens", "role"):
        np.testing.assert_array_equal(getattr(f, name), getattr(g, name), err_msg=name)
    np.testing.assert_array_equal(f.reward, g.reward)
    assert f.root_of(1) == 6
    with pytest.raises(ForestError, match="prompt_id: no tree for prompt 5"):
        f.root_of(5)


def test_columns_are_read_only_views():
    f = example_forest()
    with pytest.raises(ValueError, match="read-only"):
        f.parent[0] = 3
    with pytest.raises(ValueError, match="read-only"):
        f.tokens[0] = 3


def test_from_arrays_round_trip():
    f = example_forest()
    g = RolloutForest.from_arrays(
        parent=f.parent,
        prompt_id=f.prompt_id,
        tok_start=f.tok_start,
        tok_end=f.tok_end,
        tokens=f.tokens,
        role=f.role,
        reward=f.reward,
        logprob=f.logprob,
        depth=f.depth,
        vocab_size=10,
        require_rewards=True,
    )
    np.testing.assert_array_equal(g.num_children, f.num_children)
    np.testing.assert_array_equal(g.subtree_success_rates(), f.subtree_success_rates())
    assert g.root_of(1) == 6


@settings(max_examples=60, deadline=None)
@given(forests())
def test_subtree_values_match_brute_force(forest):
    counts = forest.subtree_leaf_counts()
    rates = forest.subtree_success_rates()
    leaves = forest.leaves
    for u in range(forest.num_nodes):
        under = [leaf for leaf in leaves if u in forest.leaf_path(leaf)]
        assert counts[u] == len(under)
        rewards = forest.reward[under]
        assert rates[u] == pytest.approx(rewards.mean())
        assert forest.is_mixed()[u] == (rewards.min() < rewards.max())


def test_synthetic_forest_shape():
    rng = np.random.default_rng(0)
    f = synthetic_forest(rng, num_prompts=3, rollouts=2, turns=3, continuations=2)
    f.validate(require_rewards=True)
    assert f.roots.size == 3
    assert f.leaves.size == 3 * (2 + 2)  # every bare rollout and continuation ends in a leaf
    assert set(f.depth[f.leaves].tolist()) == {3}
    assert (f.role[f.tok_start[f.roots]] != ROLE_MODEL).all()


# ---------------------------------------------------------------------- validation errors
def arrays(**overrides):
    """A valid 2-prompt forest as raw arrays: 0 -> 1 -> {2, 3}; 4 -> 5."""
    base = dict(
        parent=[-1, 0, 1, 1, -1, 4],
        prompt_id=[7, 7, 7, 7, 8, 8],
        tok_start=[0, 2, 4, 5, 6, 8],
        tok_end=[2, 4, 5, 6, 8, 9],
        tokens=[1, 2, 3, 4, 5, 6, 1, 1, 2],
        role=[0, 0, 1, 0, 1, 1, 0, 0, 1],
        reward=[np.nan, np.nan, 1.0, 0.0, np.nan, 1.0],
    )
    base.update(overrides)
    return base


def test_valid_arrays_accepted():
    f = RolloutForest.from_arrays(**arrays(), vocab_size=7, require_rewards=True)
    assert f.leaves.tolist() == [2, 3, 5]


@pytest.mark.parametrize(
    "overrides, field, message",
    [
        (dict(parent=[-1, 0, 3, 1, -1, 4]), "parent", "parent must be -1 .root. or an earlier node"),
        (dict(parent=[-1, 0, 2, 1, -1, 4]), "parent", "rules out cycles"),  # self-loop
        (dict(parent=[-1, 0, 1, 1, -1, -2]), "parent", "node 5 has parent -2"),
        (dict(tok_end=[2, 4, 5, 6, 8, 10]), "tok_start/tok_end", "outside the token buffer"),
        (dict(tok_start=[0, 2, 4, 4, 6, 8]), "tok_start/tok_end", "overlap"),
        (dict(tok_start=[0, 2, 5, 5, 6, 8]), "tok_start/tok_end", "empty token span"),
        (dict(tokens=[1, 2, 3, -4, 5, 6, 1, 1, 2]), "tokens", "token id -4 at position 3 is negative"),
        (dict(tokens=[1, 2, 3, 4, 5, 6, 1, 1, 9]), "tokens", "token id 9 at position 8 is >= vocab_size 7"),
        (dict(reward=[np.nan, np.nan, np.inf, 0.0, np.nan, 1.0]), "reward", "finite and in .0, 1."),
        (dict(reward=[np.nan, np.nan, 1.5, 0.0, np.nan, 1.0]), "reward", "leaf 2 has reward 1.5"),
        (dict(reward=[np.nan, 1.0, 1.0, 0.0, np.nan, 1.0]), "reward", "node 1 is internal"),
        (dict(reward=[np.nan, np.nan, np.nan, 0.0, np.nan, 1.0]), "reward", "no reward yet"),
        (dict(role=[0, 0, 1, 0, 1, 1, 0, 2, 1]), "role", "token 7 has role 2"),
        (dict(role=[1, 0, 1, 0, 1, 1, 0, 0, 1]), "role", "belongs to a prompt"),
        (dict(prompt_id=[7, 7, 7, 8, 8, 8]), "prompt_id", "node 3 has prompt 8 but its parent 1 has 7"),
        (dict(prompt_id=[7, 7, 7, 7, 7, 7]), "prompt_id", "more than one root"),
        (dict(parent=[-1, 0, 1, 1, -1, 0], prompt_id=[7, 7, 7, 7, 8, 7]), "parent", "no turns: empty trajectory"),
        (dict(tok_start=[0, 2, 4, 5, 6]), "tok_start", r"shape \(5,\), expected \(6,\)"),
        (dict(role=[0, 0, 1]), "role", "expected"),
        (dict(tokens=[1.5] * 9), "tokens", "must hold integers"),
        (dict(depth=[0, 1, 2, 3, 0, 1]), "depth", "node 3 has depth 3"),
    ],
)
def test_from_arrays_errors_name_the_field(overrides, field, message):
    with pytest.raises(ForestError, match=message) as info:
        RolloutForest.from_arrays(**arrays(**overrides), vocab_size=7, require_rewards=True)
    assert info.value.field == field


def test_logprob_must_be_finite_and_non_positive():
    with pytest.raises(ForestError, match="logprob: sampling logprob 0.5"):
        RolloutForest.from_arrays(**arrays(), logprob=[0, 0, 0.5, 0, -1, -1, 0, 0, -1])
    f = RolloutForest()
    r = f.add_root(0, [1])
    with pytest.raises(ForestError, match="logprobs: sampling logprob -inf"):
        f.add_node(r, [2], [True], [-np.inf])
    with pytest.raises(ForestError, match="logprobs: has 2 entries for 1 tokens"):
        f.add_node(r, [2], [True], [-1.0, -1.0])


def test_incremental_errors():
    f = RolloutForest(vocab_size=5)
    r = f.add_root(0, [1, 2])
    with pytest.raises(ForestError, match="prompt_id: prompt 0 already has a root"):
        f.add_root(0, [1])
    with pytest.raises(ForestError, match="parent: node 9 does not exist"):
        f.add_node(9, [1], [True])
    with pytest.raises(ForestError, match="token_ids: must be a non-empty"):
        f.add_node(r, [], [])
    with pytest.raises(ForestError, match="token_ids: token id 5 at position 1 is >= vocab_size 5"):
        f.add_node(r, [1, 5], [True, True])
    with pytest.raises(ForestError, match="token_ids: token ids must be integers"):
        f.add_node(r, [1.0], [True])
    with pytest.raises(ForestError, match="model_mask: has 1 entries for 2 tokens"):
        f.add_node(r, [1, 2], [True])
    leaf = f.add_node(r, [3], [True])
    with pytest.raises(ForestError, match="reward: node 0 is not a leaf"):
        f.set_reward(r, 1.0)
    with pytest.raises(ForestError, match="reward: reward of node 1 is nan"):
        f.set_reward(leaf, float("nan"))
    with pytest.raises(ForestError, match="must be a number"):
        f.set_reward(leaf, "yes")
    f.set_reward(leaf, 1.0)
    with pytest.raises(ForestError, match="parent: node 1 has a reward, so it is a finished leaf"):
        f.add_node(leaf, [4], [True])
    with pytest.raises(ForestError, match="vocab_size"):
        RolloutForest(vocab_size=0)
    assert f.num_nodes == 2 and f.num_tokens == 3  # failed calls left nothing behind


@pytest.mark.parametrize(
    "trajs, field, message",
    [
        ([Trajectory(0, [], [], [])], "trajectories[0].token_ids", "empty trajectory"),
        ([Trajectory(0, [1, 2], [0, 0], [])], "trajectories[0].turn_starts", "empty trajectory: no turn"),
        ([Trajectory(0, [1, 2, 3], [0, 1, 1], [2, 2])], "trajectories[0].turn_starts", "strictly increasing"),
        ([Trajectory(0, [1, 2, 3], [0, 1, 1], [3])], "trajectories[0].turn_starts", "strictly increasing"),
        ([Trajectory(0, [1, 2, 3], [0, 1], [1])], "trajectories[0].model_mask", "2 entries for 3 tokens"),
        ([Trajectory(0, [1, 2, 3], [0, 1, 1], [1], logprobs=[0, -1])], "trajectories[0].logprobs", "2 entries"),
        ([Trajectory(0, [1, 2, 3], [1, 1, 1], [1])], "trajectories[0].model_mask", "marks prompt token 0"),
        ([Trajectory(0, [1, 2, 3], [0, 1, 1], [1], reward=2.0)], "trajectories[0].reward", "reward of node 1 is 2.0"),
        (
            [Trajectory(0, [1, 2, 3], [0, 1, 1], [1], reward=1.0), Trajectory(0, [9, 2, 3], [0, 1, 1], [1])],
            "trajectories[1].token_ids",
            "prompt differs",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from=(1, 1))],
            "trajectories[1].branch_from",
            "earlier trajectory",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from=(0, 2))],
            "trajectories[1].branch_from",
            "last turn is a leaf",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from="x")],
            "trajectories[1].branch_from",
            "must be .trajectory index, turn.",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 0, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from=(0, 1))],
            "trajectories[1].token_ids",
            "does not repeat the prompt and turns 1..1 of trajectory 0",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 4], branch_from=(0, 1))],
            "trajectories[1].token_ids",
            "does not repeat",
        ),
        (
            [bare(), Trajectory(0, [1, 2, 3, 4, 5], [0, 0, 1, 1, 0], [2], branch_from=(0, 1))],
            "trajectories[1].turn_starts",
            "no turn after its branch point",
        ),
        (
            [bare(), Trajectory(1, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from=(0, 1))],
            "trajectories[1].branch_from",
            "has prompt_id 1",
        ),
        (
            [Trajectory(0, [1, 2, 3], [0, 1, 1], [1]), Trajectory(0, [1, 2, 4], [0, 1, 1], [1], branch_from=(0, 1))],
            "trajectories[1].branch_from",
            "last turn is a leaf",
        ),
    ],
)
def test_trajectory_errors_name_the_field(trajs, field, message):
    with pytest.raises(ForestError, match=message) as info:
        RolloutForest.from_trajectories(trajs, vocab_size=10)
    assert info.value.field == field


@pytest.mark.parametrize(
    "traj, field",
    [
        (Trajectory(0, [1, 2, 3], [0, 1, 1], [1.5]), "trajectories[0].turn_starts"),
        (Trajectory(0, [1, 2, 3], [0, 1, 1], [1.0]), "trajectories[0].turn_starts"),
        (Trajectory(0, [1, 2, 3], [0, 1, 1], np.array([1.9])), "trajectories[0].turn_starts"),
        (Trajectory(0.5, [1, 2, 3], [0, 1, 1], [1]), "trajectories[0].prompt_id"),
        (Trajectory(np.float64(2.0), [1, 2, 3], [0, 1, 1], [1]), "trajectories[0].prompt_id"),
        (Trajectory("7", [1, 2, 3], [0, 1, 1], [1]), "trajectories[0].prompt_id"),
    ],
)
def test_non_integer_turn_starts_and_prompt_id_raise(traj, field):
    # issue 19: float turn_starts / prompt_id were truncated silently (1.5 -> 1, 0.5 -> prompt 0)
    with pytest.raises(ForestError, match="must (hold integers|be an integer)") as info:
        RolloutForest.from_trajectories([traj])
    assert info.value.field == field


def test_incremental_builders_refuse_non_integer_ids():
    f = RolloutForest()
    for bad in (0.5, 1.0, True, "0"):
        with pytest.raises(ForestError, match="prompt_id: must be an integer") as info:
            f.add_root(bad, [1, 2])
        assert info.value.field == "prompt_id"
    root = f.add_root(np.int64(3), [1, 2])  # numpy integers are integers
    assert f.root_of(3) == root and f.prompt_id[root] == 3
    with pytest.raises(ForestError, match="parent: must be an integer"):
        f.add_node(0.0, [3], [True])
    leaf = f.add_node(root, [3], [True])
    with pytest.raises(ForestError, match="node: must be an integer"):
        f.set_reward(float(leaf), 1.0)
    with pytest.raises(ForestError, match="branch_from"):
        RolloutForest.from_trajectories(
            [bare(), Trajectory(0, [1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 0, 1], [2, 5], branch_from=(0.0, 1))]
        )


def test_token_beyond_vocab_in_trajectory():
    with pytest.raises(ForestError, match="trajectories\\[0\\].token_ids: token id 12"):
        RolloutForest.from_trajectories([Trajectory(0, [1, 2, 12], [0, 1, 1], [1])], vocab_size=10)
