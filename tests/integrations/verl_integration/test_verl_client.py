"""PagedTreeLLMClient against Hugging Face generate (needs `verl` for TokenOutput: scripts/setup_verl_env.sh)."""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (make its venv with scripts/setup_verl_env.sh)")

from trace_core.integrations.verl.client import PagedTreeLLMClient
from trace_core.model.loading import tiny_causal_lm


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("qwen3", seed=0).eval()


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_generate_and_the_prefix_cache_changes_nothing(model):
    prompts = [[5, 9, 3, 7, 1], [5, 9, 3, 7, 1, 8, 8], [2, 4]]
    greedy = {"temperature": 0, "top_p": 1.0, "top_k": -1, "max_tokens": 6}

    async def run():
        client = PagedTreeLLMClient(model, num_pages=64, eos_token_ids=(), decode_backend="cpu")
        first = await asyncio.gather(
            *(client.generate(f"r{i}", prompt_ids=p, sampling_params=greedy) for i, p in enumerate(prompts))
        )
        # a second turn: the previous prompt + response + new tokens (found in the cache), and a repeat
        follow = prompts[0] + first[0].token_ids + [3, 3]
        second = await asyncio.gather(
            client.generate("t2", prompt_ids=follow, sampling_params=greedy),
            client.generate("rep", prompt_ids=prompts[0], sampling_params=greedy),
        )
        return client, first, second, follow

    _client, first, second, follow = asyncio.run(run())
    for p, out in zip(prompts, first):
        assert out.token_ids == hf_greedy(model, p, 6)
        assert len(out.log_probs) == 6
    assert second[0].token_ids == hf_greedy(model, follow, 6)
    assert second[1].token_ids == first[0].token_ids
    assert second[0].extra_fields["cached_prompt_tokens"] == len(prompts[0]) + 5  # prompt + response[:-1]
    assert second[1].extra_fields["cached_prompt_tokens"] == len(prompts[0])


def test_sampled_logprobs_are_the_models(model):
    prompt = [1, 2, 3, 4]

    async def run():
        client = PagedTreeLLMClient(model, num_pages=64, eos_token_ids=(), decode_backend="cpu", seed=3)
        return await client.generate("s", prompt_ids=prompt, sampling_params={"temperature": 0.7, "max_tokens": 5})

    out = asyncio.run(run())
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.log_probs), want, atol=1e-4)


def test_small_cache_evicts_and_still_answers(model):
    async def run():
        client = PagedTreeLLMClient(model, num_pages=6, page_size=4, eos_token_ids=(), decode_backend="cpu")
        outs = []
        for i in range(6):  # each request caches ~2 pages; the pool of 6 forces evictions
            outs.append(
                await client.generate(
                    f"e{i}", prompt_ids=[i + 1] * 5, sampling_params={"temperature": 0, "max_tokens": 3}
                )
            )
        return client, outs

    client, outs = asyncio.run(run())
    assert [o.token_ids for o in outs] == [hf_greedy(model, [i + 1] * 5, 3) for i in range(6)]
    client.clear_cache()
    assert client.cache.free_pages == 6
