"""Run verl's real actor (ActorRolloutRefWorker, FSDP2, world size 1, gloo) on CPU, twice: verl's
own engine and the shared-prefix one, on the same batch; save both results for test_verl_actor.py.

    python actor_run.py OUT_DIR [--dynamic-bsz | --fixed-bsz] [--world 2] [--arch llama | qwen3-untied]

A separate process because verl's platform, process group and engine registry are per process:
the CPU platform (cpu_platform.py) must be in place before verl first asks for a device. Per
engine it saves compute_log_prob's response log-probs and entropies, then one update_actor step's
gradients, parameters, metrics and the number of packed forwards (--world 2: two data-parallel
ranks over gloo, each with half the rows; actor_results_rank<r>.pt per rank).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_PREFIX_CONFIG = "trace_core.integrations.verl.actor.SharedPrefixFSDPEngineConfig"

GROUPS, N, PROMPT, RESPONSE = 3, 4, 7, 9  # 12 rows: 3 prompts x 4 responses
VOCAB = 25  # the gridworld tokenizer's
LR = 1.0


def tiny_model_dir(path: str, arch: str) -> str:
    """A tiny random-init model (gridworld tokenizer) saved for verl: "llama" (tied embeddings: verl's
    FSDP2 keeps the lm_head in the root unit) or "qwen3-untied" (its own FSDP2 unit, resharded after
    forward, as in Qwen3-8B)."""
    from trace_core.model.loading import model_from_config
    from trace_core.model.tiny import tiny_model_config
    from trace_core.model.word_tokenizer import gridworld_tokenizer

    tokenizer = gridworld_tokenizer()
    config = tiny_model_config(tokenizer, arch=arch.split("-")[0])
    config.tie_word_embeddings = not arch.endswith("-untied")
    tokenizer.save_pretrained(path)
    model_from_config(config, seed=0).save_pretrained(path)
    return path


def verl_config(model_dir: str, *, shared_prefix: bool | None, dynamic_bsz: bool, extra: tuple[str, ...] = ()):
    """verl's ppo_trainer config for the actor; shared_prefix None: verl's own engine config,
    True / False: SharedPrefixFSDPEngineConfig with that switch."""
    import verl

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",  # no flash-attn on CPU
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        # fp32 everywhere, so both engines can be compared at fp32 tolerance
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        # plain SGD without clipping: the step moves every parameter by -lr * its gradient, so equal
        # parameters after the step mean equal gradients (verl zeroes the gradients after the step)
        "actor_rollout_ref.actor.optim.optimizer=SGD",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.actor.optim.clip_grad=1e9",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={GROUPS * N}",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.rollout.name=vllm",  # must be set; no rollout is built for role="actor"
        f"actor_rollout_ref.actor.use_dynamic_bsz={dynamic_bsz}",
        f"actor_rollout_ref.rollout.log_prob_use_dynamic_bsz={dynamic_bsz}",
        # small budgets: several micro-batches, so gradient accumulation and reordering run
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=40",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=40",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3",
    ]
    if shared_prefix is not None:
        overrides += [
            f"actor_rollout_ref.actor.fsdp_config._target_={SHARED_PREFIX_CONFIG}",
            f"+actor_rollout_ref.actor.fsdp_config.shared_prefix={str(shared_prefix).lower()}",
        ]
    overrides += list(extra)
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides)


def make_batch(seed: int = 0):
    """GROUPS prompts (left-padded, different lengths) x N responses (right-padded); responses 1-3
    of a group share their first tokens with response 0 (sharing deeper than the prompt)."""
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    rows = GROUPS * N
    prompts, prompt_mask = torch.zeros(rows, PROMPT, dtype=torch.long), torch.zeros(rows, PROMPT, dtype=torch.long)
    responses, response_mask = (
        torch.zeros(rows, RESPONSE, dtype=torch.long),
        torch.zeros(rows, RESPONSE, dtype=torch.long),
    )
    for group in range(GROUPS):
        plen = int(torch.randint(3, PROMPT + 1, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (plen,), generator=g)
        first = torch.randint(3, VOCAB, (RESPONSE,), generator=g)
        for j in range(N):
            b = group * N + j
            prompts[b, PROMPT - plen :], prompt_mask[b, PROMPT - plen :] = prompt, 1
            rlen = int(torch.randint(2, RESPONSE + 1, (1,), generator=g))
            response = torch.randint(3, VOCAB, (rlen,), generator=g)
            response[: min(j, rlen - 1)] = first[: min(j, rlen - 1)]  # row j shares j tokens with row 0
            responses[b, :rlen], response_mask[b, :rlen] = response, 1
    input_ids, attention_mask = torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1)
    batch = DataProto.from_dict(
        tensors=dict(
            prompts=prompts,
            responses=responses,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
            response_mask=response_mask,
        ),
        meta_info={"temperature": 0.8},
    )
    return batch[torch.randperm(rows, generator=g)]  # verl's batches are not sorted by group


def run_engine(cfg, batch, advantages, old_log_probs=None, world: int = 1):
    """old_log_probs: the update's (both engines get verl's); None: this engine's compute_log_prob.
    batch: this rank's rows; world: data-parallel ranks (the update's global batch is world x rows)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    worker = ActorRolloutRefWorker(cfg.actor_rollout_ref, role="actor")
    worker.init_model()
    engine = worker.actor.engine
    start = time.time()

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    before = {n: full(p) for n, p in engine.module.named_parameters()}

    td = left_right_2_no_padding(copy.deepcopy(batch).to_tensordict())  # as RayPPOTrainer._compute_old_log_prob
    tu.assign_non_tensor(td, calculate_entropy=True, compute_loss=False)
    out = worker.compute_log_prob(td)
    log_probs = no_padding_2_padding(tu.get(out, "log_probs"), td).float()
    entropy = no_padding_2_padding(tu.get(out, "entropy"), td).float()

    old_log_probs = log_probs if old_log_probs is None else old_log_probs
    batch = copy.deepcopy(batch).union(
        type(batch).from_dict(tensors={"old_log_probs": old_log_probs, "advantages": advantages})
    )
    td = left_right_2_no_padding(batch.to_tensordict())  # as RayPPOTrainer._update_actor
    tu.assign_non_tensor(
        td,
        calculate_entropy=False,
        global_batch_size=world * len(batch),
        mini_batch_size=world * len(batch),
        epochs=1,
        seed=0,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
    )
    metrics = tu.get(worker.update_actor(td), "metrics")

    after = {n: full(p) for n, p in engine.module.named_parameters()}
    return {
        "engine": type(engine).__name__,
        "log_probs": log_probs,
        "entropy": entropy,
        "grads": {n: (before[n] - after[n]) / LR for n in before},  # SGD, no clipping
        "params": after,
        "metrics": {k: v for k, v in metrics.items() if k in ("actor/pg_loss", "grad_norm")},
        "shared_prefix_calls": getattr(engine, "shared_prefix_calls", 0),
        "micro_batch_counts": list(getattr(engine, "micro_batch_counts", [])),
        "seconds": time.time() - start,
    }


def run_rank(rank: int, out_dir: str, dynamic_bsz: bool, world: int, port: str, arch: str) -> None:
    """One data-parallel rank: verl's engine, ours, ours switched off, on this rank's rows."""
    sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(os.path.dirname(HERE)))]  # cpu_platform; this checkout
    from cpu_platform import use_cpu_platform

    use_cpu_platform()  # before verl first asks for a device
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model_dir = os.path.join(out_dir, "tiny_model")
    if rank == 0:
        tiny_model_dir(model_dir, arch)
    dist.barrier()
    batch = make_batch()
    advantages = torch.randn(batch.batch["responses"].shape, generator=torch.Generator().manual_seed(1))
    if world > 1:
        # rank 0 the longest rows, rank 1 the shortest: their token budgets give different micro-batch
        # counts, which the ranks must even out (FSDP runs collectives per forward)
        order = torch.argsort(batch.batch["attention_mask"].sum(1), descending=True, stable=True)
        mine = order.reshape(world, -1)[rank]
        batch, advantages = batch[mine], advantages[mine]
    results = {}
    # verl's own engine first: the shared-prefix config's import registers our engine for this process
    cfg = verl_config(model_dir, shared_prefix=None, dynamic_bsz=dynamic_bsz)
    results["verl"] = run_engine(cfg, batch, advantages, world=world)
    for name, switch in (("shared_prefix", True), ("off", False)):  # "off": our engine, switch off
        cfg = verl_config(model_dir, shared_prefix=switch, dynamic_bsz=dynamic_bsz)
        results[name] = run_engine(cfg, batch, advantages, old_log_probs=results["verl"]["log_probs"], world=world)
    results["response_mask"] = batch.batch["response_mask"]
    torch.save(results, os.path.join(out_dir, f"actor_results_rank{rank}.pt"))
    dist.destroy_process_group()


def main(out_dir: str, dynamic_bsz: bool, world: int, arch: str) -> None:
    port = os.environ.get("MASTER_PORT", "29533")
    if world == 1:
        run_rank(0, out_dir, dynamic_bsz, 1, port, arch)
    else:
        import torch.multiprocessing as mp

        mp.spawn(run_rank, args=(out_dir, dynamic_bsz, world, port, arch), nprocs=world, join=True)


if __name__ == "__main__":
    args = sys.argv[2:]
    world = int(args[args.index("--world") + 1]) if "--world" in args else 1
    arch = args[args.index("--arch") + 1] if "--arch" in args else "llama"
    main(sys.argv[1], dynamic_bsz="--fixed-bsz" not in args, world=world, arch=arch)
