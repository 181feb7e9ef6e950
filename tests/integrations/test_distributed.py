"""shared_prefix_logprobs under DistributedDataParallel and FSDP2 (2 CPU processes, gloo).

DDP synchronises gradients only for a forward run through the wrapper; FSDP2 gathers each module's
parameters in its own call (the lm_head's weight is whole only there). So the packed forward runs
through the model's own forward and scores inside the lm_head's call. Each rank scores a different
GRPO group; after backward every rank must hold the gradient of the mean of the two ranks' losses,
checked against one process doing the per-sequence computation of both groups.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_shared_prefix_logprobs import flat_logprobs, grpo_batch, tiny_model

from trace_core.integrations.shared_prefix import shared_prefix_logprobs

pytestmark = pytest.mark.slow  # 2-process gloo runs: ddp 37 s, fsdp2 10 s on 2 cores

WORLD = 2


def rank_inputs(rank: int):
    ids, mask = grpo_batch(64, prompts=WORLD, completions=3, seed=7)
    rows = slice(3 * rank, 3 * rank + 3)  # one prompt's completions per rank
    advantages = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    return ids[rows], mask[rows], advantages[rows]


def wrap(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)  # the root group holds embeddings, final norm and lm_head


def distributed_worker(rank: int, kind: str, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model("qwen3")  # same seed on every rank
        wrapped = wrap(model, kind)
        ids, mask, advantages = rank_inputs(rank)
        (advantages * shared_prefix_logprobs(wrapped, ids, mask, backend="cpu")).sum().backward()
        grads = {
            n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in model.named_parameters()
        }
        torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_gradients_are_synchronised(tmp_path, kind):
    mp.spawn(distributed_worker, args=(kind, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    grads = [torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD)]

    model = tiny_model("qwen3")
    model.zero_grad()
    losses = [(adv * flat_logprobs(model, ids, mask)[0]).sum() for ids, mask, adv in map(rank_inputs, range(WORLD))]
    (sum(losses) / WORLD).backward()  # DDP averages the ranks' gradients
    for name, param in model.named_parameters():
        scale = max(1.0, param.grad.abs().max().item())
        for rank in range(WORLD):
            torch.testing.assert_close(
                grads[rank][name], param.grad, rtol=1e-4, atol=1e-4 * scale, msg=f"rank {rank}: {name}"
            )
