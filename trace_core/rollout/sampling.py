"""Batched next-token sampling with per-row temperature / top-p, returning sampling logprobs."""

from __future__ import annotations

import torch


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V]; temperature, top_p [B] (temperature 0 = greedy).

    Returns (tokens [B] int64, logprobs [B] fp32). The logprob is log_softmax(logits / T) at the
    chosen token (T = 1 for greedy rows), computed before the top-p cut: what a trainer recomputes
    from the same model."""
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float().to(logits.device)
    logp = torch.log_softmax(logits / scale[:, None], dim=-1)
    tokens = logp.argmax(dim=-1)
    if not bool(greedy.all()):
        probs = logp.exp()
        if bool((top_p < 1).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            mass_before = sorted_p.cumsum(dim=-1) - sorted_p
            keep = mass_before < top_p.float().to(logits.device)[:, None]  # the top token is always kept
            sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
            pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(1)
            sampled = order.gather(1, pick[:, None]).squeeze(1)
        else:  # no nucleus cut: the vocab-wide sort would change nothing (it was ~10% of CPU decode time)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tokens = torch.where(greedy.to(logits.device), tokens, sampled)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def sample_tokens_per_row(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` with row b drawing from generators[b] (the engine's "episode" streams): a row's token
    depends only on its own logits and stream, not on the other rows of the batch. Same shapes and returns."""
    rows = [
        sample_tokens(logits[b : b + 1], temperature[b : b + 1], top_p[b : b + 1], generator)
        for b, generator in enumerate(generators)
    ]
    if not rows:
        return sample_tokens(logits, temperature, top_p, None)
    return torch.cat([t for t, _ in rows]), torch.cat([lp for _, lp in rows])
