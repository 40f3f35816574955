"""``serve --colocated``: both halves in one process, no pool and no transfer — the baseline
disaggregation is measured against.

Prompts are encoded inside the language scheduler's own loop, between decode steps, as a
colocated engine does: a burst of large images stalls the requests that are decoding.
"""

from __future__ import annotations

import secrets
from collections import Counter, deque
from collections.abc import AsyncIterator

from fastapi.concurrency import run_in_threadpool

from mmdisagg.config import LanguageServerSettings, ServeSettings
from mmdisagg.core import PrefixHit, PromptInput, SamplingParams
from mmdisagg.encode.scheduler import take_batches
from mmdisagg.httpapp import ApiError
from mmdisagg.language.engine import Engine
from mmdisagg.language.kv_blocks import KVBlockManager
from mmdisagg.language.request import Req
from mmdisagg.language.scheduler import Ready
from mmdisagg.language.server import GenerationService
from mmdisagg.messages import ErrorEvent, TokenEvent
from mmdisagg.models.base import EncoderHalf, LanguageHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.generation_config import sampling_defaults
from mmdisagg.models.image_cache import ImageCache


class LocalEncodeSource:
    """A PromptSource that runs the vision tower in the scheduler's loop."""

    def __init__(self, half: EncoderHalf, cache: ImageCache | None, max_batch: int,
                 max_patches: int) -> None:
        self.half = half
        self.cache = cache
        self.max_batch = max_batch
        self.max_patches = max_patches
        self.pending: deque[Req] = deque()
        self.prefix_cache: KVBlockManager | None = None
        self._hits: dict[Req, PrefixHit | None] = {}
        self._hashes: dict[Req, list[bytes]] = {}

    def attach(self, prefix_cache: KVBlockManager | None) -> None:
        self.prefix_cache = prefix_cache

    def add(self, request: Req) -> None:
        """Looks the prompt up in the prefix cache at once: cached images are not encoded."""
        hit = None
        if self.prefix_cache is not None:
            hashes = self._hashes[request] = request.prepared.block_hashes()
            hit = self.prefix_cache.match(hashes, request.prepared.total_tokens - 1)
        self._hits[request] = hit
        self.pending.append(request)

    def _cached_tokens(self, request: Req) -> int:
        hit = self._hits.get(request)
        return hit.tokens if hit is not None else 0

    def ready(self, limit: int) -> list[Ready]:
        """Encodes only while the engine's waiting queue has ``limit`` room: the prepared
        prompts wait here, embeddings are not made early."""
        done: list[Ready] = []
        if limit <= 0:
            return done
        for batch in take_batches(
                self.pending,
                lambda request: request.prepared.images_after(self._cached_tokens(request)),
                self.cache, min(self.max_batch, limit), self.max_patches):
            if not batch:
                continue
            try:
                encoded = self.half.encode([request.prepared for request in batch], self.cache,
                                           self.max_patches,
                                           [self._cached_tokens(request) for request in batch])
            except Exception as exc:  # a model failure fails these requests, not the server
                done += [(request, ErrorEvent(f"encoding failed: {exc!r}", 500))
                         for request in batch]
                self._release(batch)
                continue
            for request, prompt in zip(batch, encoded, strict=True):
                prompt.block_hashes = self._hashes.pop(request, [])
                prompt.tail_images = request.prepared.tail_images()
                done.append((request, prompt.after(self._hits.pop(request))))
        return done

    def abort(self, request: Req) -> None:
        if request in self.pending:
            self.pending.remove(request)
            self._release([request])

    def _release(self, requests: list[Req]) -> None:
        for request in requests:
            self._hashes.pop(request, None)
            hit = self._hits.pop(request, None)
            if hit is not None:
                self.prefix_cache.release(hit)

    def queues(self) -> dict[str, int]:
        return {"encode": len(self.pending)}


class ColocatedBackend:
    def __init__(self, settings: ServeSettings) -> None:
        model = settings.model
        model_path = model.require_path()
        max_len = model.max_model_len or None
        self.encoder = EncoderHalf.from_pretrained(
            model_path, dtype=model.dtype, device=model.device, image_settings=settings.image,
            max_model_len=max_len)
        language = LanguageHalf.from_pretrained(model_path, dtype=model.dtype,
                                                device=model.device, max_model_len=max_len)
        cache_bytes = settings.image.image_cache_bytes
        source = LocalEncodeSource(self.encoder, ImageCache(cache_bytes) if cache_bytes else None,
                                   settings.encoding.max_encode_batch,
                                   settings.encoding.max_encode_patches)
        server_settings = LanguageServerSettings(engine=settings.engine, model=model,
                                                 generation=settings.generation)
        engine = Engine.build(language, settings.engine, server_settings.max_running_requests)
        self.service = GenerationService(engine, source, server_settings)
        self.model = model.name
        self.max_model_len = language.max_model_len
        self.sampling_defaults = sampling_defaults(model_path, settings.generation)
        self.healthy = True

    @property
    def outcomes(self) -> Counter[str]:
        return self.service.scheduler.outcomes

    def server_health(self) -> dict[str, tuple[int, int]]:
        return {}

    def in_flight(self) -> dict[str, int]:
        return {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.service.close()

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[TokenEvent]:
        try:
            prepared = await run_in_threadpool(self.encoder.prepare_input, prompt)
        except InputError as exc:
            raise ApiError(exc.status, exc.message) from None
        grammar = await self.service.compile(params)
        events = self.service.events(lambda emit: Req(
            request_id, params, emit=emit, room=secrets.randbits(63), prepared=prepared,
            grammar=grammar))
        async for event in events:
            if isinstance(event, ErrorEvent):
                raise ApiError(event.status, event.message)
            yield event
