"""``mmdisagg language``: the language server's HTTP API around its scheduler.

``POST /generate`` streams newline-delimited JSON events (``TokenEvent`` or ``ErrorEvent``)
until the request finishes; a client that goes away aborts the request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry

from mmdisagg.config import LanguageServerSettings, add_arguments, load
from mmdisagg.core import SamplingParams
from mmdisagg.httpapp import (
    ApiError,
    StatsCollector,
    check_bearer,
    decode_body,
    role_app,
    serve,
)
from mmdisagg.language.engine import Engine
from mmdisagg.language.output import Delivered, emit_each
from mmdisagg.language.request import Req
from mmdisagg.language.scheduler import LanguageScheduler, PromptSource, TransferSource
from mmdisagg.messages import ErrorEvent, Event, GenerateRequest, ServerInfo
from mmdisagg.metrics import (
    kv_metrics,
    latency_histogram,
    outcome_metrics,
    pool_metrics,
    queue_metrics,
    transfer_metrics,
)
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.generation_config import sampling_defaults
from mmdisagg.models.grammar import GrammarCompiler
from mmdisagg.pool.layout import PoolLayout, dtype_name
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.planes import plane_class
from mmdisagg.transfer.receiver import ReceiverManager

log = logging.getLogger(__name__)


class GenerationService:
    """A scheduler and the way HTTP handlers talk to it: what the language server and the
    colocated server share."""

    def __init__(self, engine: Engine, source: PromptSource,
                 settings: LanguageServerSettings) -> None:
        self.half = engine.half
        self.settings = settings
        self.engine = engine
        source.attach(engine.blocks if engine.blocks.prefix_caching else None)
        self.scheduler = LanguageScheduler(self.engine, source, settings)
        self.grammars = GrammarCompiler(self.half.tokenizer, self.half.vocab_size,
                                        self.half.eos_token_ids)
        self.registry = CollectorRegistry()
        ttft = latency_histogram("mmdisagg_time_to_first_token_seconds",
                                 "Arrival to first token, at this server", self.registry)
        tpot = latency_histogram("mmdisagg_time_per_output_token_seconds",
                                 "Time between a request's tokens", self.registry)
        self.scheduler.on_first_token = ttft.observe
        self.scheduler.on_next_token = tpot.observe
        self.scheduler.output.deliver = deliver
        self.scheduler.start()

    async def events(self, make: Callable[[Callable[[Event], None]], Req],
                     ) -> AsyncIterator[Event]:
        """Submit the request ``make`` builds around an emitter; yield its events. Leaving
        early (the client went away) aborts it."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        request = make(queue.put_nowait)
        request.loop = asyncio.get_running_loop()
        self.scheduler.submit(request)
        finished = False
        choices_left = request.params.n
        try:
            while not finished:
                event = await queue.get()
                if isinstance(event, ErrorEvent):
                    finished = True
                else:
                    choices_left -= event.finish_reason is not None
                    finished = not choices_left
                yield event
        finally:
            if not finished:
                self.scheduler.abort(request.room)

    async def compile(self, params: SamplingParams) -> Any:
        """The compiled grammar of a structured-output request (None without one), compiled
        off the event loop; ApiError (400) for a schema that cannot be compiled."""
        if params.grammar is None:
            return None
        try:
            return await run_in_threadpool(self.grammars.compile, params.grammar)
        except InputError as exc:
            raise ApiError(exc.status, exc.message) from None

    def close(self) -> None:
        self.scheduler.close()


def deliver(delivered: Delivered) -> None:
    """One step's events, from the output thread: one call into each event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, Delivered] = defaultdict(list)
    for req, event in delivered:
        by_loop[req.loop].append((req, event))
    for loop, events in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens
            loop.call_soon_threadsafe(emit_each, events)


class LanguageServer:
    role = "language"

    def __init__(self, settings: LanguageServerSettings) -> None:
        self.settings = settings
        model = settings.model
        half = LanguageHalf.from_pretrained(model.require_path(), dtype=model.dtype,
                                            device=model.device,
                                            max_model_len=model.max_model_len or None)
        layout = PoolLayout(settings.pool.pool_blocks, settings.pool.block_size,
                            half.hidden_size, dtype_name(half.dtype), half.deepstack_layers)
        backing = plane_class(settings.transfer.transfer_backend).receiver_backing
        self.pool = EmbeddingPool(layout, backing=backing,
                                  default_blocks=settings.pool.default_blocks,
                                  pin=half.device.type == "cuda" and backing == "process")
        engine = Engine.build(half, settings.engine, settings.max_running_requests)
        self.manager = ReceiverManager(self.pool, settings.transfer, settings.network,
                                       check_length=engine.length_problem)
        self.service = GenerationService(engine, TransferSource(
            self.manager, settings.engine.prefill_while_arriving), settings)
        self.sampling_defaults = sampling_defaults(model.model_path, settings.generation)
        self.registry = self.service.registry
        self.registry.register(StatsCollector(self._metrics))

    def close(self) -> None:
        self.service.close()
        self.manager.close()
        self.pool.close()

    def _metrics(self):
        yield from outcome_metrics("language", self.service.scheduler.outcomes)
        yield from queue_metrics(self.service.scheduler.queues())
        yield from pool_metrics(self.pool)
        yield from kv_metrics(self.service.engine)
        yield from transfer_metrics(self.manager.stats)

    @property
    def alive(self) -> bool:
        return self.service.scheduler.alive

    def abort(self, room: int) -> None:
        self.service.scheduler.abort(room)

    def info(self) -> ServerInfo:
        engine = self.service.engine
        stats = engine.blocks.stats()
        return ServerInfo("language", self.settings.model.name, self.service.scheduler.load,
                          max_model_len=engine.max_len, kv_block_size=engine.blocks.block_size,
                          kv_blocks=stats.total_blocks, kv_blocks_used=stats.used_blocks,
                          sampling_defaults=self.sampling_defaults,
                          pool_free_blocks=self.pool.allocator.num_free_blocks)


def ndjson(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield msgspec.json.encode(event) + b"\n"
    return lines()


async def logged(events: AsyncIterator[Event], request: GenerateRequest,
                 ) -> AsyncIterator[Event]:
    """``events``, with a log line naming the router's request id when the request ends."""
    async for event in events:
        if isinstance(event, ErrorEvent):
            log.log(logging.INFO if event.status < 500 else logging.WARNING,
                    "request %s room %d failed: %s", request.request_id, request.room,
                    event.message)
        elif event.finish_reason is not None:
            log.debug("request %s room %d finished (%s): %d tokens", request.request_id,
                      request.room, event.finish_reason, event.completion_tokens)
        yield event


def build_app(server: LanguageServer) -> FastAPI:
    token = server.settings.network.auth_token
    app = role_app(server, token)

    @app.post("/generate")
    async def generate(request: Request) -> StreamingResponse:
        check_bearer(request, token)
        body = decode_body(await request.body(), GenerateRequest)
        log.debug("request %s room %d: from encoder %s", body.request_id, body.room,
                  body.encoder)
        grammar = await server.service.compile(body.params)
        events = server.service.events(lambda emit: Req(
            body.request_id or str(body.room), body.params, emit=emit, room=body.room,
            encoder=body.encoder, grammar=grammar))
        return StreamingResponse(ndjson(logged(events, body)),
                                 media_type="application/x-ndjson")

    return app


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, LanguageServerSettings)


def run(args: argparse.Namespace) -> int:
    settings = load(LanguageServerSettings, args)
    settings.process.apply("language")
    server = LanguageServer(settings)
    log.info("language server for %s on http://%s:%d, %s data plane", settings.model.name,
             settings.network.host, settings.port, settings.transfer.transfer_backend)
    try:
        serve(build_app(server), settings.network.host, settings.port)
    finally:
        server.close()
    return 0
