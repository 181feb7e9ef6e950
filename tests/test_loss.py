"""The packed loss equals the flattened per-leaf loss: values and gradients (algebra on random
forests here; on real models in test_loss_model.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forest_strategies import forests
from trace_core.advantage import LEAF, NODE, segment, tree_grpo
from trace_core.forest import ForestError, RolloutForest
from trace_core.loss import (
    gather_token_logprobs,
    leaf_path_policy_loss,
    leaf_weights,
    packed_loss_weights,
    packed_policy_loss,
)
from trace_core.packing.forest import pack, split_by_tokens, unpack
from trace_core.synthetic_forest import synthetic_forest


def per_leaf_advantages(forest, packed, adv, kind):
    """A_lt for every leaf path token: the leaf's value (LEAF) or the token's node value (NODE)."""
    if kind == LEAF:
        return [
            torch.full((ids.size,), adv[leaf], dtype=torch.float64)
            for leaf, ids in zip(packed.leaf_nodes, unpack(packed))
        ]
    return [torch.as_tensor(adv[nodes]) for nodes in unpack(packed, packed.node_of_token)]


def both_losses(forest, adv, kind, loss_agg, kl_coef, seed):
    packed = pack(forest)
    gen = torch.Generator().manual_seed(seed)
    old = torch.as_tensor(packed.old_logprobs, dtype=torch.float64)
    old = torch.nan_to_num(old, nan=-1.0)
    new = (old + 0.5 * torch.randn(packed.num_tokens, generator=gen, dtype=torch.float64)).clamp_max(0.0)
    ref = (old + 0.3 * torch.randn(packed.num_tokens, generator=gen, dtype=torch.float64)).clamp_max(0.0)
    new.requires_grad_(True)
    weights = packed_loss_weights(forest, packed, adv, kind, loss_agg=loss_agg)
    pos, neg, kl_w = weights.to_torch(dtype=torch.float64)
    packed_loss, _ = packed_policy_loss(new, old, pos, neg, kl_w, ref_logprobs=ref, kl_coef=kl_coef)
    (g_packed,) = torch.autograd.grad(packed_loss, new)
    flat_loss = leaf_path_policy_loss(
        unpack(packed, new),
        unpack(packed, old),
        per_leaf_advantages(forest, packed, adv, kind),
        unpack(packed, torch.as_tensor(packed.loss_mask)),
        loss_agg=loss_agg,
        ref_logprobs=unpack(packed, ref),
        kl_coef=kl_coef,
    )
    (g_flat,) = torch.autograd.grad(flat_loss, new)
    return packed_loss, flat_loss, g_packed, g_flat


@settings(max_examples=60, deadline=None)
@given(
    forests(),
    st.sampled_from([LEAF, NODE]),
    st.sampled_from(["token-mean", "seq-mean-token-mean"]),
    st.sampled_from([0.0, 0.1]),
    st.integers(0, 1000),
)
def test_packed_loss_and_grad_equal_flattened(forest, kind, loss_agg, kl_coef, seed):
    if not pack(forest).loss_mask.any():
        return  # nothing to train on: covered by test_errors
    rng = np.random.default_rng(seed)
    adv = rng.normal(size=forest.num_nodes) * (forest.num_children == 0 if kind == LEAF else 1)
    p, f, gp, gf = both_losses(forest, adv, kind, loss_agg, kl_coef, seed)
    torch.testing.assert_close(p, f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gp, gf, rtol=1e-10, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(forests(), st.integers(0, 1000))
def test_packed_loss_with_the_real_estimators(forest, seed):
    if not pack(forest).loss_mask.any():
        return
    for adv, kind in ((tree_grpo(forest), LEAF), (segment(forest), NODE)):
        p, f, gp, gf = both_losses(forest, adv, kind, "token-mean", 0.0, seed)
        torch.testing.assert_close(p, f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gp, gf, rtol=1e-10, atol=1e-12)


def test_observation_tokens_get_no_gradient_and_clipping_stops_gradient():
    f = RolloutForest()
    r = f.add_root(0, [1, 2])
    t1 = f.add_node(r, [3, 4, 5], [True, True, False], [-1.0, -1.0, 0.0])
    f.set_reward(f.add_node(t1, [6], [True], [-1.0]), 1.0)
    f.set_reward(f.add_node(t1, [7], [True], [-1.0]), 0.0)
    packed = pack(f)
    adv = tree_grpo(f)
    pos, neg, kl_w = packed_loss_weights(f, packed, adv).to_torch(dtype=torch.float64)
    old = torch.as_tensor(packed.old_logprobs, dtype=torch.float64)
    new = old.clone()
    new[3] += 1.0  # ratio e > 1 + eps_high on a token shared by a positive and a negative leaf
    new.requires_grad_(True)
    loss, metrics = packed_policy_loss(new, old, pos, neg, kl_w)
    loss.backward()
    assert new.grad[~torch.as_tensor(packed.loss_mask)].abs().max() == 0  # prompt and observation
    # shared token 3: A+ = +2 leaves' clipped min is flat, A- = max(r, clip r) = r keeps its gradient
    assert new.grad[3] != 0 and neg[3] < 0 and pos[3] > 0
    assert metrics["clip_fraction"] > 0


def test_gather_token_logprobs_places_pairs_on_their_targets():
    f = RolloutForest()
    r = f.add_root(0, [1, 2])
    f.add_node(r, [3], [True])
    f.add_node(r, [4, 5], [True, True])
    packed = pack(f)
    pairs = torch.arange(1.0, packed.label_pos.size + 1)
    tokens = gather_token_logprobs(pairs, packed)
    assert tokens.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ForestError, match="pair_logprobs: has shape"):
        gather_token_logprobs(torch.zeros(2), packed)


def test_errors():
    f = RolloutForest()
    r = f.add_root(0, [1])
    f.set_reward(f.add_node(r, [2], [False]), 1.0)  # a leaf path without model tokens
    packed = pack(f)
    with pytest.raises(ForestError, match="no leaf path has a model token"):
        packed_loss_weights(f, packed, np.zeros(2))
    g = RolloutForest()
    g.set_reward(g.add_node(g.add_root(0, [1]), [2], [True]), 1.0)
    packed = pack(g)
    with pytest.raises(ForestError, match=r"advantages: has shape \(3,\), expected \(2,\)"):
        packed_loss_weights(g, packed, np.zeros(3))
    with pytest.raises(ForestError, match="advantages: contains 1 non-finite"):
        packed_loss_weights(g, packed, np.array([0.0, np.nan]))
    with pytest.raises(ForestError, match="kind: must be"):
        packed_loss_weights(g, packed, np.zeros(2), "token")
    with pytest.raises(ForestError, match="loss_agg: unknown aggregation"):
        packed_loss_weights(g, packed, np.zeros(2), loss_agg="sum")
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=r"adv_pos: shape \(3,\) does not match logprobs \(2,\)"):
        packed_policy_loss(x, x, torch.zeros(3), x, x)
    with pytest.raises(ValueError, match="logprobs: contains non-finite"):
        packed_policy_loss(torch.tensor([0.0, float("nan")]), x, x, x, x)
    with pytest.raises(ValueError, match="logprobs: expected a 1-D"):
        packed_policy_loss(torch.zeros(2, 2), x, x, x, x)


def test_micro_batch_losses_add_up_to_the_full_loss():
    forest = synthetic_forest(np.random.default_rng(7), num_prompts=5, rollouts=2, turns=3, continuations=2)
    adv = tree_grpo(forest)
    full = pack(forest)
    w = leaf_weights(forest, full)

    def loss_of(packed, weights):
        old = torch.as_tensor(packed.old_logprobs, dtype=torch.float64)
        # the new logprob of a token depends only on which token it is, not on the batch it is in
        new = old + 0.3 * torch.sin(
            torch.as_tensor(packed.node_of_token * 7 + packed.position_ids, dtype=torch.float64)
        )
        return packed_policy_loss(new, old, *weights.to_torch(dtype=torch.float64))[0]

    total = loss_of(full, packed_loss_weights(forest, full, adv))
    batches = split_by_tokens(forest, full.num_tokens // 2)
    assert len(batches) >= 2
    micro = [pack(forest, roots=b) for b in batches]
    parts = sum(loss_of(p, packed_loss_weights(forest, p, adv, leaf_weight=w)) for p in micro)
    torch.testing.assert_close(parts, total, rtol=1e-10, atol=1e-12)
    local = sum(loss_of(p, packed_loss_weights(forest, p, adv)) for p in micro)  # per-batch normalisation
    assert not torch.allclose(local, total)
    with pytest.raises(ForestError, match="leaf_weight: has shape"):
        packed_loss_weights(forest, full, adv, leaf_weight=np.ones(3))
