"""The CPU path of `linear_logprob`: the Triton kernels' tile computations, in torch.

The op's autograd Function (in __init__) runs the same chunked algorithm with these tiles where
Triton cannot run (plain CPU), so memory stays bounded there too: each call touches one
[token chunk x vocab chunk] tile of logits at most. Inputs arrive validated.
"""

from __future__ import annotations

import torch


def _tile_logits(h_tile: torch.Tensor, w_tile: torch.Tensor, b_tile: torch.Tensor | None, inv_temp: float):
    """[T, H] x [C, H] -> fp32 logits [T, C]; inputs upcast so the accumulation is fp32 on CPU too."""
    z = h_tile.float() @ w_tile.float().T
    if b_tile is not None:
        z += b_tile.float()
    return z if inv_temp == 1.0 else z.mul_(inv_temp)


def row_stats_partials_torch(
    h_used: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    inv_temp: float,
    with_entropy: bool,
    token_chunk: int,
    vocab_chunk: int,
):
    """Per-(vocab split, row) softmax statistics, one split per vocab chunk.

    h_used [U, H] -> (ref [S, U], sum_exp [S, U], ent [S, U] | None), where for split s and any
    reference point ref: sum_exp = sum_v exp(z - ref), ent = sum_v exp(z - ref) * (z - ref).
    The Triton kernel uses ref = max_v z; here ref = logsumexp_v z (so sum_exp = 1), which takes
    one fused torch op instead of four passes over the tile. Only a [token_chunk, vocab_chunk]
    tile of logits exists at a time.
    """
    n_used, vocab = h_used.shape[0], weight.shape[0]
    n_splits = -(-vocab // vocab_chunk)
    shape = (n_splits, n_used)
    part_max = torch.empty(shape, dtype=torch.float32, device=h_used.device)
    part_sum = torch.ones_like(part_max)
    part_ent = torch.empty_like(part_max) if with_entropy else None
    for split, v0 in enumerate(range(0, vocab, vocab_chunk)):
        v1 = min(v0 + vocab_chunk, vocab)
        w_tile = weight[v0:v1]
        b_tile = None if bias is None else bias[v0:v1]
        for t0 in range(0, n_used, token_chunk):
            t1 = min(t0 + token_chunk, n_used)
            z = _tile_logits(h_used[t0:t1], w_tile, b_tile, inv_temp)
            tile_lse = torch.logsumexp(z, dim=1)
            part_max[split, t0:t1] = tile_lse
            if with_entropy:
                log_p = z.sub_(tile_lse[:, None])
                part_ent[split, t0:t1] = (log_p.exp() * log_p).sum(dim=1)
    return part_max, part_sum, part_ent


def label_logits_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    labels: torch.Tensor,
    inv_temp: float,
    chunk: int = 4096,
) -> torch.Tensor:
    """z[rows[m], labels[m]] for every pair, fp32 [M]; chunked so only [chunk, H] rows are gathered."""
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden.device)
    for m0 in range(0, rows.shape[0], chunk):
        r, l = rows[m0 : m0 + chunk], labels[m0 : m0 + chunk]
        z = (hidden[r].float() * weight[l].float()).sum(dim=1)
        if bias is not None:
            z += bias[l].float()
        out[m0 : m0 + chunk] = z * inv_temp
    return out


def logit_grad_tile_torch(
    h_tile: torch.Tensor,
    w_tile: torch.Tensor,
    b_tile: torch.Tensor | None,
    inv_temp: float,
    lse: torch.Tensor,
    grad_sum: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """Dense part of d loss / d (hidden @ weight.T + bias) on one tile, [T, C] in h_tile's dtype.

    With p = softmax(z), G = sum of logprob upstream grads of the row, e = entropy upstream grad:
        d/dz = -p * (G + e * (z - lse + entropy))        (the label one-hot part is added by the caller)
    and d/d(pre-temperature logits) = d/dz * inv_temp.
    lse, grad_sum, entropy, grad_entropy: fp32 [T].
    """
    z = _tile_logits(h_tile, w_tile, b_tile, inv_temp)
    log_p = z.sub_(lse[:, None])
    coeff = grad_sum[:, None] * -inv_temp
    if grad_entropy is not None:
        coeff = (log_p + entropy[:, None]).mul_(grad_entropy[:, None] * -inv_temp).add_(coeff)
    return log_p.exp_().mul_(coeff).to(h_tile.dtype)
