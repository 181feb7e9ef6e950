"""The TRL adapter: SharedPrefixGRPOTrainer scores like TRL's GRPOTrainer and trains the same.

Offline and on CPU: a random-init tiny Qwen3 (trace_core.model.loading) and a word-level tokenizer; the
oracle is TRL's own `_get_per_token_logps_and_entropies` and TRL's own training step.
"""

import copy
import logging

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trace_core.integrations.trl_grpo import SharedPrefixGRPOTrainer  # noqa: E402
from trace_core.model.loading import tiny_causal_lm  # noqa: E402
from trace_core.model.word_tokenizer import build_word_tokenizer  # noqa: E402
from trace_core.packing.flat import shared_prefix_micro_batches  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


def tiny_setup(tmp_path, **config):
    tokenizer = build_word_tokenizer(WORDS)
    model = tiny_causal_lm(
        "qwen3", vocab_size=len(tokenizer), hidden_size=64, heads=4, kv_heads=2, intermediate_size=96
    ).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")  # TRL builds the reference model from this path (beta > 0)
    tokenizer.save_pretrained(tmp_path / "model")
    model.config._name_or_path = str(tmp_path / "model")
    prompts = [" ".join(WORDS[(7 * i + j) % 40] for j in range(2 + i % 5)) for i in range(8)]
    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        beta=0.04,
        temperature=0.9,
    )
    args.update(config)
    return model, tokenizer, prompts, trl.GRPOConfig(**args)


def make_trainer(cls, model, tokenizer, prompts, args):
    def reward(completions, **kwargs):
        return [float(c.count("w1")) - 0.01 * len(c.split()) for c in completions]

    return cls(
        model=model,
        reward_funcs=reward,
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
    )


def grpo_rows(tokenizer, prompts, completions: int = 3, seed: int = 0):
    """TRL's layout: left-padded prompt ids, right-padded completion ids -> ids, mask, logits_to_keep."""
    gen = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts for _ in range(completions)]
    completion_ids = [
        torch.randint(5, len(tokenizer), (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        for _ in prompt_ids
    ]
    P, C = max(map(len, prompt_ids)), max(map(len, completion_ids))
    ids = torch.full((len(prompt_ids), P + C), pad)
    mask = torch.zeros_like(ids)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[b, P - len(p) : P], ids[b, P : P + len(c)] = torch.tensor(p), torch.tensor(c)
        mask[b, P - len(p) : P + len(c)] = 1
    return ids, mask, C


def test_scoring_and_gradients_match_trl(tmp_path):
    model, tokenizer, prompts, args = tiny_setup(tmp_path)
    trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
    ids, mask, keep = grpo_rows(tokenizer, prompts[:3])
    advantages = torch.randn(ids.shape[0], keep, generator=torch.Generator().manual_seed(1))

    def scored(score):
        trainer.model.zero_grad()
        logps, entropies, aux = score(trainer, trainer.model, ids, mask, keep, compute_entropy=True)
        assert aux is None and logps.shape == entropies.shape == (ids.shape[0], keep)
        ((advantages * logps).sum() + 0.1 * entropies.sum()).backward()
        return logps.detach(), entropies.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    calls = trainer.shared_prefix_calls
    ours = scored(SharedPrefixGRPOTrainer._get_per_token_logps_and_entropies)
    assert trainer.shared_prefix_calls == calls + 1  # the packed path ran, not the fallback
    theirs = scored(trl.GRPOTrainer._get_per_token_logps_and_entropies)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-4)
    for name, grad in ours[2].items():
        scale = max(1.0, theirs[2][name].abs().max().item())
        torch.testing.assert_close(grad, theirs[2][name], rtol=1e-4, atol=1e-4 * scale, msg=name)

    # TRL's memory chunking (batch_size=2 rows): packed passes of at most 2 x width tokens instead,
    # rows in token order; same values, in the caller's row order
    budget_batches = shared_prefix_micro_batches(ids, mask, max_tokens=2 * ids.shape[1])
    assert 1 < len(budget_batches) < -(-ids.shape[0] // 2)  # fewer passes than TRL's 2-row chunks
    calls = trainer.shared_prefix_calls
    with torch.no_grad():
        chunked = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, batch_size=2)[0]
    assert trainer.shared_prefix_calls == calls + len(budget_batches)
    torch.testing.assert_close(chunked, ours[0], rtol=0, atol=1e-5)


def test_one_training_step_matches_stock_trl(tmp_path):
    """Same seed, same model: the step's loss, gradient norm and updated weights equal stock TRL's.
    Plain SGD, so the weights compare the gradients (Adam's first step is lr x sign(grad), which
    turns rounding noise on near-zero gradients into lr-sized differences)."""
    model, tokenizer, prompts, args = tiny_setup(tmp_path, optim="sgd", learning_rate=0.5, gradient_checkpointing=True)
    results = []
    for cls in (trl.GRPOTrainer, SharedPrefixGRPOTrainer):
        trainer = make_trainer(cls, copy.deepcopy(model), tokenizer, prompts, args)
        trainer.train()
        results.append((trainer.state.log_history[0], dict(trainer.model.named_parameters()), trainer))
    (stock_log, stock_params, _), (ours_log, ours_params, ours) = results
    assert ours.shared_prefix_calls >= 2  # reference-model scoring and the training forward
    for key in ("loss", "kl", "entropy", "grad_norm"):
        assert ours_log[key] == pytest.approx(stock_log[key], abs=1e-5), key
    changed = 0
    for name, param in ours_params.items():
        torch.testing.assert_close(param, stock_params[name], rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(param, model.get_parameter(name))
    assert changed > 0  # the step really updated the weights


def test_falls_back_with_a_warning_where_packing_does_not_apply(tmp_path, caplog):
    """Gemma-style logit soft-capping is not in the fused op: TRL's own scoring runs, and says so.
    (A LoRA on the lm_head, the other model-side case, is refused by TRL's own constructor.)"""
    model, tokenizer, prompts, args = tiny_setup(tmp_path)
    model.config.final_logit_softcapping = 5.0
    trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
    ids, mask, keep = grpo_rows(tokenizer, prompts[:2])
    calls = trainer.shared_prefix_calls
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
        want = trl.GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep)
    assert "logit soft-capping or scaling; scoring with TRL's per-row forward instead" in caplog.text
    assert trainer.shared_prefix_calls == calls
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


def test_an_lm_head_adapter_blocks_the_packed_path(tmp_path):
    """TRL's constructor refuses a LoRA on the lm_head; a model that has one anyway (e.g. handed to
    the scoring directly) is still kept off the packed path, which reads lm_head.weight."""
    peft = pytest.importorskip("peft")
    model, tokenizer, prompts, args = tiny_setup(tmp_path)
    trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
    assert trainer._shared_prefix_blocker(trainer.model, False, {}) is None
    with_head = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    assert trainer._shared_prefix_blocker(with_head, False, {}) == "a PEFT adapter on the lm_head"


def test_trl_defaults_gradient_checkpointing_and_fp32_lm_head(tmp_path):
    """TRL turns gradient checkpointing on by default; cast_lm_head_to_fp32 makes the head fp32.
    Scoring and gradients still equal TRL's, through the packed path."""
    model, tokenizer, prompts, args = tiny_setup(tmp_path, gradient_checkpointing=True, cast_lm_head_to_fp32=True)
    trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
    trainer.model.gradient_checkpointing_enable()  # what Trainer.train does with the flag set
    trainer.model.train()  # checkpointing only acts in training mode
    assert trainer.model.model.gradient_checkpointing
    ids, mask, keep = grpo_rows(tokenizer, prompts[:3], seed=4)
    results = []
    for score in (
        SharedPrefixGRPOTrainer._get_per_token_logps_and_entropies,
        trl.GRPOTrainer._get_per_token_logps_and_entropies,
    ):
        trainer.model.zero_grad()
        logps, entropies, _ = score(trainer, trainer.model, ids, mask, keep, compute_entropy=True)
        (logps.sum() + entropies.sum()).backward()
        results.append((logps.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()])))
    assert trainer.shared_prefix_calls == 1
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_error_is_trls_own(tmp_path, device):
    """bf16=True (autocast over fp32 weights): our logprobs are as close to the fp32 values as TRL's
    own bf16 scoring is (CPU: measured 2.2-2.9e-3 vs 2.1-2.4e-3 max abs on this model). On CUDA both
    sides run their Triton kernels."""
    ids = mask = keep = None
    scored = {}
    for bf16 in (False, True):
        model, tokenizer, prompts, args = tiny_setup(tmp_path / str(bf16), bf16=bf16, use_cpu=device == "cpu")
        trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
        assert trainer.model.device.type == device
        if ids is None:
            ids, mask, keep = (x.to(device) if torch.is_tensor(x) else x for x in grpo_rows(tokenizer, prompts[:3]))
        with torch.no_grad():
            for name, score in (
                ("ours", SharedPrefixGRPOTrainer._get_per_token_logps_and_entropies),
                ("trl", trl.GRPOTrainer._get_per_token_logps_and_entropies),
            ):
                scored[bf16, name] = score(trainer, trainer.model, ids, mask, keep)[0].float().cpu()
    truth = scored[False, "trl"]
    torch.testing.assert_close(scored[False, "ours"], truth, rtol=0, atol=1e-4)
    ours, theirs = ((scored[True, name] - truth).abs().max().item() for name in ("ours", "trl"))
    assert theirs > 0 and ours <= 2 * theirs, (ours, theirs)


def test_peft_model_scores_like_trl(tmp_path):
    """GRPOTrainer(peft_config=LoRA): the packed scoring runs the adapters (policy) and disables them
    for the reference logprobs exactly as TRL's own scoring does."""
    peft = pytest.importorskip("peft")
    model, tokenizer, prompts, args = tiny_setup(tmp_path)
    trainer = SharedPrefixGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert hasattr(trainer.model, "peft_config")
    ids, mask, keep = grpo_rows(tokenizer, prompts[:3], seed=6)
    results = []
    for score in (
        SharedPrefixGRPOTrainer._get_per_token_logps_and_entropies,
        trl.GRPOTrainer._get_per_token_logps_and_entropies,
    ):
        trainer.model.zero_grad()
        logps = score(trainer, trainer.model, ids, mask, keep)[0]
        logps.sum().backward()
        with torch.no_grad(), trainer.model.disable_adapter():
            reference = score(trainer, trainer.model, ids, mask, keep)[0]
        grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])
        results.append((logps.detach(), reference, grads))
    assert trainer.shared_prefix_calls == 2
    assert (results[0][0] - results[0][1]).abs().max() > 1e-3  # the adapters matter
    for ours, theirs in zip(results[0], results[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_ddp_and_fsdp2_keep_the_packed_path(tmp_path):
    """In a one-process gloo group: DDP- and FSDP2-wrapped policies keep the packed path (their
    gradients are checked in tests/test_distributed.py); another wrapper accelerate knows falls back."""
    import torch.distributed as dist
    from test_distributed import free_port
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, tokenizer, prompts, args = tiny_setup(tmp_path)
    trainer = make_trainer(SharedPrefixGRPOTrainer, model, tokenizer, prompts, args)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(trainer.model))
        assert trainer._shared_prefix_blocker(ddp, False, {}) is None
        sharded = fully_shard(copy.deepcopy(trainer.model), mesh=init_device_mesh("cpu", (1,)))
        assert trainer._shared_prefix_blocker(sharded, False, {}) is None
    finally:
        dist.destroy_process_group()

    class OtherWrapper(torch.nn.Module):  # stands in for FSDP1 / DeepSpeedEngine, which accelerate unwraps
        def __init__(self, module):
            super().__init__()
            self.module = module

    trainer.accelerator.unwrap_model = lambda wrapped, **kw: (
        wrapped.module if isinstance(wrapped, OtherWrapper) else wrapped
    )
    assert (
        trainer._shared_prefix_blocker(OtherWrapper(trainer.model), False, {})
        == "a distributed wrapper other than DDP and FSDP2 (FSDP1, DeepSpeed)"
    )
