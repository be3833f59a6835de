"""Turning logits into tokens: greedy, temperature, top-k, top-p, seeded per position."""

from __future__ import annotations

import torch

from labkit.engine.config import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over the generator's seed space


def position_seed(seed: int, position: int) -> int:
    """The generator seed for the token at `position` (0-based index in prompt + output) of a seeded request."""
    return (seed * _MIX + position) % (1 << 63)


def filter_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """Temperature-scaled fp32 logits of one row [vocab] with top-k / top-p outside set to -inf."""
    x = logits.float() / sp.temperature
    if 0 < sp.top_k < x.numel():
        kth = torch.topk(x, sp.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token always stays.
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= sp.top_p
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return x


def sample(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int], generator: torch.Generator
) -> list[int]:
    """One token id per row of `logits` [batch, vocab]; `positions[i]` is where row i's token will sit.

    Greedy rows take the argmax; the others draw from their filtered distribution with a
    generator seeded by (seed, position), or from the engine's `generator` when unseeded.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, sp in enumerate(params):
        if sp.greedy:
            continue
        probs = torch.softmax(filter_logits(logits[i], sp), dim=-1).cpu()
        gen = generator
        if sp.seed is not None:
            gen = torch.Generator().manual_seed(position_seed(sp.seed, positions[i]))
        tokens[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
