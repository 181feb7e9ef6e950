"""TRACE rollouts through verl's real AgentLoopWorker, with PagedTreeLLMClient as its LLM client (CPU).

Needs `verl` (scripts/setup_verl_env.sh)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (make its venv with scripts/setup_verl_env.sh)")

from hydra import compose, initialize_config_dir
from verl import DataProto
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.ray_trainer import compute_advantage

import trace_core.integrations.verl.agent_loop  # noqa: F401  (registers trace_agent)
from trace_core.advantage import tree_grpo
from trace_core.envs import make_task_source
from trace_core.integrations.verl.advantage import adopt_tree_uids, forest_from_index, register_estimators
from trace_core.integrations.verl.client import PagedTreeLLMClient
from trace_core.model.tiny import build_tiny_model
from trace_core.model.word_tokenizer import EOT, gridworld_tokenizer

PROMPTS, N_REPEAT, N_CONT = 4, 4, 1  # 16 rows: 8 bare rollouts + 8 continuations


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = gridworld_tokenizer()
    tokenizer.save_pretrained(path)
    build_tiny_model(tokenizer, seed=0).save_pretrained(path)
    return path


def verl_config(model_dir, **trace):
    import verl

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.name=vllm",  # must be set; no vLLM server is started (the client is ours)
        "actor_rollout_ref.rollout.prompt_length=64",
        "actor_rollout_ref.rollout.response_length=192",
        f"actor_rollout_ref.rollout.n={N_REPEAT}",
        "actor_rollout_ref.rollout.agent.default_agent_loop=trace_agent",
    ] + [f"+trace_agent.{k}={v}" for k, v in trace.items()]
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides)


def gen_batch(tasks) -> DataProto:
    """What verl's trainer sends to generate_sequences: prompts repeated rollout.n times (interleaved), one uid each."""
    rows = [(i, t) for i, t in enumerate(tasks) for _ in range(N_REPEAT)]
    return DataProto.from_dict(
        non_tensors={
            "raw_prompt": np.array([[{"role": "user", "content": "grid"}] for _ in rows], dtype=object),
            "uid": np.array([f"uid-{i}" for i, _ in rows], dtype=object),
            "index": np.array([i for i, _ in rows]),
            "extra_info": np.array([{"trace_task": t} for _, t in rows], dtype=object),
        }
    )


def tiny_loop(model_dir, **trace):
    """(verl config with the trace_agent loop, the tiny model, PROMPTS train tasks, a worker factory). Call
    the factory inside the running event loop: verl builds the worker's loops there."""
    tokenizer = gridworld_tokenizer()
    config = verl_config(
        model_dir,
        continuations_per_root=N_CONT,
        max_tokens_per_turn=6,
        stop_token_ids=f"[{tokenizer.convert_tokens_to_ids(EOT)}]",
        seed=0,
        **trace,
    )
    model = build_tiny_model(tokenizer, seed=0)
    tasks = make_task_source("gridworld").tasks("train")[:PROMPTS]

    def worker():
        client = PagedTreeLLMClient(model, num_pages=512, max_tokens=6, decode_backend="cpu", seed=0)
        return AgentLoopWorker(config, llm_client=client), client

    return model, tasks, worker


@pytest.fixture(scope="module")
def generated(model_dir):
    model, tasks, new_worker = tiny_loop(model_dir)

    async def run():
        worker, client = new_worker()
        out = await worker.generate_sequences(gen_batch(tasks))
        return out, client

    torch.manual_seed(0)
    out, client = asyncio.run(run())
    return out, client, model


def test_tree_with_the_allocations_leaf_count(generated):
    out, _, _ = generated
    rows = PROMPTS * N_REPEAT
    assert len(out) == rows
    uids = out.non_tensor_batch["trace_uid"]
    rewards = out.batch["rm_scores"].sum(-1).numpy()
    forest, _, _ = forest_from_index(uids, rewards, [out.batch["responses"].shape[1]] * rows)
    assert forest.leaves.size == rows  # R / (1 + N) bare rollouts + N per bare rollout
    bare = out.non_tensor_batch["trace_bare"].astype(bool)
    assert bare.sum() == rows // (1 + N_CONT)
    # cold start: Stage 1 is uniform, every prompt gets R / (1 + N) / B = 2 bare rollouts, so 4 leaves
    groups = out.non_tensor_batch["trace_group"]
    assert sorted(np.unique(groups, return_counts=True)[1].tolist()) == [N_REPEAT] * PROMPTS
    # continuations branch below the first turn: their uid shares the first node with a bare rollout
    paths = [u.split("#trace:")[1].split(":")[0].split(".") for u in uids]
    for path, is_bare in zip(paths, bare):
        if not is_bare:
            assert len(path) >= 2
    assert forest.num_nodes < sum(len(p) for p in paths) + PROMPTS  # shared turns are stored once


def test_rows_carry_the_leaf_path(generated):
    out, _, model = generated
    mask = out.batch["response_mask"].bool()
    assert mask.any(dim=1).all()
    lp = out.batch["rollout_log_probs"]
    # the recorded sampling logprobs are the model's own (temperature 1): recompute two rows
    for i in (0, len(out) - 1):
        attn = out.batch["attention_mask"][i].bool()
        ids = out.batch["input_ids"][i][attn]
        with torch.no_grad():
            logits = model(ids[None]).logits[0].float()
        prompt_len = int(out.batch["attention_mask"][i][: out.batch["prompts"].shape[1]].sum())
        logp = torch.log_softmax(logits[prompt_len - 1 : -1], -1).gather(1, ids[prompt_len:, None])[:, 0]
        resp_mask = mask[i][: ids.numel() - prompt_len]
        assert torch.allclose(logp[resp_mask], lp[i][: ids.numel() - prompt_len][resp_mask], atol=1e-4)


def test_continuations_hit_the_prefix_cache(generated):
    _, client, _ = generated
    assert client.stats["cached_prompt_tokens"] > 0.5 * client.stats["prompt_tokens"]


def test_advantages_of_the_generated_tree(generated):
    out, _, _ = generated
    register_estimators()
    data = DataProto.from_dict(
        tensors={"token_level_rewards": out.batch["rm_scores"], "response_mask": out.batch["response_mask"]},
        non_tensors={k: out.non_tensor_batch[k] for k in ("uid", "trace_uid")},
    )
    data = compute_advantage(
        adopt_tree_uids(data), adv_estimator="tree_grpo", config=AlgoConfig(adv_estimator="tree_grpo")
    )
    rewards = out.batch["rm_scores"].sum(-1).numpy()
    forest, leaf_of_row, _ = forest_from_index(out.non_tensor_batch["trace_uid"], rewards, [1] * len(out))
    expected = tree_grpo(forest)[leaf_of_row]
    for i in range(len(out)):
        row = data.batch["advantages"][i][out.batch["response_mask"][i].bool()]
        assert torch.allclose(row, torch.tensor(expected[i], dtype=row.dtype))


def test_a_token_predictor_learns_in_the_loop_and_then_informs_the_allocation(model_dir, tmp_path, monkeypatch):
    """`predictor=module:fn` builds a token-reading predictor in the worker: step 1 allocates cold and
    trains it on the tree's nodes, step 2 (once it is ready) allocates with its predictions."""
    from trace_core.integrations.verl.agent_loop import _COORDINATORS

    (tmp_path / "loop_predictor.py").write_text(
        "from trace_core.predictor import PredictorConfig, token_predictor\n"
        "def quick(tokenizer):\n"
        "    return token_predictor(tokenizer, PredictorConfig(hidden_dim=16, warmup_nodes=1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _, tasks, new_worker = tiny_loop(model_dir, predictor="loop_predictor:quick")

    async def run():
        worker, _ = new_worker()
        seen = []
        for _ in range(2):
            out = await worker.generate_sequences(gen_batch(tasks))
            (coordinator,) = _COORDINATORS[asyncio.get_running_loop()].values()
            seen.append((coordinator.predictor.nodes_seen, dict(coordinator.last_metrics), len(out)))
        return seen

    torch.manual_seed(0)
    (nodes_1, metrics_1, rows_1), (nodes_2, metrics_2, rows_2) = asyncio.run(run())
    assert rows_1 == rows_2 == PROMPTS * N_REPEAT
    assert metrics_1["trace/predictor_informed"] == 0.0 and nodes_1 > 0
    assert metrics_2["trace/predictor_informed"] == 1.0 and nodes_2 > nodes_1
