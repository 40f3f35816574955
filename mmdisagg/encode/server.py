"""``mmdisagg encode``: the encode server's HTTP API around its scheduler.

``POST /encode`` prepares a chat (tokenize, fetch and process images) off the event loop,
hands it to the scheduler and answers once the language server has the whole prompt. At most
``--max-queued-encodes`` requests are held at once; more get 503.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import msgspec
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mmdisagg.config import EncodeServerSettings, add_arguments, load
from mmdisagg.encode.scheduler import EncodeScheduler
from mmdisagg.httpapp import ApiError, StatsCollector, check_bearer, decode_body, role_app, serve
from mmdisagg.messages import EncodeRequest, EncodeResult, ErrorEvent, ServerInfo
from mmdisagg.metrics import (
    by_label,
    outcome_metrics,
    pool_metrics,
    queue_metrics,
    transfer_metrics,
)
from mmdisagg.models.base import EncoderHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.image_cache import ImageCache
from mmdisagg.pool.layout import PoolLayout, dtype_name
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.sender import SenderManager

log = logging.getLogger(__name__)


class EncodeServer:
    role = "encode"

    def __init__(self, settings: EncodeServerSettings) -> None:
        self.settings = settings
        model = settings.model
        self.half = EncoderHalf.from_pretrained(
            model.require_path(), dtype=model.dtype, device=model.device,
            image_settings=settings.image, max_model_len=model.max_model_len or None)
        layout = PoolLayout(settings.pool.pool_blocks, settings.pool.block_size,
                            self.half.hidden_size, dtype_name(self.half.dtype),
                            self.half.deepstack_layers)
        self.pool = EmbeddingPool(layout, default_blocks=settings.pool.default_blocks,
                                  pin=self.half.device.type == "cuda")
        self.manager = SenderManager(self.pool, settings.transfer, settings.network)
        cache_bytes = settings.image.image_cache_bytes
        self.cache = ImageCache(cache_bytes) if cache_bytes else None
        self.scheduler = EncodeScheduler(self.half, self.manager, self.cache,
                                         settings.encoding.max_encode_batch,
                                         settings.encoding.max_encode_patches)
        self.scheduler.start()
        self.preparing = 0  # requests in ``prepare``, not yet with the scheduler
        self.overloaded = 0  # requests refused by --max-queued-encodes
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(self._metrics))

    def close(self) -> None:
        self.scheduler.close()
        self.manager.close()
        self.pool.close()

    def _metrics(self):
        yield from outcome_metrics("encode", {**self.scheduler.outcomes,
                                              "overloaded": self.overloaded})
        yield from queue_metrics({"waiting": len(self.scheduler.waiting),
                                  "admitted": len(self.scheduler.admitted),
                                  "encoding": len(self.scheduler.encoding),
                                  "sending": len(self.scheduler.sending)})
        yield from pool_metrics(self.pool)
        yield from transfer_metrics(self.manager.stats)
        yield CounterMetricFamily("mmdisagg_vision_images", "Images run through the vision tower",
                                  value=self.half.images_encoded)
        prepared = self.half.prepared_images
        if prepared is not None:
            yield by_label(CounterMetricFamily, "mmdisagg_prepared_image_cache",
                           "Lookups of processed images by their bytes", "result",
                           {"hit": prepared.hits, "miss": prepared.misses})
            yield GaugeMetricFamily("mmdisagg_prepared_image_cache_bytes",
                                    "Bytes held by the processed-image cache",
                                    value=prepared.bytes_used)
        if self.cache is not None:
            yield by_label(CounterMetricFamily, "mmdisagg_image_cache", "Image-cache lookups",
                           "result", {"hit": self.cache.hits, "miss": self.cache.misses})
            yield GaugeMetricFamily("mmdisagg_image_cache_bytes", "Bytes held by the image cache",
                                    value=self.cache.bytes_used)

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def abort(self, room: int) -> None:
        self.scheduler.abort(room)

    def info(self) -> ServerInfo:
        return ServerInfo("encode", self.settings.model.name, self.load,
                          self.manager.bootstrap_address, self.half.max_model_len,
                          pool_free_blocks=self.pool.allocator.num_free_blocks)

    @property
    def load(self) -> int:
        return self.preparing + self.scheduler.load

    async def encode(self, request: EncodeRequest) -> EncodeResult:
        limit = self.settings.encoding.max_queued_encodes
        if self.load >= limit:
            self.overloaded += 1
            log.warning("request %s room %d refused: %d requests already held (limit %d)",
                        request.request_id, request.room, self.load, limit)
            raise ApiError(503, f"encode server busy: {self.load} requests already queued "
                                f"(--max-queued-encodes {limit}); try again later")
        self.preparing += 1
        try:
            prepared = await run_in_threadpool(self.half.prepare_input, request.prompt)
        except InputError as exc:
            log.info("request %s room %d refused: %s", request.request_id, request.room,
                     exc.message)
            raise ApiError(exc.status, exc.message) from None
        finally:
            self.preparing -= 1
        log.debug("request %s room %d: %d tokens, %d images", request.request_id, request.room,
                  prepared.total_tokens, len(prepared.images))
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def reply(result: EncodeResult | ErrorEvent) -> None:
            loop.call_soon_threadsafe(lambda: outcome.done() or outcome.set_result(result))

        try:
            self.scheduler.submit(request.room, prepared, reply)
        except ValueError as exc:
            raise ApiError(409, str(exc)) from None
        try:
            result = await outcome
        except asyncio.CancelledError:
            self.scheduler.abort(request.room)
            raise
        if isinstance(result, ErrorEvent):
            log.log(logging.INFO if result.status < 500 else logging.WARNING,
                    "request %s room %d failed: %s", request.request_id, request.room,
                    result.message)
            raise ApiError(result.status, result.message)
        log.debug("request %s room %d sent", request.request_id, request.room)
        return result


def build_app(server: EncodeServer) -> FastAPI:
    token = server.settings.network.auth_token
    app = role_app(server, token)

    @app.post("/encode")
    async def encode(request: Request) -> dict:
        check_bearer(request, token)
        body = decode_body(await request.body(), EncodeRequest)
        return msgspec.to_builtins(await server.encode(body))

    return app


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EncodeServerSettings)


def run(args: argparse.Namespace) -> int:
    settings = load(EncodeServerSettings, args)
    settings.process.apply("encode")
    server = EncodeServer(settings)
    log.info("encode server for %s on http://%s:%d, bootstrap %s, %s data plane",
             settings.model.name, settings.network.host, settings.port,
             server.manager.bootstrap_address, settings.transfer.transfer_backend)
    try:
        serve(build_app(server), settings.network.host, settings.port)
    finally:
        server.close()
    return 0
