"""The oracle of `linear_logprob`: dense logits and a log-softmax, for tests and benches.

It materialises the full [N, V] logits, so its memory grows with N x V; use it for checking, not
for training. Semantics (shared by every path):
    z[n, v]    = (hidden[n] . weight[v] + bias[v]) / temperature        (fp32)
    logprob[m] = z[rows[m], labels[m]] - logsumexp_v z[rows[m], v]        [M], fp32
    entropy[n] = -sum_v softmax(z[n])_v * log softmax(z[n])_v             [N], fp32; 0 for rows
                 no (row, label) pair uses (they are not computed, and get no gradient)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_linear_logprob_inputs


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
    check_inputs: bool = True,
):
    """Dense reference. hidden [N, H], weight [V, H], bias [V] | None, rows/labels int [M].

    The matmul runs in the inputs' dtype (so an fp16 call is a "same-dtype torch run"); the
    softmax runs in fp32. Returns logprob [M] fp32, and entropy [N] fp32 if return_entropy.
    """
    check_linear_logprob_inputs(
        "linear_logprob_reference", hidden, weight, rows, labels, temperature, bias, check_values=check_inputs
    )
    logits = F.linear(hidden, weight, bias).float() / temperature  # [N, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logprob = log_probs[rows.long(), labels.long()]
    if not return_entropy:
        return logprob
    used = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    used[rows.long()] = True
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logprob, torch.where(used, entropy, torch.zeros_like(entropy))
