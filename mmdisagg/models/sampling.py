"""Pick each request's next token from its logits, with its own random stream.

Every row is sampled on its own, with the request's generator, so a seeded request draws the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.models.errors import InputError


def check_params(params: SamplingParams) -> None:
    """Refuse values no sampler can honour, with a message for the client."""
    if params.max_tokens < 1:
        raise InputError("max_tokens must be at least 1")
    if not params.temperature >= 0:
        raise InputError("temperature must be >= 0")
    if not 0 < params.top_p <= 1:
        raise InputError("top_p must be in (0, 1]")
    if params.top_k < 0:
        raise InputError("top_k must be >= 0 (0 = no limit)")
    if params.seed is not None and not -(2**63) <= params.seed < 2**64:
        raise InputError("seed must fit in 64 bits")


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of float32 ``[b, vocab]`` logits."""
    return [_sample_row(row, p, g) for row, p, g in zip(logits, params, generators, strict=True)]


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # NOTE: drop a token once the more likely ones already reach top_p; the first stays.
        beyond = torch.cumsum(probs, dim=-1) - probs >= params.top_p
        logits = logits.index_fill(0, order[beyond], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
