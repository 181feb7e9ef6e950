"""The contract of the training path: on a real model, the packed-tree loss (tree attention, one
pass, fused linear_logprob over the label pairs) and its gradients equal the loss over flattened
leaf sequences run with stock HF attention and a dense log-softmax.

Everything runs on the model's device: the tiny Qwen3 (Triton path) sits on DEVICE, so on a GPU
machine it runs the compiled kernels; SmolLM2 (reference path) stays on the CPU."""

import numpy as np
import pytest
import torch

from trace_core.advantage import LEAF, NODE, segment, tree_grpo
from trace_core.loss import gather_token_logprobs, leaf_path_policy_loss, packed_loss_weights, packed_policy_loss
from trace_core.model.loading import load_smollm2, tiny_causal_lm
from trace_core.model.tree_forward import tree_forward
from trace_core.packing.forest import pack, unpack
from trace_core.synthetic_forest import synthetic_forest
from trace_kernels import linear_logprob

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[L] logprob of each token given the ones before it (0 for the first, which nothing predicts)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, ids[1:, None])[:, 0]
    return torch.cat([lp.new_zeros(1), lp])


def losses_and_grads(model, forest, adv, kind, backend, seed=0):
    packed = pack(forest)
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    leaf_ids = [torch.as_tensor(ids, device=device) for ids in unpack(packed)]
    with torch.no_grad():  # behaviour policy = current model plus noise, so some ratios clip
        per_leaf_now = [next_token_logprobs(model(ids[None]).logits[0], ids) for ids in leaf_ids]
    gen = torch.Generator().manual_seed(seed)
    old = torch.zeros(packed.num_tokens, device=device)
    offsets, index = packed.leaf_token_index()
    for k, lp in enumerate(per_leaf_now):
        old[torch.as_tensor(index[offsets[k] : offsets[k + 1]], device=device)] = lp
    old = old + 0.3 * torch.randn(packed.num_tokens, generator=gen).to(device)
    ref = old + 0.1 * torch.randn(packed.num_tokens, generator=gen).to(device)
    weights = packed_loss_weights(forest, packed, adv, kind)
    pos, neg, kl_w = weights.to_torch(device)

    hidden = tree_forward(model, packed, backend=backend)
    pair_lp = linear_logprob(
        hidden,
        model.lm_head.weight,
        torch.as_tensor(packed.label_rows, device=device),
        torch.as_tensor(packed.labels, device=device),
        backend=backend,
    )
    token_lp = gather_token_logprobs(pair_lp, packed)
    packed_loss, _ = packed_policy_loss(token_lp, old, pos, neg, kl_w, ref_logprobs=ref, kl_coef=0.05)
    packed_grads = torch.autograd.grad(packed_loss, params)

    if kind == LEAF:
        leaf_adv = [
            torch.full((ids.numel(),), float(adv[leaf]), device=device)
            for leaf, ids in zip(packed.leaf_nodes, leaf_ids)
        ]
    else:
        leaf_adv = [
            torch.as_tensor(adv[nodes], dtype=torch.float32, device=device)
            for nodes in unpack(packed, packed.node_of_token)
        ]
    flat_lp = [next_token_logprobs(model(ids[None]).logits[0], ids) for ids in leaf_ids]  # stock attention
    flat_loss = leaf_path_policy_loss(
        flat_lp,
        unpack(packed, old),
        leaf_adv,
        unpack(packed, torch.as_tensor(packed.loss_mask, device=device)),
        ref_logprobs=unpack(packed, ref),
        kl_coef=0.05,
    )
    flat_grads = torch.autograd.grad(flat_loss, params)
    return packed_loss, flat_loss, packed_grads, flat_grads


def assert_same(packed_loss, flat_loss, packed_grads, flat_grads, model):
    assert abs(packed_loss.item() - flat_loss.item()) <= 1e-4 * abs(flat_loss.item()) + 1e-7
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    nonzero = 0
    for name, gp, gf in zip(names, packed_grads, flat_grads):
        scale = gf.norm().item()
        assert (gp - gf).norm().item() <= 1e-4 * scale + 1e-8, name
        nonzero += scale > 0
    assert nonzero >= len(names) // 2  # the loss really reaches the parameters


def small_forest(vocab_size, seed):
    return synthetic_forest(
        np.random.default_rng(seed),
        num_prompts=2,
        rollouts=2,
        turns=3,
        continuations=2,
        prompt_tokens=(3, 6),
        model_tokens=(1, 4),
        observation_tokens=(0, 3),
        vocab_size=vocab_size,
    )


@pytest.mark.parametrize("estimator", ["tree_grpo", "segment"])
@pytest.mark.slow  # 29 s (tree_grpo) + 8 s (segment) on 2 cores
def test_tiny_qwen3_triton_tree_attention(estimator):
    model = tiny_causal_lm("qwen3", vocab_size=96, hidden_size=64, heads=4, kv_heads=2, layers=2).to(DEVICE)
    forest = small_forest(96, seed=1)
    adv, kind = (tree_grpo(forest), LEAF) if estimator == "tree_grpo" else (segment(forest), NODE)
    assert_same(*losses_and_grads(model, forest, adv, kind, backend=None), model)  # Triton (interpreted on CPU)


@pytest.mark.slow  # SmolLM2: 55 s on 2 cores
def test_smollm2_reference_tree_attention():
    model, _ = load_smollm2(torch.float32)
    forest = small_forest(model.config.vocab_size, seed=2)
    assert_same(*losses_and_grads(model, forest, tree_grpo(forest), LEAF, backend="cpu"), model)
