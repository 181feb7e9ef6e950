"""Batched sampling: each row's distribution (temperature, top-p), greedy rows, recorded logprobs."""

import pytest
import torch

from trace_core.rollout.sampling import sample_tokens

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def draw(temperature: float, top_p: float, n: int = 40000, seed: int = 0):
    logits = LOGITS.repeat(n, 1)
    tokens, logprobs = sample_tokens(
        logits, torch.full((n,), temperature), torch.full((n,), top_p), torch.Generator().manual_seed(seed)
    )
    return tokens, logprobs


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.95)])
def test_rows_follow_the_tempered_nucleus_distribution(temperature, top_p):
    tokens, logprobs = draw(temperature, top_p)
    p = torch.softmax(LOGITS / temperature, -1)
    kept = (torch.cumsum(p, -1) - p) < top_p  # the nucleus: tokens whose mass before them is < top_p
    expected = torch.where(kept, p, torch.zeros_like(p))
    expected /= expected.sum()
    freq = torch.bincount(tokens, minlength=LOGITS.numel()).float() / tokens.numel()
    assert (freq[~kept] == 0).all()  # never outside the nucleus
    assert (freq - expected).abs().max() < 0.01  # 40k draws: a few standard errors at most
    # the recorded logprob is the tempered model's, before the nucleus cut
    torch.testing.assert_close(logprobs, torch.log(p)[tokens], rtol=0, atol=1e-6)


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])
    temperature, top_p = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.5, 1.0])
    tokens, logprobs = sample_tokens(logits, temperature, top_p, torch.Generator().manual_seed(1))
    assert tokens[:2].tolist() == [0, LOGITS.numel() - 1]
    torch.testing.assert_close(logprobs[:2], torch.log_softmax(LOGITS, -1)[[0, 0]], rtol=0, atol=1e-6)


def test_same_seed_same_tokens():
    assert torch.equal(draw(1.0, 1.0, n=64, seed=3)[0], draw(1.0, 1.0, n=64, seed=3)[0])
    assert torch.equal(draw(1.0, 0.9, n=64, seed=3)[0], draw(1.0, 0.9, n=64, seed=3)[0])
