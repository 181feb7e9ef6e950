"""shared_prefix_logprobs / tree_forward under DistributedDataParallel (2 CPU processes, gloo).

DDP synchronises gradients only for a forward run through the wrapper, so the packed forward must
go through it. Each rank scores a different GRPO group; after backward every rank must hold the
gradient of the mean of the two ranks' losses, which is checked against one process doing the
per-sequence computation of both groups.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trace_core.integrations.shared_prefix import shared_prefix_logprobs

from test_shared_prefix_logprobs import flat_logprobs, grpo_batch, tiny_model

WORLD = 2


def rank_inputs(rank: int):
    ids, mask = grpo_batch(64, prompts=WORLD, completions=3, seed=7)
    rows = slice(3 * rank, 3 * rank + 3)  # one prompt's completions per rank
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    return ids[rows], mask[rows], advantages[rows]


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model("qwen3")  # same seed on every rank
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids, mask, advantages = rank_inputs(rank)
        (advantages * shared_prefix_logprobs(ddp, ids, mask, backend="reference")).sum().backward()
        torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_gradients_are_synchronised(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD)]

    model = tiny_model("qwen3")
    model.zero_grad()
    losses = [(adv * flat_logprobs(model, ids, mask)[0]).sum() for ids, mask, adv in map(rank_inputs, range(WORLD))]
    (sum(losses) / WORLD).backward()  # DDP averages the ranks' gradients
    for name, param in model.named_parameters():
        scale = max(1.0, param.grad.abs().max().item())
        for rank in range(WORLD):
            torch.testing.assert_close(grads[rank][name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=f"rank {rank}: {name}")
