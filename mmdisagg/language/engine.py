"""Iteration-level batching over a LanguageHalf: requests join and leave between steps.

A request's prompt may arrive whole (``add``) or in pieces (``begin`` then ``extend``, as the
transfer layer delivers windows); the part that has arrived is prefilled while the rest is
still on its way. Each ``step`` runs one forward pass over every request with work: the next
prompt tokens of those still prefilling (at most ``max_prefill_tokens`` in all) and one token
for each request that is decoding. Sampling is per request, so a request's tokens do not
depend on what shares its batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from mmdisagg.config import EngineSettings
from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.detokenizer import Detokenizer
from mmdisagg.models.base import Chunk, LanguageHalf, decode_position
from mmdisagg.models.errors import InputError
from mmdisagg.models.kv_cache import KVCache
from mmdisagg.models.sampling import check_params, new_generator, sample


@dataclass(frozen=True)
class StepOutput:
    """One generated token of one request. ``text`` is the new text it made safe to show (often
    empty); ``finish_reason`` is None while the request goes on, else "stop" or "length"."""

    request_id: str
    token_id: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    total_tokens: int
    cache: KVCache
    generator: torch.Generator
    detokenizer: Detokenizer
    mrope_delta: int = 0
    arrived: deque[EncodedPrompt] = field(default_factory=deque)  # not yet prefilled
    received_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return bool(self.output_ids)

    def take_prompt(self, limit: int) -> EncodedPrompt:
        """Up to ``limit`` arrived prompt tokens."""
        pieces = []
        while self.arrived and limit > 0:
            piece = self.arrived.popleft()
            if limit < piece.total_tokens:
                piece, rest = piece.split(limit)
                self.arrived.appendleft(rest)
            pieces.append(piece)
            limit -= piece.total_tokens
        return EncodedPrompt.join(pieces)


class Engine:
    """Runs requests through a LanguageHalf: each ``step`` schedules, runs one forward pass,
    samples and reports. Not thread-safe: one scheduler loop owns it."""

    def __init__(self, half: LanguageHalf, settings: EngineSettings | None = None) -> None:
        self.half = half
        self.settings = settings or EngineSettings()
        self._requests: dict[str, _Request] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request_id: str, prompt: EncodedPrompt, params: SamplingParams) -> None:
        """A request whose whole prompt is here."""
        self.begin(request_id, params, prompt.total_tokens)
        self.extend(request_id, prompt)

    def begin(self, request_id: str, params: SamplingParams, total_tokens: int) -> None:
        """A request whose ``total_tokens``-token prompt will come through ``extend``."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in the engine")
        check_params(params)
        if total_tokens < 1:
            raise InputError("the prompt is empty")
        if total_tokens >= self.half.max_model_len:
            raise InputError(f"the prompt is {total_tokens} tokens; this model takes fewer than "
                             f"{self.half.max_model_len} (prompt and output together)")
        cache = self.half.new_cache()
        cache.reserve(total_tokens)
        self._requests[request_id] = _Request(
            request_id, params, total_tokens, cache, new_generator(params.seed, self.half.device),
            Detokenizer(self.half.tokenizer, params.stop))

    def extend(self, request_id: str, piece: EncodedPrompt) -> None:
        """The next prompt tokens of a begun request, in order. ``piece.mrope_delta`` is the
        whole prompt's."""
        request = self._requests.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id!r} is not in the engine")
        if request.received_tokens + piece.total_tokens > request.total_tokens:
            raise ValueError(f"request {request_id!r}: {request.received_tokens} + "
                             f"{piece.total_tokens} tokens is more than its prompt's "
                             f"{request.total_tokens}")
        request.mrope_delta = piece.mrope_delta
        request.arrived.append(piece)
        request.received_tokens += piece.total_tokens

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; False if it was not here (already finished)."""
        return self._requests.pop(request_id, None) is not None

    def has_work(self) -> bool:
        return any(request.decoding or request.arrived for request in self._requests.values())

    def step(self) -> list[StepOutput]:
        scheduled = self._schedule()
        if not scheduled:
            return []
        hidden = self.half.forward([chunk for _, chunk in scheduled])
        rows = [row for row, (request, _) in enumerate(scheduled)
                if request.cache.length >= request.total_tokens]
        if not rows:
            return []
        requests = [scheduled[row][0] for row in rows]
        tokens = sample(self.half.logits(hidden[rows]), [r.params for r in requests],
                        [r.generator for r in requests])
        return [self._emit(request, token) for request, token in zip(requests, tokens, strict=True)]

    def _schedule(self) -> list[tuple[_Request, Chunk]]:
        """One decode token for every decoding request, then prompt tokens within budget."""
        decoding = [request for request in self._requests.values() if request.decoding]
        scheduled = []
        if decoding:
            last_tokens = torch.tensor([request.output_ids[-1] for request in decoding])
            embeddings = self.half.embed(last_tokens)
            for row, request in enumerate(decoding):
                position = decode_position(request.cache, request.mrope_delta, self.half.device)
                scheduled.append((request, Chunk(request.cache, embeddings[row:row + 1], position)))
        budget = self.settings.max_prefill_tokens
        for request in self._requests.values():
            if budget == 0:
                break
            if request.decoding or not request.arrived:
                continue
            prompt = request.take_prompt(budget)
            budget -= prompt.total_tokens
            scheduled.append((request, Chunk(request.cache, prompt.embeddings, prompt.positions,
                                             prompt.deepstack, prompt.visual_mask)))
        return scheduled

    def _emit(self, request: _Request, token: int) -> StepOutput:
        request.output_ids.append(token)
        text, finish_reason = self._text_and_finish(request, token)
        if finish_reason is not None:
            del self._requests[request.request_id]
        return StepOutput(request.request_id, token, text, finish_reason, request.total_tokens,
                          len(request.output_ids))

    def _text_and_finish(self, request: _Request, token: int) -> tuple[str, str | None]:
        params = request.params
        detokenizer = request.detokenizer
        if token in params.stop_token_ids or (token in self.half.eos_token_ids
                                              and not params.ignore_eos):
            return detokenizer.flush(), "stop"
        text = detokenizer.push(token)
        if detokenizer.stopped:
            return text, "stop"
        if (len(request.output_ids) >= params.max_tokens
                or request.total_tokens + len(request.output_ids) >= self.half.max_model_len):
            return text + detokenizer.flush(), "length"
        return text, None
