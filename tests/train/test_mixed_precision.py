"""model.dtype=bfloat16: bf16 compute (autocast) over fp32 master weights and optimizer state.

The toy trainer of test_trainer.py runs a step in well under a second on CPU, so the whole feature
is checked end to end: parameter / optimizer / KV-cache dtypes, sampler-trainer logprob agreement,
the small-update bug master weights fix, exact resume; plus the autocast-aware tree attention.
"""

import logging
import math

import numpy as np
import torch
from test_trainer import TOY, metrics, toy

from attention_cases import packed_forest, random_tree, same_dtype_attention
from trace_core.model.tree_forward import trace_tree_attention_forward
from trace_core.train.cli import main
from trace_core.train.trainer import Trainer
from trace_kernels.tree_attention.naive import tree_attention_reference

BF16 = "model.dtype=bfloat16"


def test_bf16_compute_keeps_fp32_master_weights_and_sampler_logprobs(tmp_path):
    trainer = Trainer(toy(tmp_path / "bf16", BF16, "steps=2"))
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    cache = trainer.engine.runner.cache
    assert {t.dtype for t in cache.k_pools + cache.v_pools} == {torch.bfloat16}
    rows = [trainer.train_step() for _ in range(2)]
    assert {v.dtype for state in trainer.optimizer.state.values() for v in state.values()} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        # First epoch: the trainer recomputes the sampler's logprobs from the same weights, both under
        # bf16 autocast with the same attention inputs. What is left is rounding: the sampler's lm_head
        # returns bf16 logits (relative error <= 2**-9; the toy's logits are below ~1), the fused
        # logprob keeps them in fp32, so a logprob moves by a few 1e-3 at most. Running either side
        # in fp32, or letting autocast round the ops' fp32 internals, gives ~7e-3 mean / ~2e-2 max.
        assert row["clip_fraction"] == 0.0
        assert 0.0 < row["sampler/ratio_abs_dev"] < 2e-3, row["sampler/ratio_abs_dev"]  # > 0: bf16 did run
        assert row["sampler/ratio_max_dev"] < 1e-2, row["sampler/ratio_max_dev"]
    two_epochs = Trainer(toy(tmp_path / "epochs", BF16, "steps=1", "optim.epochs=2")).train_step()
    assert 0.0 < two_epochs["sampler/ratio_abs_dev"] < 2e-3  # measured at the first epoch, not the last
    fp32 = Trainer(toy(tmp_path / "fp32", "steps=1")).train_step()
    assert fp32["sampler/ratio_max_dev"] < 1e-5  # fp32 throughout: only summation order differs


def _fraction_moved(tmp_path, *overrides) -> float:
    """Share of the weights one optimizer step at lr 1e-6 changes (Adam's first step moves every
    weight with a gradient by ~lr, far below bf16's resolution of ~1/256 of the weight)."""
    trainer = Trainer(toy(tmp_path, BF16, "steps=1", "optim.lr=1e-6", *overrides))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step()
    moved = sum(int((p != b).sum()) for p, b in zip(trainer.model.parameters(), before))
    return moved / sum(b.numel() for b in before)


def test_updates_below_bf16_resolution_survive_only_with_master_weights(tmp_path, caplog):
    kept = _fraction_moved(tmp_path / "master")
    with caplog.at_level(logging.WARNING, logger="trace_core.model.policy"):
        lost = _fraction_moved(tmp_path / "bf16_weights", "model.master_weights=false")
    # in bf16 only weights within ~256 * lr of zero can move at all (~2% of this init)
    assert kept > 0.5 and lost < 0.05, (kept, lost)
    assert "model.master_weights=false" in caplog.text and "1/256" in caplog.text and "lost" in caplog.text


def test_resume_is_exact_with_bf16_and_master_weights(tmp_path):
    straight = Trainer(toy(tmp_path / "a", BF16, "steps=3", "checkpoint_every=2"))
    straight.fit()
    Trainer(toy(tmp_path / "b", BF16, "steps=2", "checkpoint_every=2")).fit()
    resumed = Trainer(toy(tmp_path / "b", BF16, "steps=3", "checkpoint_every=2"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "eval/"))}
    assert [same(r) for r in metrics(tmp_path / "a")] == [same(r) for r in metrics(tmp_path / "b")]


def test_tree_attention_under_cpu_autocast_takes_mixed_dtypes():
    """Under autocast q (RoPE / q_norm with fp32 weights) and k arrive in fp32, v in bf16: the
    attention runs in bf16 and matches the fp32 reference like bf16 math does."""
    packed = packed_forest([random_tree(np.random.default_rng(3), 8, 6)])
    end = torch.as_tensor(packed.end)
    T, g = len(packed.end), torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    v = torch.randn(1, 2, T, 16, generator=g).bfloat16()
    scale = 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = trace_tree_attention_forward(
            None, q, k, v, None, scaling=scale, tree_end=end, tree_attention_backend="cpu"
        )
    assert out.dtype == torch.bfloat16 and out.shape == (1, T, 4, 16)
    q16, k16, v16 = (x[0].transpose(0, 1).bfloat16() for x in (q, k, v))  # [T, H, D] in the compute dtype
    want = tree_attention_reference(q16.float(), k16.float(), v16.float(), end, scale=scale)
    tolerance = 2 * (same_dtype_attention(q16, k16, v16, end, scale).float() - want).abs().max().item() + 1e-3
    assert (out[0].float() - want).abs().max().item() <= tolerance


def test_fp16_without_cpu_autocast_support_is_a_config_error(tmp_path, capsys, monkeypatch):
    import trace_core.model.policy as policy

    assert policy.autocast_supported("cpu", torch.bfloat16)
    monkeypatch.setattr(policy, "autocast_supported", lambda device_type, dtype: False)  # an older torch build
    assert main(["train", *TOY, f"run_dir={tmp_path}", "steps=1", "model.dtype=float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.dtype: float16") and "autocast" in err and "Traceback" not in err


def test_linear_logprob_under_autocast_runs_on_compute_dtype_inputs():
    """Under autocast the op takes hidden / weight in the autocast dtype and keeps its fp32
    accumulation (autocast must not round its fp32 internals); gradients reach the fp32 weight."""
    from trace_kernels import linear_logprob

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(40, 16, generator=g, requires_grad=True)
    rows, labels = torch.tensor([0, 2, 2, 5]), torch.tensor([3, 39, 0, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, entropy = linear_logprob(hidden, weight, rows, labels, return_entropy=True, backend="cpu")
    want, want_entropy = linear_logprob(
        hidden.bfloat16(), weight.detach().bfloat16(), rows, labels, return_entropy=True, backend="cpu"
    )
    assert torch.equal(got, want) and torch.equal(entropy, want_entropy)
    got.sum().backward()
    assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_policy_loss_reports_ratio_deviation_of_weighted_tokens():
    from trace_core.loss import packed_policy_loss

    old = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    new = old + torch.tensor([0.01, -0.02, 0.5, 0.0])  # token 2 has no weight: it must not count
    weights = torch.tensor([0.25, 0.75, 0.0, 0.0])
    zeros = torch.zeros(4)
    _, m = packed_policy_loss(new, old, zeros, zeros, weights)
    dev = (torch.exp(torch.tensor([0.01, -0.02])) - 1).abs()
    torch.testing.assert_close(m["ratio_abs_dev"], 0.25 * dev[0] + 0.75 * dev[1])
    torch.testing.assert_close(m["ratio_max_dev"], dev.max())


def test_fp16_compute_scales_the_loss_and_checkpoints_the_scaler(tmp_path):
    """float16 has a narrow range: its backward runs on a scaled loss (GradScaler), whose state is
    checkpointed; bf16 and fp32 need no scaling."""
    run = Trainer(toy(tmp_path / "fp16", "model.dtype=float16", "steps=2", "checkpoint_every=1"))
    assert run.updater.scaler.is_enabled()
    rows = [run.train_step() for _ in range(2)]
    assert all(math.isfinite(r["loss"]) and r["grad_scale"] > 0 for r in rows)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    run.updater.scaler.update(new_scale=1234.0)  # a scale the resumed run can only have from the checkpoint
    run.save()
    run.close()  # releases the run directory (its lock) for the resumed trainer
    resumed = Trainer(toy(tmp_path / "fp16", "model.dtype=float16", "steps=3", "checkpoint_every=1"), resume=True)
    assert resumed.updater.scaler.get_scale() == 1234.0
    for dtype in ("bfloat16", "float32"):
        other = Trainer(toy(tmp_path / dtype, f"model.dtype={dtype}", "steps=1"))
        assert not other.updater.scaler.is_enabled() and "grad_scale" not in other.train_step()
