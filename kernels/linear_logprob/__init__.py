"""linear_logprob: fused lm-head + log-softmax gather (+ entropy), forward and backward.

    logprob = linear_logprob(hidden, weight, rows, labels, *, temperature=1.0, bias=None,
                             return_entropy=False, check_inputs=True, backend=None)

hidden [N, H] (fp32 / fp16 / bf16), weight [V, H] and bias [V] of the same dtype, rows / labels
int [M]: pair m asks for log p(labels[m] | row rows[m]). Returns logprob [M] fp32 (<= 0), and with
return_entropy=True entropy [N] fp32. Never materialises [tokens x vocab] logits.

A packed rollout tree has one hidden row per token, but the last token of a node predicts the first
token of *every* child, so the op gathers (row, label) pairs: M may exceed N, rows may repeat or be
absent. Log-sum-exp and entropy are computed once per *used* row: `torch.unique(rows)` compacts the
U used rows, and every pair maps to its compacted row.

Backends (`trace_kernels._runtime.select_backend`, which logs its choice):
    triton.py  CUDA, or CPU under TRITON_INTERPRET=1. Forward splits the vocabulary over programs
               and merges the splits' (max, sum-exp, entropy) partials with a log-sum-exp; backward
               recomputes logits one [token chunk x vocab chunk] block at a time.
    cpu.py     anywhere else: the same chunked algorithm with torch tiles.
    naive.py   the dense oracle (`linear_logprob_reference`) the tests compare against.
    checks.py  argument validation, shared by the op and the oracle so both raise alike.
Either way at most one bounded tile of logits exists at a time.
"""

from __future__ import annotations

import torch

from .._runtime import Backend, select_backend
from .checks import MIN_TEMPERATURE, check_linear_logprob_inputs
from .cpu import label_logits_torch, logit_grad_tile_torch, row_stats_partials_torch

__all__ = ["MIN_TEMPERATURE", "LinearLogprobFunction", "linear_logprob"]

OP_NAME = "linear_logprob"

# Block sizes of the chunked computations (tokens x vocab). None = a default for the device; tests
# set small values to exercise many blocks. The largest logits-shaped buffer is one such block.
TOKEN_CHUNK: int | None = None
VOCAB_CHUNK: int | None = None
_DEFAULT_CHUNKS = {"cuda": (4096, 8192), "cpu": (512, 8192)}  # CPU: a 16 MiB fp32 logits tile


def _chunks(device: torch.device) -> tuple[int, int]:
    default_tokens, default_vocab = _DEFAULT_CHUNKS["cuda" if device.type == "cuda" else "cpu"]
    return TOKEN_CHUNK or default_tokens, VOCAB_CHUNK or default_vocab


def _merge_splits(part_max, part_sum, part_ent):
    """Log-sum-exp merge of per-split partials [S, U] -> lse [U], entropy [U] | None (fp32).

    With split s holding a reference point m_s (its max, or its own LSE), s_s = sum exp(z - m_s)
    and t_s = sum exp(z - m_s)(z - m_s):
    lse = log sum_s exp(m_s) s_s and entropy = -sum_s exp(m_s - lse) (t_s + (m_s - lse) s_s).
    """
    global_max = part_max.amax(dim=0)
    weights = torch.exp(part_max - global_max)
    lse = global_max + torch.log((weights * part_sum).sum(dim=0))
    if part_ent is None:
        return lse, None
    offset = part_max - lse
    entropy = -(torch.exp(offset) * (part_ent + offset * part_sum)).sum(dim=0)
    return lse, entropy


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b; low-precision products are rounded per block, summed across blocks in fp32."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += (a @ b).float()


class LinearLogprobFunction(torch.autograd.Function):
    """autograd for `linear_logprob`; inputs as there, plus inv_temp (1/temperature) and the backend."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, labels, inv_temp: float, with_entropy: bool, backend: Backend):
        use_triton = backend is Backend.TRITON
        if use_triton:
            from . import triton as tri  # imported only when the Triton path runs
        n_rows = hidden.shape[0]
        used_rows, pair_to_used = torch.unique(rows, return_inverse=True)  # [U] sorted, [M]
        used_rows, pair_to_used = used_rows.long(), pair_to_used.long()
        n_used = used_rows.shape[0]
        # All rows used (the common case) means used_rows == arange(N): no gather copy needed.
        h_used = hidden if n_used == n_rows else hidden.index_select(0, used_rows)

        if n_used == 0:
            lse = torch.empty(0, dtype=torch.float32, device=hidden.device)
            ent_used = lse if with_entropy else None
            label_logits = lse
        else:
            if use_triton:
                partials = tri.row_stats_partials_triton(h_used, weight, bias, inv_temp, with_entropy)
                label_logits = tri.label_logits_triton(hidden, weight, bias, rows, labels, inv_temp)
            else:
                partials = row_stats_partials_torch(
                    h_used, weight, bias, inv_temp, with_entropy, *_chunks(hidden.device)
                )
                label_logits = label_logits_torch(hidden, weight, bias, rows, labels, inv_temp)
            lse, ent_used = _merge_splits(*partials)
        # The label's logit is part of its row's LSE, so logprob <= 0 exactly; the two are computed
        # by different summation orders, which can put a certain label an ulp above 0: clamp that.
        logprob = (label_logits - lse[pair_to_used]).clamp_(max=0.0)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, used_rows, pair_to_used, labels, lse, ent_used)
        ctx.inv_temp, ctx.use_triton = inv_temp, use_triton
        if not with_entropy:
            return logprob
        entropy = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        entropy[used_rows] = ent_used
        return logprob, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, bias, used_rows, pair_to_used, labels, lse, ent_used = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = _linear_logprob_backward(
            hidden,
            weight,
            bias,
            used_rows,
            pair_to_used,
            labels,
            lse,
            ent_used,
            grad_logprob,
            grad_entropy,
            ctx.inv_temp,
            ctx.use_triton,
            need_hidden,
            need_weight,
            need_bias and bias is not None,
        )
        return (*grads, None, None, None, None, None)


def _linear_logprob_backward(
    hidden,
    weight,
    bias,
    used_rows,
    pair_to_used,
    labels,
    lse,
    ent_used,
    grad_logprob,
    grad_entropy,
    inv_temp,
    use_triton,
    need_hidden,
    need_weight,
    need_bias,
):
    """Gradients of hidden [N, H], weight [V, H], bias [V] (None where not needed).

    d loss / d z[u, v] = sum_{m -> u} g[m] (1[v = label_m] - p) + e[u] dH/dz, processed one
    [token chunk x vocab chunk] block at a time: a kernel writes the dense part into the block,
    the label one-hots are scattered into it, then two matmuls fold it into the gradients.
    Accumulators are fp32: [U, H] for hidden, [vocab chunk, H] for the current weight chunk.
    """
    if use_triton:
        from .triton import logit_grad_tile_triton as grad_tile
    else:
        grad_tile = logit_grad_tile_torch
    n_rows, hidden_size = hidden.shape
    vocab, device, dtype = weight.shape[0], hidden.device, hidden.dtype
    n_used = used_rows.shape[0]
    if n_used == 0 or (grad_logprob is None and grad_entropy is None):
        return (
            torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if need_bias else None,
        )
    h_used = hidden if n_used == n_rows else hidden.index_select(0, used_rows)
    grad_sum = torch.zeros(n_used, dtype=torch.float32, device=device)
    if grad_logprob is not None:
        grad_logprob = grad_logprob.float()
        grad_sum.index_add_(0, pair_to_used, grad_logprob)
    grad_ent_used = grad_entropy.float()[used_rows] if grad_entropy is not None else None

    token_chunk, vocab_chunk = _chunks(device)
    n_token_chunks = -(-n_used // token_chunk)
    n_vocab_chunks = -(-vocab // vocab_chunk)
    # Bucket the (row, label) pairs by block, so each block scatters only its own one-hots.
    if grad_logprob is not None:
        block_of_pair = (labels.long() // vocab_chunk) * n_token_chunks + pair_to_used // token_chunk
        order = torch.argsort(block_of_pair)
        bounds = [0] + torch.bincount(block_of_pair, minlength=n_token_chunks * n_vocab_chunks).cumsum(0).tolist()
        pair_row, pair_label = pair_to_used[order], labels.long()[order]
        pair_grad = grad_logprob[order] * inv_temp

    grad_h_used = torch.zeros((n_used, hidden_size), dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    block = None  # the Triton path writes each logits block into one reused buffer
    if use_triton:
        block = torch.empty((min(token_chunk, n_used), min(vocab_chunk, vocab)), dtype=dtype, device=device)
    weight_grad_in_place = weight.dtype == torch.float32  # else an fp32 buffer per vocab chunk
    for vi, v0 in enumerate(range(0, vocab, vocab_chunk)):
        v1 = min(v0 + vocab_chunk, vocab)
        w_chunk = weight[v0:v1]
        b_chunk = None if bias is None else bias[v0:v1]
        grad_w_chunk = None
        if need_weight:
            grad_w_chunk = (
                grad_weight[v0:v1].zero_()
                if weight_grad_in_place
                else torch.zeros((v1 - v0, hidden_size), dtype=torch.float32, device=device)
            )
        for ti, t0 in enumerate(range(0, n_used, token_chunk)):
            t1 = min(t0 + token_chunk, n_used)
            h_chunk = h_used[t0:t1]
            ent_args = (
                ent_used[t0:t1] if grad_ent_used is not None else None,
                grad_ent_used[t0:t1] if grad_ent_used is not None else None,
            )
            extra = {"out": block[: t1 - t0, : v1 - v0]} if use_triton else {}
            dz = grad_tile(h_chunk, w_chunk, b_chunk, inv_temp, lse[t0:t1], grad_sum[t0:t1], *ent_args, **extra)
            if grad_logprob is not None:
                k = vi * n_token_chunks + ti
                lo, hi = bounds[k], bounds[k + 1]
                if hi > lo:
                    index = (pair_row[lo:hi] - t0, pair_label[lo:hi] - v0)
                    dz.index_put_(index, pair_grad[lo:hi].to(dtype), accumulate=True)
            if need_hidden:
                _accumulate_matmul(grad_h_used[t0:t1], dz, w_chunk)
            if need_weight:
                _accumulate_matmul(grad_w_chunk, dz.T, h_chunk)
            if need_bias:
                grad_bias[v0:v1] += dz.sum(dim=0, dtype=torch.float32)
        if need_weight and not weight_grad_in_place:
            grad_weight[v0:v1] = grad_w_chunk
    grad_hidden = None
    if need_hidden:
        if n_used == n_rows:
            grad_hidden = grad_h_used.to(dtype)
        else:
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, used_rows, grad_h_used.to(dtype))
    return grad_hidden, grad_weight, grad_bias.to(dtype) if need_bias else None


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    check_inputs: bool = True,
    backend: Backend | str | None = None,
):
    """Log-probabilities of `labels` under softmax((hidden[rows] @ weight.T + bias) / temperature).

    hidden [N, H] fp32/fp16/bf16, weight [V, H] and bias [V] (optional) of the same dtype,
    rows, labels int32/int64 [M]: pair m asks for log p(labels[m] | row rows[m]). M may exceed N,
    rows may repeat or be absent.

    Returns logprob [M] fp32 (always <= 0: for a near-certain label, rounding can leave the computed
    value a few ulps above 0, and such values are returned as 0), and with return_entropy=True also entropy [N] fp32
    (softmax entropy of each used row; 0 for rows no pair uses, which receive no gradient).
    Differentiable in hidden, weight and bias for any upstream gradients of both outputs.

    temperature: finite, >= MIN_TEMPERATURE (1e-4; lower ones can overflow fp32 logits to NaN).
    check_inputs: validate labels in [0, V), rows in [0, N) and finite hidden / weight / bias (reads
    the data, i.e. a GPU sync; shape/dtype/device/temperature checks always run). backend: force "triton" or
    "cpu" (the chunked torch path); None lets `select_backend` choose.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # not an autocast op: take hidden / weight / bias in the autocast dtype, then run as written
        # (the CPU path's fp32 tile matmuls must not be cast back down by the autocast)
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return linear_logprob(
                hidden,
                weight,
                rows,
                labels,
                temperature=temperature,
                bias=bias,
                return_entropy=return_entropy,
                check_inputs=check_inputs,
                backend=backend,
            )
    check_linear_logprob_inputs(OP_NAME, hidden, weight, rows, labels, temperature, bias, check_values=check_inputs)
    tensors = (hidden, weight, rows, labels) + ((bias,) if bias is not None else ())
    chosen = select_backend(OP_NAME, *tensors, backend=backend)
    return LinearLogprobFunction.apply(
        hidden, weight, bias, rows, labels, 1.0 / float(temperature), bool(return_entropy), chosen
    )
