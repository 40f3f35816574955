"""Pick the next token of every row of a batch at once: whole-batch tensor operations over
per-row parameter tensors, one device-to-host copy per step.

First, on every row (greedy ones too), the adjustments a request asked for
(``LogitAdjustments``: ``logit_bias``, ``min_tokens``, repetition/presence/frequency
penalties) and its grammar's token mask (structured outputs). Then greedy rows take the
argmax, and the others go through a pipeline of processors (``LogitsProcessor``:
temperature, top-k and top-p, min-p), each a whole-batch operation reading its per-row
tensors from ``SamplingBatch``, and a Gumbel-max draw (an exponential race). The noise is a
counter-based hash of (seed, output position, vocabulary index), not a ``torch.Generator``
per row: a seeded request draws the same tokens whatever shares its batch, and a request
recomputed after a preemption draws again what it drew before. Logprobs, when asked for, are
the log-softmax of the distribution each token was drawn from (greedy: the adjusted logits).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.language.logits import (
    Penalties,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    forbid,
    logprobs,
    padded_ids,
    token_counts,
)
from mmdisagg.language.request import Req
from mmdisagg.models.errors import InputError
from mmdisagg.models.grammar import GrammarMask

MASK32 = 0xFFFFFFFF
NEG_INF = float("-inf")


MAX_LOGPROBS = 20


def check_params(params: SamplingParams, vocab_size: int) -> None:
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
    if not 0 <= params.min_p <= 1:
        raise InputError("min_p must be in [0, 1]")
    if not params.repetition_penalty > 0:
        raise InputError("repetition_penalty must be > 0")
    if not (abs(params.presence_penalty) <= 2 and abs(params.frequency_penalty) <= 2):
        raise InputError("presence_penalty and frequency_penalty must be in [-2, 2]")
    if params.min_tokens < 0:
        raise InputError("min_tokens must be >= 0")
    if any(not 0 <= token < vocab_size for token, _ in params.logit_bias):
        raise InputError(f"logit_bias: token ids must be in [0, {vocab_size})")
    if any(not -100 <= bias <= 100 for _, bias in params.logit_bias):
        raise InputError("logit_bias: biases must be in [-100, 100]")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InputError(f"logprobs: at most {MAX_LOGPROBS} alternatives per token")
    if params.n < 1:
        raise InputError("n must be at least 1")


def request_seed(params: SamplingParams, index: int = 0) -> int:
    """The seed choice ``index`` of a request samples with: its own plus the index, else a
    random one drawn once."""
    return params.seed + index if params.seed is not None else secrets.randbits(63)


@dataclass(eq=False)
class LogitAdjustments:
    """What changes the logits of every row before any choice: ``(rows, tokens, bias)`` of
    ``logit_bias``, ``(rows, tokens)`` forbidden by ``min_tokens``, and the penalties (None
    when no row has any)."""

    bias_rows: torch.Tensor
    bias_tokens: torch.Tensor
    bias: torch.Tensor
    forbidden_rows: torch.Tensor
    forbidden_tokens: torch.Tensor
    penalties: Penalties | None

    @classmethod
    def of(cls, reqs: Sequence[Req], stop_ids: frozenset[int], vocab: int,
           device: torch.device) -> LogitAdjustments | None:
        params = [req.params for req in reqs]
        bias = [(row, token, value) for row, p in enumerate(params)
                for token, value in p.logit_bias]
        forbidden = [(row, token) for row, req in enumerate(reqs)
                     if len(req.output_ids) < req.params.min_tokens
                     for token in sorted(stop_ids | set(req.params.stop_token_ids))]
        penalized = any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty
                        for p in params)
        if not (bias or forbidden or penalized):
            return None

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            column([b[0] for b in bias], torch.long), column([b[1] for b in bias], torch.long),
            column([b[2] for b in bias], torch.float32),
            column([f[0] for f in forbidden], torch.long),
            column([f[1] for f in forbidden], torch.long),
            Penalties(column([p.repetition_penalty for p in params], torch.float32),
                      column([p.presence_penalty for p in params], torch.float32),
                      column([p.frequency_penalty for p in params], torch.float32),
                      token_counts(padded_ids([req.prompt_vocab()
                                               if req.params.repetition_penalty != 1 else []
                                               for req in reqs], device), vocab) > 0,
                      token_counts(padded_ids([req.output_ids for req in reqs], device), vocab))
            if penalized else None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if len(self.bias_rows):
            logits = apply_logit_bias(logits, self.bias_rows, self.bias_tokens, self.bias)
        if len(self.forbidden_rows):
            logits = forbid(logits, self.forbidden_rows, self.forbidden_tokens)
        if self.penalties is not None:
            logits = apply_penalties(logits, self.penalties)
        return logits


@dataclass(eq=False)
class SamplingBatch:
    """Per-row sampling state of the rows sampled this step, as tensors on the logits' device.

    ``reqs`` keeps each row's request reachable (``reqs[i].output_ids``: what it generated so
    far) for processors that need generation state. ``sampled_rows`` are the non-greedy rows;
    ``temperature``, ``top_p``, ``top_k``, ``seed``, ``step``, ``min_p`` hold one value per
    sampled row. ``adjustments``, ``matchers`` and the logprob rows concern every row.
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
    min_p: torch.Tensor  # [s] float32
    filters_min_p: bool  # some sampled row has min_p
    adjustments: LogitAdjustments | None = None  # every row
    matchers: list[Any] | None = None  # every row's grammar matcher (None: free), if any
    logprob_rows: list[int] | None = None  # rows that report logprobs
    top_logprobs: int = 0  # alternatives the most demanding of them wants

    @classmethod
    def of(cls, reqs: Sequence[Req], device: torch.device, vocab: int = 0,
           stop_ids: frozenset[int] = frozenset()) -> SamplingBatch:
        """``vocab`` (the logits' width; needed once a row has penalties) and ``stop_ids``
        (EOS, kept out by ``min_tokens``) matter to the adjustments."""
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
            truncates=any(p.top_k > 0 or p.top_p < 1 for p in params),
            min_p=column([p.min_p for p in params], torch.float32),
            filters_min_p=any(p.min_p > 0 for p in params),
            adjustments=LogitAdjustments.of(reqs, stop_ids, vocab, device),
            matchers=([req.matcher for req in reqs]
                      if any(req.matcher is not None for req in reqs) else None),
            logprob_rows=[row for row, req in enumerate(reqs)
                          if req.params.logprobs is not None] or None,
            top_logprobs=max((req.params.logprobs or 0 for req in reqs), default=0))


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


def apply_min_p_rows(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    return apply_min_p(logits, batch.min_p) if batch.filters_min_p else logits


PROCESSORS: tuple[LogitsProcessor, ...] = (apply_temperature, apply_top_k_top_p,
                                           apply_min_p_rows)


@dataclass(frozen=True)
class Sampled:
    """Next token of every row; for rows that asked, (its logprob, [(token, logprob)] of the
    most likely alternatives), else None."""

    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    """``sampler(logits, batch)`` -> next token of every row, as a host list; ``sample`` also
    gives logprobs."""

    def __init__(self, processors: Sequence[LogitsProcessor] = PROCESSORS) -> None:
        self.processors = tuple(processors)
        self._mask: GrammarMask | None = None

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> list[int]:
        return self.sample(logits, batch).tokens

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> Sampled:
        if batch.adjustments is not None:
            logits = batch.adjustments(logits)
        if batch.matchers is not None:
            self._grammar_mask(logits.shape[-1]).apply(logits, batch.matchers)
        tokens = logits.argmax(dim=-1)
        drawn_from = logits
        if not batch.greedy:
            sampled = logits.index_select(0, batch.sampled_rows)
            for processor in self.processors:
                sampled = processor(sampled, batch)
            noise = exponential_noise(batch.seed, batch.step, sampled.shape[-1])
            drawn = (sampled.softmax(dim=-1) / noise).argmax(dim=-1)
            tokens = tokens.index_copy(0, batch.sampled_rows, drawn)
            if batch.logprob_rows is not None:
                drawn_from = logits.index_copy(0, batch.sampled_rows, sampled)
        token_list = tokens.tolist()
        if batch.matchers is not None:
            self._grammar_mask(logits.shape[-1]).accept(batch.matchers, token_list)
        return Sampled(token_list, self._logprobs(drawn_from, tokens, batch))

    def _grammar_mask(self, vocab: int) -> GrammarMask:
        if self._mask is None or self._mask.vocab_size != vocab:
            self._mask = GrammarMask(vocab)
        return self._mask

    @staticmethod
    def _logprobs(drawn_from: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch
                  ) -> list[tuple[float, list[tuple[int, float]]] | None]:
        found: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(tokens)
        if batch.logprob_rows is None:
            return found
        rows = torch.tensor(batch.logprob_rows, device=tokens.device)
        result = logprobs(drawn_from.index_select(0, rows), tokens.index_select(0, rows),
                          batch.top_logprobs)
        chosen, top_ids, top = (result.chosen.tolist(), result.top_ids.tolist(),
                                result.top.tolist())
        for i, row in enumerate(batch.logprob_rows):
            wanted = batch.reqs[row].params.logprobs or 0
            # NOTE: tokens a mask made impossible (-inf, not JSON) are no alternatives
            found[row] = (chosen[i], [(token, value) for token, value in zip(
                top_ids[i][:wanted], top[i][:wanted], strict=True) if value > NEG_INF])
        return found


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
