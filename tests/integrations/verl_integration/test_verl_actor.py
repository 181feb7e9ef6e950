"""Shared-prefix training in verl's real FSDP2 actor equals verl's own engine (CPU, world size 1).

actor_run.py runs verl 0.9.1's ActorRolloutRefWorker (role "actor", strategy fsdp2, fp32) in a
fresh process with a CPU platform registered for the test: compute_log_prob, then one
update_actor step (SGD, no clipping, so the parameter change is the gradient), once with verl's
FSDPEngineWithLMHead and once with SharedPrefixFSDPEngine, on 3 prompts x 4 responses that share
prefixes deeper than the prompt, shuffled, with token budgets that force several micro-batches.

Needs `verl` (scripts/setup_verl_env.sh)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (make its venv with scripts/setup_verl_env.sh)")

HERE = os.path.dirname(os.path.abspath(__file__))


RUNS = {  # actor_run.py's arguments
    # Llama, tied embeddings (verl's FSDP2 keeps the lm_head in the root unit); verl's
    # use_dynamic_bsz: a token budget per micro-batch
    "dynamic": ["--dynamic-bsz", "--arch", "llama"],
    # Qwen3, untied: the lm_head is an FSDP2 unit of its own, resharded after forward;
    # micro_batch_size_per_gpu rows per micro-batch
    "fixed": ["--fixed-bsz", "--arch", "qwen3-untied"],
    "dp2": ["--dynamic-bsz", "--world", "2", "--arch", "qwen3-untied"],  # 2 data-parallel ranks, half the rows each
}


@pytest.fixture(scope="module", params=list(RUNS))
def ranks(request, tmp_path_factory):
    """Per rank: the engines' outputs (verl's, shared_prefix, off)."""
    out = tmp_path_factory.mktemp(f"actor_{request.param}")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MASTER_PORT=str(_free_port()))
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "actor_run.py"), str(out), *RUNS[request.param]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    world = 2 if "--world" in RUNS[request.param] else 1
    return [torch.load(out / f"actor_results_rank{r}.pt", weights_only=False) for r in range(world)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engines_are_verls_and_ours(ranks):
    for results in ranks:
        _engines_are_verls_and_ours(results)


def _engines_are_verls_and_ours(results):
    assert results["verl"]["engine"] == "FSDPEngineWithLMHead"  # verl's own, before our import registered ours
    assert results["shared_prefix"]["engine"] == results["off"]["engine"] == "SharedPrefixFSDPEngine"
    # micro-batches of compute_log_prob and of the update took the packed forward (no fallback)
    assert results["shared_prefix"]["shared_prefix_calls"] >= 4
    assert results["off"]["shared_prefix_calls"] == 0


def test_switch_off_is_exactly_verl(ranks):
    for results in ranks:
        _switch_off_is_exactly_verl(results)


def _switch_off_is_exactly_verl(results):
    verl, off = results["verl"], results["off"]
    assert torch.equal(off["log_probs"], verl["log_probs"]) and torch.equal(off["entropy"], verl["entropy"])
    for name, param in verl["params"].items():
        assert torch.equal(off["params"][name], param), name


def test_compute_log_prob_equals_verl(ranks):
    for results in ranks:
        _compute_log_prob_equals_verl(results)


def _compute_log_prob_equals_verl(results):
    mask = results["response_mask"].bool()
    verl, ours = results["verl"], results["shared_prefix"]
    assert (verl["log_probs"][mask] < 0).all() and (verl["entropy"][mask] > 0).all()
    torch.testing.assert_close(ours["log_probs"][mask], verl["log_probs"][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours["entropy"][mask], verl["entropy"][mask], rtol=0, atol=1e-5)


def test_training_step_equals_verl(ranks):
    for results in ranks:
        _training_step_equals_verl(results)
    for results in ranks[1:]:  # FSDP's shards make one model: every rank's full parameters agree
        for name, param in ranks[0]["shared_prefix"]["params"].items():
            assert torch.equal(results["shared_prefix"]["params"][name], param), name


def test_ranks_run_the_same_number_of_micro_batches(ranks):
    runs = [[run for _, run in results["shared_prefix"]["micro_batch_counts"]] for results in ranks]
    assert all(r == runs[0] for r in runs) and len(runs[0]) == 2  # compute_log_prob, update_actor
    if len(ranks) > 1:
        # the short rows' rank needed fewer micro-batches for its budget and split its own to match
        local = [[n for n, _ in results["shared_prefix"]["micro_batch_counts"]] for results in ranks]
        assert any(mine < run for mine, run in zip(local[1], runs[1]))


def _training_step_equals_verl(results):
    verl, ours = results["verl"], results["shared_prefix"]
    for metric in ("actor/pg_loss", "grad_norm"):  # verl's own metrics of the step
        torch.testing.assert_close(
            torch.tensor(ours["metrics"][metric]), torch.tensor(verl["metrics"][metric]), rtol=1e-5, atol=1e-6
        )
    moved = 0
    for name, grad in verl["grads"].items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(ours["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        torch.testing.assert_close(ours["params"][name], verl["params"][name], rtol=1e-5, atol=1e-5 * scale, msg=name)
        moved += bool(grad.abs().max() > 1e-4)
    assert moved == len(verl["grads"])  # the step moved every parameter tensor: the comparison is not vacuous


@pytest.fixture
def actor_config():
    """(shared_prefix value, extra overrides) -> verl's actor config object, built as the worker does."""
    sys.path.insert(0, HERE)
    from actor_run import verl_config
    from verl.utils.config import omega_conf_to_dataclass

    def build(shared_prefix, *extra):
        cfg = verl_config("unused-model-path", shared_prefix=shared_prefix, dynamic_bsz=True, extra=extra)
        return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # ActorRolloutRefWorker.init_model's call

    yield build
    sys.path.remove(HERE)


def test_switch_builds_the_config_and_bad_values_name_the_field(actor_config):
    from hydra.errors import InstantiationException

    from trace_core.integrations.verl.actor import SharedPrefixFSDPEngineConfig, check_shared_prefix_config

    engine = actor_config(True).engine
    assert isinstance(engine, SharedPrefixFSDPEngineConfig) and engine.shared_prefix is True
    assert engine.strategy == "fsdp2"
    check_shared_prefix_config(engine)  # valid
    assert actor_config(False).engine.shared_prefix is False
    with pytest.raises(InstantiationException, match=r"fsdp_config.shared_prefix: must be true or false, got 'yes'"):
        actor_config("yes")
    with pytest.raises(ValueError, match=r"needs strategy=fsdp2 .*actor_rollout_ref.actor.strategy.*got 'fsdp'"):
        check_shared_prefix_config(actor_config(True, "actor_rollout_ref.actor.strategy=fsdp").engine)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size=2"):
        check_shared_prefix_config(
            actor_config(True, "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2").engine
        )
    fused = actor_config(True).engine
    fused.use_fused_kernels = True  # TrainingWorker copies actor_rollout_ref.model.use_fused_kernels here
    with pytest.raises(ValueError, match="actor_rollout_ref.model.use_fused_kernels=false"):
        check_shared_prefix_config(fused)


def test_unsupported_micro_batches_fall_back_to_verls_forward():
    """`_blocker` names why a micro-batch takes verl's own forward (None: the packed one)."""
    from types import SimpleNamespace

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    from trace_core.integrations.verl.actor import SharedPrefixFSDPEngine

    engine = SharedPrefixFSDPEngine.__new__(SharedPrefixFSDPEngine)  # _blocker reads model_config only
    engine.model_config = SimpleNamespace(hf_config=SimpleNamespace())

    def nested(rows):
        return torch.nested.as_nested_tensor([torch.tensor(r) for r in rows], layout=torch.jagged)

    def micro_batch(positions, temperature=1.0, **meta):
        td = TensorDict({"input_ids": nested([[5, 6, 7], [5, 8]]), "position_ids": nested(positions)}, batch_size=[2])
        if isinstance(temperature, torch.Tensor):
            td["temperature"] = temperature
        else:
            tu.assign_non_tensor(td, temperature=temperature)
        tu.assign_non_tensor(td, **meta)
        return td

    assert engine._blocker(micro_batch([[0, 1, 2], [0, 1]])) is None
    assert engine._blocker(micro_batch([[0, 1, 2], [0, 1]], temperature=torch.tensor([0.7, 0.7]))) is None
    assert "position ids" in engine._blocker(micro_batch([[0, 1, 2], [3, 4]]))  # e.g. a continued row
    assert "per-row temperatures" in engine._blocker(micro_batch([[0, 1, 2], [0, 1]], torch.tensor([1.0, 0.5])))
    assert "calculate_sum_pi_squared" in engine._blocker(
        micro_batch([[0, 1, 2], [0, 1]], calculate_sum_pi_squared=True)
    )
    engine.model_config = SimpleNamespace(hf_config=SimpleNamespace(final_logit_softcapping=30.0))
    assert "soft-capping" in engine._blocker(micro_batch([[0, 1, 2], [0, 1]]))
