"""Pick the next token of every row of a batch at once: whole-batch tensor operations over
per-row parameter tensors, one device-to-host copy per step.

Logits go through a pipeline of processors (``LogitsProcessor``: temperature, then top-k and
top-p), each a whole-batch operation reading its per-row tensors from ``SamplingBatch``, then
greedy rows take the argmax and the others a Gumbel-max draw (an exponential race). The
noise is a counter-based hash of (seed, output position, vocabulary index), not a
``torch.Generator`` per row: a seeded request draws the same tokens whatever shares its
batch, and a request recomputed after a preemption draws again what it drew before.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.language.request import Req
from mmdisagg.models.errors import InputError

MASK32 = 0xFFFFFFFF


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


def request_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, else a random one drawn once."""
    return params.seed if params.seed is not None else secrets.randbits(63)


@dataclass(eq=False)
class SamplingBatch:
    """Per-row sampling state of the rows sampled this step, as tensors on the logits' device.

    ``reqs`` keeps each row's request reachable (``reqs[i].output_ids``: what it generated so
    far) for processors that need generation state. ``sampled_rows`` are the non-greedy rows;
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``step`` hold one value per sampled row.
    """

    reqs: Sequence[Req]
    greedy: bool  # every row greedy: nothing below is used
    sampled_rows: torch.Tensor  # [s] long
    temperature: torch.Tensor  # [s] float32
    top_p: torch.Tensor  # [s] float32
    top_k: torch.Tensor  # [s] long; 0 = no limit
    seed: torch.Tensor  # [s] long, 64-bit seeds folded to 32
    step: torch.Tensor  # [s] long: tokens the row has generated so far
    truncates: bool  # some sampled row has top_k or top_p

    @classmethod
    def of(cls, reqs: Sequence[Req], device: torch.device) -> SamplingBatch:
        sampled = [row for row, req in enumerate(reqs) if not req.params.greedy]
        chosen = [reqs[row] for row in sampled]
        params = [req.params for req in chosen]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            reqs=reqs, greedy=not sampled,
            sampled_rows=column(sampled, torch.long),
            temperature=column([p.temperature for p in params], torch.float32),
            top_p=column([p.top_p for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.long),
            seed=column([(req.seed ^ (req.seed >> 32)) & MASK32 for req in chosen], torch.long),
            step=column([len(req.output_ids) for req in chosen], torch.long),
            truncates=any(p.top_k > 0 or p.top_p < 1 for p in params))


LogitsProcessor = Callable[[torch.Tensor, SamplingBatch], torch.Tensor]


def apply_temperature(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    return logits / batch.temperature[:, None]


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Keep each row's ``top_k`` most likely tokens, then the fewest of those whose
    probability reaches ``top_p`` (the most likely always stays)."""
    if not batch.truncates:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    limit = torch.where(batch.top_k > 0, batch.top_k, logits.shape[-1])
    dropped = ranks[None, :] >= limit[:, None]
    probs = ordered.masked_fill(dropped, float("-inf")).softmax(dim=-1)
    dropped |= probs.cumsum(dim=-1) - probs >= batch.top_p[:, None]
    return logits.scatter(-1, order, ordered.masked_fill(dropped, float("-inf")))


PROCESSORS: tuple[LogitsProcessor, ...] = (apply_temperature, apply_top_k_top_p)


class Sampler:
    """``sampler(logits, batch)`` -> next token of every row, as a host list."""

    def __init__(self, processors: Sequence[LogitsProcessor] = PROCESSORS) -> None:
        self.processors = tuple(processors)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
        tokens = logits.argmax(dim=-1)
        if not batch.greedy:
            sampled = logits.index_select(0, batch.sampled_rows)
            for processor in self.processors:
                sampled = processor(sampled, batch)
            noise = exponential_noise(batch.seed, batch.step, sampled.shape[-1])
            drawn = (sampled.softmax(dim=-1) / noise).argmax(dim=-1)
            tokens = tokens.index_copy(0, batch.sampled_rows, drawn)
        return tokens.tolist()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values below 2**32.

    NOTE: multipliers stay below 2**31 so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6C8E9CF5) & MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` Exp(1) draws that depend only on each row's (seed, step) and the
    column: the same numbers whatever the batch."""
    row_key = _mix(_mix(seed) ^ ((step * 0x9E3779B1) & MASK32))
    columns = torch.arange(vocab, device=seed.device)
    bits = _mix((_mix(row_key[:, None] ^ columns[None, :]) + 0x5BD1E995) & MASK32)
    uniform = (bits.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return -torch.log(uniform).to(torch.float32)
