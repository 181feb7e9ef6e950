"""shared_prefix_logprobs equals the per-sequence logprob computation of flat-batch trainers.

The oracle is what verl / TRL do: run the padded batch through the model with its stock attention
(position ids from the mask), log-softmax the logits and gather the next tokens. Compared: logprobs,
entropies and parameter gradients, on GRPO-shaped batches (left-padded prompts, each repeated for
several right-padded completions).
"""

import numpy as np
import pytest
import torch

from trace_core.integrations.shared_prefix import shared_prefix_logprobs
from trace_core.model.loading import load_smollm2, tiny_causal_lm
from trace_core.packing.flat import pack_shared_prefixes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(family: str, vocab: int = 64, device: str = "cpu"):
    return (
        tiny_causal_lm(family, vocab_size=vocab, hidden_size=64, heads=4, kv_heads=2, intermediate_size=96)
        .float()
        .to(device)
    )


def grpo_batch(vocab: int, prompts: int = 2, completions: int = 3, seed: int = 0):
    """Prompts of different lengths left-padded, completions right-padded (verl's layout); the
    completions of a prompt sometimes share their first tokens."""
    rng = np.random.default_rng(seed)
    prompt_lens, completion_len = rng.integers(3, 8, prompts), 6
    width = int(prompt_lens.max()) + completion_len
    ids = np.zeros((prompts * completions, width), np.int64)
    mask = np.zeros_like(ids)
    for p, plen in enumerate(prompt_lens):
        prompt = rng.integers(1, vocab, plen)
        opening = rng.integers(1, vocab, 2)
        for c in range(completions):
            clen = int(rng.integers(1, completion_len + 1))
            completion = rng.integers(1, vocab, clen)
            if c % 2:
                completion[: min(2, clen)] = opening[: min(2, clen)]
            row, left = p * completions + c, width - completion_len - plen
            ids[row, left : left + plen] = prompt
            ids[row, left + plen : left + plen + clen] = completion
            mask[row, left : left + plen + clen] = 1
    return torch.as_tensor(ids), torch.as_tensor(mask)


def flat_logprobs(model, ids, mask, temperature=1.0):
    """verl / TRL: per-sequence forward over the padded batch, then log-softmax + gather."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1)
    token_logprobs = logp.gather(-1, ids[:, 1:, None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    predicted = (mask[:, 1:] * mask[:, :-1]).bool()
    pad = torch.zeros(ids.shape[0], 1)
    return (
        torch.cat([pad, torch.where(predicted, token_logprobs, 0.0)], 1),
        torch.cat([pad, torch.where(predicted, entropy, 0.0)], 1),
    )


def check_against_flat(model, ids, mask, backend, temperature=1.0, tol=1e-4):
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    got_lp, got_ent = shared_prefix_logprobs(
        model, ids, mask, temperature=temperature, return_entropy=True, backend=backend
    )
    with torch.no_grad():
        want_lp, want_ent = flat_logprobs(model, ids, mask, temperature)
    assert got_lp.shape == ids.shape and got_ent.shape == ids.shape
    assert (got_lp <= 0).all()
    assert (got_lp.cpu()[mask.cpu() == 0] == 0).all() and (got_lp.cpu()[:, 0] == 0).all()
    torch.testing.assert_close(got_lp.detach().cpu(), want_lp.cpu(), rtol=0, atol=tol)
    torch.testing.assert_close(got_ent.detach().cpu(), want_ent.cpu(), rtol=0, atol=tol)
    return got_lp, got_ent


@pytest.mark.slow  # 13 s on 2 cores
def test_qwen3_triton_matches_flat_logprobs_and_entropy():
    model = tiny_model("qwen3", device=DEVICE)
    ids, mask = grpo_batch(64)
    _lp, _ = check_against_flat(model, ids, mask, backend="triton", temperature=0.7)
    packed = pack_shared_prefixes(ids, mask)
    assert packed.token_saving > 1.5  # the batch really shares its prompts


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_path_matches_flat_logprobs(family):
    check_against_flat(tiny_model(family), *grpo_batch(64, seed=1), backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradients_match_flat_gradients(backend):
    """A GRPO-like loss (advantage x logprob + entropy bonus) has the same parameter gradients."""
    device = DEVICE if backend == "triton" else "cpu"
    model = tiny_model("qwen3", device=device)
    ids, mask = (x.to(device) for x in grpo_batch(64, seed=2))
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def loss(lp, ent):
        return -(advantages * lp).sum() - 0.01 * ent.sum()

    model.zero_grad()
    loss(*shared_prefix_logprobs(model, ids, mask, return_entropy=True, backend=backend)).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(*(x.to(device) for x in flat_logprobs(model, ids, mask))).backward()
    for name, param in model.named_parameters():
        scale = max(1.0, param.grad.abs().max().item())
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def test_reusing_the_pack_and_no_padding():
    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5, 6], [3, 4, 5, 7], [3, 4, 5, 6]])
    packed = pack_shared_prefixes(ids)
    assert packed.num_tokens == 5
    a = shared_prefix_logprobs(model, ids, packed=packed, backend="cpu")
    b = shared_prefix_logprobs(model, ids, torch.ones_like(ids), backend="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[2], rtol=0, atol=0)  # identical rows, identical values


def test_single_token_rows_give_zeros_with_a_gradient_path():
    model = tiny_model("llama")
    lp, ent = shared_prefix_logprobs(model, torch.tensor([[3], [4]]), return_entropy=True, backend="cpu")
    assert lp.shape == (2, 1) and (lp == 0).all() and (ent == 0).all()


def test_errors_name_the_argument():
    model = tiny_model("llama")
    ids = torch.tensor([[3, 4, 5], [3, 4, 6]])
    with pytest.raises(ValueError, match=r"packed: was built for a batch of shape \(2, 3\)"):
        shared_prefix_logprobs(model, ids[:, :2], packed=pack_shared_prefixes(ids))
    with pytest.raises(ValueError, match="model: has no output embeddings"):
        shared_prefix_logprobs(model.model, ids)
    with pytest.raises(ValueError, match=r"temperature"):
        shared_prefix_logprobs(model, ids, temperature=0.0, backend="cpu")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 64\)"):
        shared_prefix_logprobs(model, torch.tensor([[3, 99]]), backend="cpu")


def test_mask_with_a_hole_raises():
    # issue 19: the pad inside the row was scored and the row's last real token dropped
    model = tiny_model("llama")
    ids = torch.arange(1, 9)[None]
    with pytest.raises(ValueError, match="attention_mask: row 0 has padding between its tokens"):
        shared_prefix_logprobs(model, ids, torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1]]), backend="cpu")


@pytest.mark.slow  # SmolLM2: 8 s on 2 cores, plus its load
def test_smollm2_grpo_batch_matches_flat():
    """Real weights (Llama architecture, 30 layers, vocab 49152), reference attention path."""
    model = load_smollm2(torch.float32)[0]
    ids, mask = grpo_batch(model.config.vocab_size, prompts=2, completions=2, seed=3)
    check_against_flat(model, ids, mask, backend="cpu")


def test_peft_lora_model_matches_flat_and_rejects_an_lm_head_adapter():
    peft = pytest.importorskip("peft")
    config = dict(r=4, init_lora_weights=False)
    model = peft.get_peft_model(tiny_model("qwen3"), peft.LoraConfig(target_modules=["q_proj", "o_proj"], **config))
    check_against_flat(model, *grpo_batch(64, seed=5), backend="cpu")
    with_head = peft.get_peft_model(
        tiny_model("qwen3"), peft.LoraConfig(target_modules=["q_proj", "lm_head"], **config)
    )
    with pytest.raises(ValueError, match="model: the lm_head carries a PEFT adapter"):
        shared_prefix_logprobs(with_head, *grpo_batch(64), backend="cpu")


def test_torch_compiled_model_runs_its_original_module():
    """A torch.compile'd policy: the packed call runs the original module (nothing is compiled for
    the packed layout) and gives the flat values."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    compiled = torch.compile(model)
    frames = counters["frames"]["total"]
    got = shared_prefix_logprobs(compiled, *grpo_batch(64, seed=8), backend="cpu")
    assert counters["frames"]["total"] == frames  # dynamo traced nothing
    with torch.no_grad():
        want = flat_logprobs(model, *grpo_batch(64, seed=8))[0]
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-4)


def test_score_mask_scores_only_the_positions_asked_for(monkeypatch):
    """score_mask = the completion columns (what TRL / verl read): the same values and gradients
    there, zeros elsewhere, and the fused op gets only the pairs those positions use."""
    import trace_core.integrations.shared_prefix as shared_prefix

    pairs_scored = []
    original = shared_prefix.linear_logprob
    monkeypatch.setattr(
        shared_prefix,
        "linear_logprob",
        lambda hidden, weight, rows, labels, **kw: (
            pairs_scored.append(rows.numel()) or original(hidden, weight, rows, labels, **kw)
        ),
    )
    model = tiny_model("qwen3")
    ids, mask = grpo_batch(64, seed=9)
    completion = torch.zeros_like(mask, dtype=torch.bool)
    completion[:, -6:] = True
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2)) * completion

    results = []
    for score_mask in (None, completion):
        model.zero_grad()
        lp, ent = shared_prefix_logprobs(model, ids, mask, return_entropy=True, score_mask=score_mask, backend="cpu")
        ((advantages * lp).sum() + 0.1 * (ent * completion).sum()).backward()
        results.append((lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]))
    (full_lp, full_ent, full_grads), (lp, ent, grads) = results
    torch.testing.assert_close(lp, torch.where(completion, full_lp, 0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, torch.where(completion, full_ent, 0.0), rtol=0, atol=1e-6)
    for got, want in zip(grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    packed = pack_shared_prefixes(ids, mask)
    needed = np.unique(packed.pair_index[completion.numpy() & (packed.pair_index >= 0)]).size
    assert pairs_scored == [packed.labels.size, needed] and needed < packed.labels.size

    with pytest.raises(ValueError, match=r"score_mask: has shape \(6, 3\), expected"):
        shared_prefix_logprobs(model, ids, mask, score_mask=completion[:, :3], backend="cpu")
    with pytest.raises(TypeError, match="score_mask: must be boolean"):
        shared_prefix_logprobs(model, ids, mask, score_mask=completion.long(), backend="cpu")
