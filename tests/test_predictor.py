"""Success predictor: learns a synthetic target, calibration metrics, gathering, checkpoints."""

import io
import itertools

import numpy as np
import pytest
import torch

from trace_core.packing.forest import pack
from trace_core.predictor import (
    EncoderPredictor,
    MLPHeadPredictor,
    PredictorConfig,
    PrefixBatch,
    auc,
    calibration,
    prefix_batch,
    training_targets,
)
from trace_core.synthetic_forest import synthetic_forest

H = 16


def synthetic_nodes(rng, k):
    """Prefixes whose true success probability is a logistic function of one hidden direction,
    and whose observed target is the success rate of 8 rollouts (noisy, like a subtree)."""
    hidden = rng.normal(size=(k, H)).astype(np.float32)
    p_true = 1 / (1 + np.exp(-3 * hidden[:, 0]))
    depth = rng.integers(0, 5, k)
    batch = PrefixBatch(
        depth=torch.as_tensor(depth),
        prefix_len=torch.as_tensor(rng.integers(5, 500, k)),
        hidden=torch.as_tensor(hidden),
    )
    observed = rng.binomial(8, p_true) / 8.0
    return batch, p_true, observed


def test_mlp_predictor_learns_a_synthetic_target():
    rng = np.random.default_rng(0)
    predictor = MLPHeadPredictor(H, PredictorConfig(hidden_dim=32, lr=3e-3, updates_per_step=20, warmup_nodes=1000))
    assert not predictor.ready
    for _ in range(15):
        batch, _, observed = synthetic_nodes(rng, 200)
        predictor.observe(batch, observed, np.full(200, 8.0))
    assert predictor.ready and predictor.nodes_seen == 3000
    test, p_true, _ = synthetic_nodes(rng, 2000)
    pred = predictor.predict(test)
    brier = np.mean((pred - p_true) ** 2)
    brier_constant = np.mean((p_true.mean() - p_true) ** 2)
    assert brier < 0.2 * brier_constant, (brier, brier_constant)
    assert ((pred > 0) & (pred < 1)).all()


def test_encoder_predictor_learns_from_tokens():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=12,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    encoder = transformers.LlamaModel(config)
    predictor = EncoderPredictor(encoder, PredictorConfig(hidden_dim=32, lr=3e-3, updates_per_step=10, batch_size=64))
    rng = np.random.default_rng(1)

    def data(k):  # success iff the prefix contains token 7
        tokens = [rng.integers(1, 12, rng.integers(3, 9)) for _ in range(k)]
        target = np.array([float(7 in t) for t in tokens])
        batch = PrefixBatch(
            depth=torch.ones(k, dtype=torch.long),
            prefix_len=torch.as_tensor([t.size for t in tokens]),
            token_ids=tokens,
        )
        return batch, target

    test, target = data(200)
    before = np.mean((predictor.predict(test) - target) ** 2)
    for _ in range(12):
        predictor.observe(*data(64), np.ones(64))
    after = np.mean((predictor.predict(test) - target) ** 2)
    assert after < 0.5 * before and after < 0.5 * np.mean((target.mean() - target) ** 2)
    with pytest.raises(ValueError, match="token_ids: the encoder predictor needs prefix tokens"):
        predictor.predict(PrefixBatch(depth=torch.ones(1), prefix_len=torch.ones(1)))


def test_checkpoint_round_trip_resumes_identically():
    rng = np.random.default_rng(2)
    cfg = PredictorConfig(hidden_dim=16, updates_per_step=3, replay_steps=2)
    a = MLPHeadPredictor(H, cfg)
    steps = [synthetic_nodes(rng, 50) for _ in range(4)]
    for batch, _, observed in steps[:2]:
        a.observe(batch, observed, np.ones(50))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = MLPHeadPredictor(H, cfg)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    for batch, _, observed in steps[2:]:  # same data after the checkpoint: same training trajectory
        assert a.observe(batch, observed, np.ones(50)) == b.observe(batch, observed, np.ones(50))
    np.testing.assert_array_equal(a.predict(steps[0][0]), b.predict(steps[0][0]))
    assert a.nodes_seen == b.nodes_seen == 200


def test_observe_rejects_bad_targets():
    p = MLPHeadPredictor(H, PredictorConfig(hidden_dim=8))
    batch, _, observed = synthetic_nodes(np.random.default_rng(3), 4)
    with pytest.raises(ValueError, match="targets: success rates must be finite and in"):
        p.observe(batch, np.array([0.5, np.nan, 0.1, 0.2]), np.ones(4))
    with pytest.raises(ValueError, match="targets/weights: expected shape"):
        p.observe(batch, observed[:3], np.ones(4))
    with pytest.raises(ValueError, match="weights: must be finite"):
        p.observe(batch, observed, -np.ones(4))
    with pytest.raises(ValueError, match="hidden: the MLP head predictor needs"):
        p.predict(PrefixBatch(depth=torch.ones(1), prefix_len=torch.ones(1)))
    with pytest.raises(ValueError, match="predictor.batch_size: must be >= 1"):
        PredictorConfig(batch_size=0)


def test_prefix_batch_reads_the_last_prefix_token():
    forest = synthetic_forest(np.random.default_rng(4), num_prompts=2, rollouts=2, turns=3, continuations=1)
    packed = pack(forest)
    hidden = torch.arange(packed.num_tokens, dtype=torch.float32)[:, None].repeat(1, 3)  # row id as value
    nodes, targets, weights = training_targets(forest)
    batch = prefix_batch(forest, packed, nodes, hidden, with_tokens=True)
    for k, u in enumerate(nodes):
        path = forest.leaf_path(u)
        prefix = np.concatenate([forest.node_tokens(v) for v in path])
        assert batch.prefix_len[k] == prefix.size
        np.testing.assert_array_equal(batch.token_ids[k], prefix)
        assert batch.hidden[k, 0] == packed.node_end[u] - 1
        assert packed.input_ids[int(batch.hidden[k, 0])] == prefix[-1]
        assert batch.depth[k] == forest.depth[u]
    # targets: every root and internal node, weighted by its leaves
    assert set(nodes.tolist()) == set(np.flatnonzero(forest.num_children > 0).tolist())
    np.testing.assert_array_equal(weights, forest.subtree_leaf_counts()[nodes])
    np.testing.assert_array_equal(targets, forest.subtree_success_rates()[nodes])


def test_auc_matches_pair_counting():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    wins = 0.0
    pairs = 0
    for i, j in itertools.product(np.flatnonzero(labels), np.flatnonzero(~labels)):
        pairs += 1
        wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    assert auc(scores, labels) == pytest.approx(wins / pairs)
    assert np.isnan(auc(scores, np.ones(60, bool)))


def test_calibration_reports_brier_against_the_constant_predictor():
    target = np.array([0.0, 0.5, 1.0, 1.0])
    weight = np.array([1.0, 2.0, 1.0, 4.0])
    m = calibration(target, target, weight, mixed=np.array([0, 1, 0, 0], bool), contrast=np.array([0, 0.25, 0, 0]))
    assert m["brier"] == 0.0 and m["auc_mixed"] == 1.0
    const = (weight * target).sum() / weight.sum()
    assert m["brier_constant"] == pytest.approx((weight * (const - target) ** 2).sum() / weight.sum())
