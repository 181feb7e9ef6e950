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
    hashed_ngrams,
    prefix_batch,
    token_predictor,
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
    tokens = [rng.integers(0, 50, rng.integers(5, 40)) for _ in range(k)]  # unrelated to the target
    batch = PrefixBatch(
        depth=torch.as_tensor(depth),
        prefix_len=torch.as_tensor([t.size for t in tokens]),
        hidden=torch.as_tensor(hidden),
        token_ids=tokens,
    )
    observed = rng.binomial(8, p_true) / 8.0
    return batch, p_true, observed


def test_mlp_predictor_learns_a_synthetic_target():
    rng = np.random.default_rng(0)
    cfg = PredictorConfig(hidden_dim=32, lr=3e-3, updates_per_step=20, warmup_nodes=1000, ngram_buckets=0)
    predictor = MLPHeadPredictor(H, cfg)  # the hidden state alone (the tokens here are noise)
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
        p.predict(PrefixBatch(depth=torch.ones(1), prefix_len=torch.ones(1), token_ids=[np.ones(2, np.int64)]))
    with pytest.raises(ValueError, match="token_ids: the MLP head with predictor.ngram_buckets > 0 needs"):
        p.predict(PrefixBatch(depth=torch.ones(1), prefix_len=torch.ones(1), hidden=torch.ones(1, H)))
    with pytest.raises(ValueError, match="predictor.batch_size: must be >= 1"):
        PredictorConfig(batch_size=0)
    with pytest.raises(ValueError, match="predictor.ngram_buckets: must be >= 0"):
        PredictorConfig(ngram_buckets=-1)
    with pytest.raises(ValueError, match="predictor.ngram_order: must be >= 1"):
        PredictorConfig(ngram_order=0)
    with pytest.raises(ValueError, match="hidden_size: 0 .* needs n-gram features"):
        MLPHeadPredictor(0, PredictorConfig(ngram_buckets=0))
    with pytest.raises(ValueError, match="predictor.ngram_buckets: the token predictor reads n-grams only"):
        token_predictor(None, PredictorConfig(ngram_buckets=0))


def test_hashed_ngrams_count_each_ngram_once_per_occurrence():
    bag = hashed_ngrams(np.array([1, 2, 1, 2]), buckets=1 << 20, order=2)
    # unigrams 1 (x2), 2 (x2); bigrams (1,2) (x2), (2,1) (x1): four distinct buckets at this size
    assert sorted(np.expm1(bag[:, 1]).round().astype(int).tolist()) == [1, 2, 2, 2]
    assert ((bag[:, 0] >= 0) & (bag[:, 0] < 1 << 20)).all() and bag[:, 0].dtype == np.float64
    np.testing.assert_array_equal(bag, hashed_ngrams(np.array([1, 2, 1, 2]), buckets=1 << 20, order=2))
    unigrams = hashed_ngrams(np.array([1, 2, 1, 2]), buckets=1 << 20, order=1)
    assert np.expm1(unigrams[:, 1]).round().tolist() == [2, 2]
    assert set(unigrams[:, 0]) < set(bag[:, 0])  # the unigram buckets do not depend on the order
    assert hashed_ngrams(np.array([5]), buckets=7, order=3).shape == (1, 2)  # shorter than the order
    assert hashed_ngrams(np.zeros(0, np.int64), buckets=7, order=2).shape == (0, 2)
    small = hashed_ngrams(np.arange(100), buckets=7, order=2)
    assert ((small[:, 0] >= 0) & (small[:, 0] < 7)).all() and np.expm1(small[:, 1]).round().sum() == 199


@pytest.mark.parametrize("hidden_size", [0, H])
def test_ngram_head_learns_what_only_token_order_tells(hidden_size):
    """Success iff token 3 comes right before token 4: every prefix holds both tokens, so a bag of
    single tokens cannot tell; the bigrams can. The hidden state (when given) is noise."""
    rng = np.random.default_rng(5)

    def data(k):
        tokens, target = [], np.zeros(k)
        for i in range(k):
            body = list(rng.integers(5, 30, rng.integers(4, 12)))
            pair = [3, 4] if rng.random() < 0.5 else [4, 3]
            target[i] = pair == [3, 4]
            cut = int(rng.integers(0, len(body) + 1))
            tokens.append(np.array(body[:cut] + pair + body[cut:]))
        batch = PrefixBatch(
            depth=torch.ones(k, dtype=torch.long),
            prefix_len=torch.as_tensor([t.size for t in tokens]),
            hidden=torch.as_tensor(rng.normal(size=(k, hidden_size)), dtype=torch.float32),
            token_ids=tokens,
        )
        return batch, target

    def brier_after_training(order):
        cfg = PredictorConfig(hidden_dim=32, lr=3e-3, updates_per_step=20, batch_size=128, ngram_order=order)
        predictor = MLPHeadPredictor(hidden_size, cfg)
        for _ in range(15):
            predictor.observe(*data(128), np.ones(128))
        test, target = data(500)
        return np.mean((predictor.predict(test) - target) ** 2)

    assert brier_after_training(2) < 0.05 < 0.2 < brier_after_training(1)  # the constant scores 0.25


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
