"""Whole-batch logits processors for the OpenAI sampling fields, and the logprobs of what was
sampled: each a few tensor operations over ``[rows, vocab]`` logits and per-row parameter
tensors, never a Python loop over rows on the device.

Order, as vLLM and transformers apply them: ``logit_bias``, ``min_tokens`` (stop tokens
forbidden), the penalties and the grammar mask on every row (greedy rows too); then, on
sampled rows, temperature, top-k/top-p and ``min_p``. ``logprobs`` are the log-softmax of the
distribution the token was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def padded_ids(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Token ids of each row as one ``[rows, longest]`` long tensor, padded with -1."""
    longest = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), longest), -1, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    filled = torch.arange(longest)[None, :] < lengths[:, None]
    out[filled] = torch.tensor([token for row in rows for token in row], dtype=torch.long)
    return out.to(device)


def token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` occurrences of each token in each row of -1-padded ``ids``."""
    columns = torch.where(ids >= 0, ids, vocab)  # padding counts in a column cut off below
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, columns, torch.ones_like(columns, dtype=torch.int32))
    return counts[:, :vocab]


@dataclass(eq=False)
class Penalties:
    """Per-row penalty parameters and what each row has seen.

    ``repetition [rows]`` (1 = none) divides a positive logit and multiplies a negative one
    of every token in the prompt or output, as transformers does; ``presence`` and
    ``frequency [rows]`` subtract, as OpenAI defines them, from tokens of the output alone.
    ``prompt_seen`` and ``output_counts`` are ``[rows, vocab]``."""

    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    prompt_seen: torch.Tensor  # bool
    output_counts: torch.Tensor  # int


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    seen = penalties.prompt_seen | (penalties.output_counts > 0)
    repetition = penalties.repetition[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    counts = penalties.output_counts.to(logits.dtype)
    return (logits - penalties.frequency[:, None] * counts
            - penalties.presence[:, None] * (counts > 0).to(logits.dtype))


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias[i]`` to ``logits[rows[i], tokens[i]]`` for every listed (row, token)."""
    return logits.index_put((rows, tokens), bias.to(logits.dtype), accumulate=True)


def forbid(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Make each listed (row, token) impossible: ``min_tokens`` keeps a row's stop tokens
    out until it has generated that many."""
    return logits.index_put((rows, tokens), torch.tensor(NEG_INF, dtype=logits.dtype,
                                                         device=logits.device))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens less likely than ``min_p [rows]`` times the row's most likely one (0: keep
    all). Comes after temperature."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, NEG_INF)


@dataclass(frozen=True)
class Logprobs:
    """Per row: the chosen token's log-probability, and the ``k`` most likely tokens with
    theirs (``k`` the most any row asked for; a row uses its own first few)."""

    chosen: torch.Tensor  # [rows]
    top_ids: torch.Tensor  # [rows, k]
    top: torch.Tensor  # [rows, k]


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> Logprobs:
    """Of the distribution ``logits [rows, vocab]`` that ``tokens [rows]`` were drawn from
    (after every processor: what was actually sampled from)."""
    logp = logits.float().log_softmax(dim=-1)
    top = logp.topk(k, dim=-1) if k else None
    return Logprobs(logp.gather(1, tokens[:, None])[:, 0],
                    top.indices if top is not None else tokens.new_zeros(len(tokens), 0),
                    top.values if top is not None else logp.new_zeros(len(tokens), 0))
