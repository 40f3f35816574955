"""The public OpenAI-compatible API, in front of a backend that generates.

``mmdisagg router`` puts it in front of encode and language servers (``Dispatcher``);
``mmdisagg serve --colocated`` in front of both model halves in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from mmdisagg.config import RouterSettings, add_arguments, load
from mmdisagg.core import PromptInput, SamplingParams
from mmdisagg.httpapp import (
    ApiError,
    StatsCollector,
    add_metrics_route,
    check_bearer,
    error_body,
    error_response,
    install_error_handlers,
    serve,
)
from mmdisagg.messages import TokenEvent
from mmdisagg.metrics import latency_histogram, outcome_metrics, server_metrics
from mmdisagg.models.errors import InputError
from mmdisagg.models.prompts import parse_messages, parse_tools
from mmdisagg.router.dispatch import Dispatcher
from mmdisagg.router.openai import (
    ChatCompletionRequest,
    ChatReply,
    CompletionRequest,
    SamplingRequest,
    TextReply,
    model_card,
    model_list,
)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # safe in a log line and a completion id


class Backend(Protocol):
    """What generates: the dispatcher to remote servers, or a colocated engine."""

    outcomes: Counter[str]

    @property
    def model(self) -> str | None: ...

    @property
    def max_model_len(self) -> int | None:
        """Most tokens a request may hold, prompt and output (None: not known yet)."""

    @property
    def healthy(self) -> bool: ...

    def server_health(self) -> dict[str, tuple[int, int]]:
        """Role -> (healthy servers, servers) as this backend last saw them."""

    def in_flight(self) -> dict[str, int]:
        """Server URL -> requests sent to it that it has not answered yet."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """The served checkpoint's sampling defaults (generation_config.json)."""

    def generate(self, prompt: PromptInput, params: SamplingParams,
                 request_id: str) -> AsyncIterator[TokenEvent]:
        """Events of one request; ApiError before the first if it cannot be served."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes")
    return bytes(body)


def parse_request(body: bytes, kind: type[SamplingRequest]) -> Any:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (not supported by mmdisagg)"
        raise ApiError(400, f"{param}: {message}" if param else message, param) from None
    if isinstance(request, ChatCompletionRequest):
        for param, check in (("messages", lambda: parse_messages(request.messages)),
                             ("tools", lambda: parse_tools(request.tools or []))):
            try:
                check()
            except InputError as exc:
                raise ApiError(exc.status, exc.message, param) from None
    return request


def check_length(request: SamplingRequest, max_model_len: int | None) -> None:
    """Refuse output that could never fit the model (the prompt takes tokens too)."""
    field, asked = request.asked_max_tokens
    if asked and max_model_len and asked >= max_model_len:
        raise ApiError(400, f"{field}: {asked} is too large; this model takes fewer than "
                            f"{max_model_len} tokens, prompt and output together", field)


def build_app(backend: Backend, *, api_key: str, default_max_tokens: int,
              max_request_bytes: int) -> FastAPI:
    registry = CollectorRegistry()
    ttft = latency_histogram("mmdisagg_router_time_to_first_token_seconds",
                             "Request arrival to first token, at the router", registry)
    e2e = latency_histogram("mmdisagg_router_request_seconds",
                            "Request arrival to last token, at the router", registry)
    outcomes: Counter[str] = Counter()

    def collect():
        yield from outcome_metrics("router", outcomes + backend.outcomes)
        yield from server_metrics(backend.server_health(), backend.in_flight())

    registry.register(StatsCollector(collect))
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="mmdisagg", lifespan=lifespan)
    install_error_handlers(app)
    add_metrics_route(app, registry)

    def served_model() -> str:
        model = backend.model
        if model is None:
            raise ApiError(503, "no healthy server is serving a model yet")
        return model

    def check_model(name: str) -> str:
        model = served_model()
        if name != model:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{model}'", "model", code="model_not_found")
        return model

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_bearer(request, api_key, "API key")
        return model_list(served_model(), started)

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        check_bearer(request, api_key, "API key")
        return model_card(check_model(name), started)

    @app.get("/health")
    async def health() -> Response:
        """503 while a role has no healthy server; "degraded" while one runs below its
        configured count."""
        servers = backend.server_health()
        if not backend.healthy:
            return error_response(503, "not every role has a healthy server")
        degraded = any(up < total for up, total in servers.values())
        return JSONResponse({"status": "degraded" if degraded else "ok", "pid": os.getpid(),
                             "servers": {role: {"healthy": up, "configured": total}
                                         for role, (up, total) in servers.items()}})

    def identified(handler):
        """The route around ``handler(request, request_id)``: the id is the client's
        ``X-Request-Id`` (or a new one), sent back on every answer, errors included."""

        async def route(request: Request) -> Response:
            request_id = client_request_id(request)
            try:
                response = await handler(request, request_id)
            except ApiError as exc:
                response = error_response(exc.status, exc.message, exc.param, exc.code)
            response.headers[REQUEST_ID_HEADER] = request_id
            return response

        return route

    async def complete(request: Request, request_id: str, parsed: SamplingRequest,
                       prompt: PromptInput, reply: ChatReply | TextReply) -> Response:
        arrived = time.monotonic()
        check_length(parsed, backend.max_model_len)
        params = parsed.sampling_params(backend.sampling_defaults, default_max_tokens)
        events = backend.generate(prompt, params, request_id)
        waiting = asyncio.ensure_future(anext(events))
        if not await unless_gone(request, waiting):
            outcomes["aborted"] += 1
            return Response(status_code=499)
        try:
            first = waiting.result()
        except ApiError:
            outcomes["failed"] += 1
            raise
        ttft.observe(time.monotonic() - arrived)

        def finished(last: TokenEvent) -> None:
            e2e.observe(time.monotonic() - arrived)
            outcomes["ok" if last.finish_reason else "aborted"] += 1

        if parsed.stream:
            return StreamingResponse(
                _sse(reply, first, events, parsed.include_usage, finished, outcomes),
                media_type="text/event-stream")
        collected = asyncio.create_task(_collect(first, events, params.n))
        if not await unless_gone(request, collected):
            outcomes["aborted"] += 1
            return Response(status_code=499)
        try:
            result = collected.result()
        except ApiError:
            outcomes["failed"] += 1
            raise
        await events.aclose()
        finished(result[-1])
        return JSONResponse(reply.whole(result))

    async def chat_completion(request: Request, request_id: str) -> Response:
        check_bearer(request, api_key, "API key")
        chat = parse_request(await read_body(request, max_request_bytes), ChatCompletionRequest)
        model = check_model(chat.model)
        parsing = chat.parallel_tool_calls if chat.parses_tool_calls else None
        return await complete(request, request_id, chat, chat.prompt(),
                              ChatReply(model, chat.return_token_ids, request_id, chat.n,
                                        parsing))

    async def text_completion(request: Request, request_id: str) -> Response:
        check_bearer(request, api_key, "API key")
        text = parse_request(await read_body(request, max_request_bytes), CompletionRequest)
        model = check_model(text.model)
        return await complete(request, request_id, text, text.prompt_input(),
                              TextReply(model, text.return_token_ids, request_id, text.n))

    app.post("/v1/chat/completions")(identified(chat_completion))
    app.post("/v1/completions")(identified(text_completion))

    return app


def client_request_id(request: Request) -> str:
    """The client's ``X-Request-Id`` when it is a usable id, else a new random one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


async def unless_gone(request: Request, work: asyncio.Future) -> bool:
    """Wait for ``work`` while the client stays; if it leaves first, cancel ``work`` (which
    aborts the request on every server) and return False."""
    while not work.done():
        await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if not work.done() and await request.is_disconnected():
            work.cancel()
            return False
    return True


async def _collect(first: TokenEvent, events: AsyncIterator[TokenEvent], n: int
                   ) -> list[TokenEvent]:
    """Every event of a request, until each of its ``n`` choices has finished."""
    collected = [first]
    finished = int(first.finish_reason is not None)
    while finished < n:
        collected.append(await anext(events))
        finished += collected[-1].finish_reason is not None
    return collected


async def _sse(reply: ChatReply | TextReply, first: TokenEvent,
               events: AsyncIterator[TokenEvent], include_usage: bool, finished,
               outcomes: Counter[str]) -> AsyncIterator[bytes]:
    def line(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    event = first
    finals: list[TokenEvent] = []
    try:
        for chunk in reply.first_chunks():
            yield line(chunk)
        while True:
            for chunk in reply.chunks(event):
                yield line(chunk)
            if event.finish_reason is not None:
                finals.append(event)
                if len(finals) == reply.n:
                    break
            event = await anext(events)
    except ApiError as exc:
        outcomes["failed"] += 1
        yield line(error_body(exc.status, exc.message, exc.param, exc.code))
        yield b"data: [DONE]\n\n"
        return
    except (asyncio.CancelledError, GeneratorExit):  # the client went away
        outcomes["aborted"] += 1
        raise
    await events.aclose()
    finished(event)
    if include_usage:
        yield line(reply.usage_chunk(finals))
    yield b"data: [DONE]\n\n"


def configure(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, RouterSettings)


def run(args: argparse.Namespace) -> int:
    settings = load(RouterSettings, args)
    settings.process.apply("router")
    dispatcher = Dispatcher(settings)
    app = build_app(dispatcher, api_key=settings.api_key,
                    default_max_tokens=settings.default_max_tokens,
                    max_request_bytes=settings.max_request_bytes)
    log.info("router on http://%s:%d/v1: encoders %s, language servers %s",
             settings.network.host, settings.port, ", ".join(settings.encode),
             ", ".join(settings.language))
    serve(app, settings.network.host, settings.port)
    return 0
