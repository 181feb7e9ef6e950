"""TRACE's tree advantages through verl's real `compute_advantage` (needs `verl`: scripts/setup_verl_env.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (make its venv with scripts/setup_verl_env.sh)")

from verl import DataProto
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage

from trace_core.advantage import grpo, segment, tree_grpo
from trace_core.forest import ForestError
from trace_core.integrations.verl.advantage import (
    adopt_tree_uids,
    forest_from_index,
    register_estimators,
)
from trace_core.integrations.verl.rows import leaf_row
from trace_core.synthetic_forest import synthetic_forest


def verl_batch(forest, *, seed: int = 0, field: str = "uid") -> tuple[DataProto, list[int]]:
    """Every leaf of `forest` as a verl row (left-padded prompt, right-padded response), rows shuffled."""
    leaves = np.random.default_rng(seed).permutation(forest.leaves)
    rows = [leaf_row(forest, int(leaf), group=f"prompt-{int(forest.prompt_id[leaf])}") for leaf in leaves]
    length = max(len(r.response_ids) for r in rows)
    mask = torch.zeros(len(rows), length, dtype=torch.int64)
    rewards = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        mask[i, : len(r.response_mask)] = torch.tensor(r.response_mask)
        rewards[i, len(r.response_ids) - 1] = r.reward  # verl puts the score on the last response token
    uids = np.array([r.uid for r in rows], dtype=object)
    non_tensor = {field: uids}
    if field != "uid":  # as verl's trainer has it: one uid per prompt, the tree uids in a separate field
        non_tensor["uid"] = np.array([u.split("#")[0] for u in uids], dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask}, non_tensors=non_tensor)
    return data, [int(x) for x in leaves]


@pytest.fixture(scope="module")
def forest():
    return synthetic_forest(np.random.default_rng(3), num_prompts=5, rollouts=3, turns=3, continuations=4)


@pytest.mark.parametrize("name", ["tree_grpo", "segment"])
def test_compute_advantage_equals_trace_rl(forest, name):
    register_estimators()
    data, leaves = verl_batch(forest)
    out = compute_advantage(data, adv_estimator=name, config=AlgoConfig(adv_estimator=name))
    adv, mask = out.batch["advantages"], out.batch["response_mask"].bool()
    assert torch.equal(out.batch["returns"], adv)
    assert torch.all(adv[~mask] == 0)
    if name == "tree_grpo":
        expected = tree_grpo(forest)
        for i, leaf in enumerate(leaves):
            assert torch.allclose(adv[i][mask[i]], torch.tensor(expected[leaf], dtype=adv.dtype))
        assert np.abs(expected[forest.leaves]).max() > 0  # the forest has mixed trees: a real check
    else:
        expected = segment(forest)
        for i, leaf in enumerate(leaves):
            # each turn's model tokens carry that turn node's credit
            want = np.concatenate(
                [np.full(forest.tok_end[u] - forest.tok_start[u], expected[u]) for u in forest.leaf_path(leaf)[1:]]
            )
            want = torch.tensor(want, dtype=adv.dtype)[mask[i][: want.size]]
            assert torch.allclose(adv[i][mask[i]], want)


def test_forest_rebuilt_exactly(forest):
    data, leaves = verl_batch(forest, seed=1)
    rewards = data.batch["token_level_rewards"].sum(-1).numpy()
    rebuilt, leaf_of_row, _ = forest_from_index(data.non_tensor_batch["uid"], rewards, [8] * len(leaves))
    assert rebuilt.num_nodes == forest.num_nodes and rebuilt.leaves.size == forest.leaves.size
    # the same trees: leaf rewards per rollout root and per tree agree, and so do the advantages
    assert np.allclose(tree_grpo(rebuilt)[leaf_of_row], tree_grpo(forest)[leaves])
    assert sorted(rebuilt.subtree_leaf_counts()[rebuilt.roots]) == sorted(forest.subtree_leaf_counts()[forest.roots])
    assert sorted(rebuilt.depth[rebuilt.leaves]) == sorted(forest.depth[forest.leaves])
    assert np.allclose(segment(rebuilt)[leaf_of_row], segment(forest)[leaves])
    assert rebuilt.effective_ratio() == pytest.approx(forest.effective_ratio())


def test_plain_uids_give_grpo(forest):
    """A plain verl batch (uid = prompt, no tree): tree_grpo is GRPO with the population std."""
    register_estimators()
    data, leaves = verl_batch(forest, field="trace_uid")  # uid: the prompt only
    out = compute_advantage(data, adv_estimator="tree_grpo", config=AlgoConfig(adv_estimator="tree_grpo"))
    expected = grpo(forest)
    for i, leaf in enumerate(leaves):
        row = out.batch["advantages"][i][out.batch["response_mask"][i].bool()]
        assert torch.allclose(row, torch.tensor(expected[leaf], dtype=row.dtype))


def test_adopt_tree_uids(forest):
    """verl's trainer keeps one uid per prompt; the TRACE uids come in `trace_uid` and are adopted."""
    register_estimators()
    data, leaves = verl_batch(forest, field="trace_uid")
    data = adopt_tree_uids(data)
    assert "verl_uid" in data.non_tensor_batch
    out = compute_advantage(data, adv_estimator="tree_grpo", config=AlgoConfig(adv_estimator="tree_grpo"))
    expected = tree_grpo(forest)
    for i, leaf in enumerate(leaves):
        row = out.batch["advantages"][i][out.batch["response_mask"][i].bool()]
        assert torch.allclose(row, torch.tensor(expected[leaf], dtype=row.dtype))


def test_install_hook_adopts_uids(forest, monkeypatch):
    from verl.trainer.ppo import ray_trainer

    from trace_core.integrations.verl.advantage import install_tree_uid_hook

    register_estimators()
    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)
    install_tree_uid_hook()
    install_tree_uid_hook()  # idempotent
    data, leaves = verl_batch(forest, field="trace_uid")
    out = ray_trainer.compute_advantage(data, adv_estimator="tree_grpo", config=AlgoConfig(adv_estimator="tree_grpo"))
    expected = tree_grpo(forest)
    i = 0
    row = out.batch["advantages"][i][out.batch["response_mask"][i].bool()]
    assert torch.allclose(row, torch.tensor(expected[leaves[i]], dtype=row.dtype))


def test_bad_rows_name_the_row(forest):
    with pytest.raises(ForestError, match=r"index\[1\]"):
        forest_from_index(["g#trace:1.2:3.5", "g#trace:1:3"], [1.0, 0.0], [8, 8])  # row 1 ends inside row 0
    with pytest.raises(ForestError, match="malformed"):
        forest_from_index(["g#trace:1.x:3"], [1.0], [8])
    register_estimators()
    data, _ = verl_batch(forest)
    data.batch["token_level_rewards"] *= 3
    config = AlgoConfig(adv_estimator="tree_grpo")
    with pytest.raises(ForestError, match=r"\[0, 1\]"):
        compute_advantage(data, adv_estimator="tree_grpo", config=config)
