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


def exact_policy_loss(logprobs, old_logprobs, adv_pos, adv_neg, kl_weight, eps_low, eps_high, ref, kl_coef):
    """The formula as written before issue 19 (exp of the raw log-ratio): the oracle on normal inputs."""
    active = kl_weight > 0
    ratio = torch.exp(torch.where(active, logprobs - old_logprobs, torch.zeros_like(logprobs)))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = -(adv_pos * torch.minimum(ratio, clipped) + adv_neg * torch.maximum(ratio, clipped)).sum()
    delta = torch.where(active, ref - logprobs, torch.zeros_like(logprobs))
    return loss + kl_coef * (kl_weight * (torch.exp(delta) - delta - 1.0)).sum()


def random_weights(n, gen, dtype=torch.float64):
    """Per-token S+ >= 0, S- <= 0, W >= 0 as packed_loss_weights makes them (some tokens unweighted,
    some shared by positive and negative leaves)."""
    kl_w = torch.rand(n, generator=gen, dtype=dtype) * (torch.rand(n, generator=gen, dtype=dtype) > 0.2)
    pos = kl_w * torch.rand(n, generator=gen, dtype=dtype) * (torch.rand(n, generator=gen, dtype=dtype) > 0.3)
    neg = -kl_w * torch.rand(n, generator=gen, dtype=dtype) * (torch.rand(n, generator=gen, dtype=dtype) > 0.3)
    return pos, neg, kl_w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_surrogate_equals_the_exact_formula_on_normal_inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = 64
        old = -5 * torch.rand(n, generator=gen, dtype=dtype)
        spread = [0.05, 0.5, 3.0, 20.0][trial % 4]  # log-ratios inside, at and far beyond the clip range
        new = old + spread * torch.randn(n, generator=gen, dtype=dtype)
        new[:4] = old[:4] + torch.log(torch.tensor([0.8, 1.28, 1.0, 0.8], dtype=dtype))  # on the clip edges
        ref = old + torch.randn(n, generator=gen, dtype=dtype)
        pos, neg, kl_w = random_weights(n, gen, dtype)
        kl_coef = 0.1 * (trial % 2)
        args = dict(eps_low=0.2, eps_high=0.28)
        a = new.clone().requires_grad_(True)
        got, _ = packed_policy_loss(a, old, pos, neg, kl_w, ref_logprobs=ref, kl_coef=kl_coef, **args)
        got.backward()
        b = new.clone().requires_grad_(True)
        want = exact_policy_loss(b, old, pos, neg, kl_w, args["eps_low"], args["eps_high"], ref, kl_coef)
        want.backward()
        assert torch.equal(got, want), trial
        assert torch.equal(a.grad, b.grad), trial


@pytest.mark.parametrize("log_ratio", [89.0, 100.0, 1e4, 1e30])
def test_huge_log_ratio_gives_a_finite_loss_and_gradient(log_ratio):
    # issue 19: exp(log_ratio) = inf met a zero weight (0 x inf = NaN) or a negative advantage (inf)
    old = torch.tensor([-log_ratio, -1.0, -log_ratio, -log_ratio], dtype=torch.float32)
    pos = torch.tensor([0.5, 0.5, 0.0, 0.2])  # token 0: positive leaves only, so adv_neg = 0
    neg = torch.tensor([0.0, -0.5, -0.5, -0.3])  # tokens 2, 3: the unclipped branch of A < 0
    kl_w = torch.tensor([0.5, 1.0, 0.5, 0.5])
    new = torch.zeros(4, requires_grad=True)
    assert torch.isnan(exact_policy_loss(new, old, pos, neg, kl_w, 0.2, 0.28, new, 0.0)) or log_ratio < 89
    ref = torch.full((4,), -log_ratio)
    for kl_coef in (0.0, 0.1):
        loss, metrics = packed_policy_loss(new, old, pos, neg, kl_w, ref_logprobs=ref, kl_coef=kl_coef)
        (grad,) = torch.autograd.grad(loss, new)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())
        assert grad[0] == 0 or kl_coef  # clipped: a positive advantage beyond 1 + eps_high has no gradient
    far = torch.full((4,), -2 * log_ratio)  # the KL's log-ratio ref - logp is huge too
    loss, _ = packed_policy_loss(far, torch.zeros(4), pos, neg, kl_w, ref_logprobs=ref, kl_coef=1.0)
    assert torch.isfinite(loss)


def test_nan_old_logprobs_on_weighted_tokens_raise():
    # issue 19: a forest without recorded logprobs (NaN on model tokens) gave a silent NaN loss
    forest = RolloutForest()
    root = forest.add_root(0, [1, 2])
    forest.set_reward(forest.add_node(root, [3, 4], [True, False]), 1.0)  # logprobs not recorded
    forest.set_reward(forest.add_node(root, [5], [True], [-0.5]), 0.0)
    packed = pack(forest)
    assert np.isnan(packed.old_logprobs).any()
    pos, neg, kl_w = packed_loss_weights(forest, packed, tree_grpo(forest)).to_torch()
    old = torch.as_tensor(packed.old_logprobs)
    with pytest.raises(ValueError, match=r"old_logprobs: 1 token\(s\) that carry loss have a non-finite value") as e:
        packed_policy_loss(torch.full_like(old, -1.0), old, pos, neg, kl_w)
    assert "never recorded" in str(e.value)
    # NaN where nothing is weighted is ignored (here: the recorded leaf only)
    only = torch.where(torch.isnan(old), 0.0, kl_w)
    loss, _ = packed_policy_loss(torch.full_like(old, -1.0), old, pos * (only > 0), neg * (only > 0), only)
    assert torch.isfinite(loss)
    recorded = old.nan_to_num(-1.0)
    ref = recorded.clone()
    ref[int(torch.nonzero(kl_w)[0, 0])] = float("nan")
    with pytest.raises(ValueError, match="ref_logprobs: 1 token"):
        packed_policy_loss(recorded, recorded, pos, neg, kl_w, ref_logprobs=ref, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_weight: contains non-finite"):
        packed_policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([1, np.inf]))
