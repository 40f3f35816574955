"""What every HTTP server of mmdisagg shares: errors as OpenAI-style bodies (never a
traceback), bearer-token checks, Prometheus metrics, and running under uvicorn."""

from __future__ import annotations

import hmac
import logging
import os
import signal
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from starlette.exceptions import HTTPException

from mmdisagg.messages import AbortRequest, ServerInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}


# OpenAI's error codes are strings (or null); the HTTP status says the rest.
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class ApiError(Exception):
    """An error a client should see, with its HTTP status (and OpenAI ``code``, if any)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or ERROR_CODES.get(status)}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param, code))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    param = ".".join(where) or None
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, *_validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def check_bearer(request: Request, expected: str, what: str = "token") -> None:
    """Refuse a request without ``Authorization: Bearer <expected>`` (when one is set)."""
    if not expected:
        return
    given = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, f"missing or wrong {what}")


def decode_body(body: bytes, kind: type[T]) -> T:
    """A JSON request body as the message ``kind``, or a 400 naming what is wrong."""
    try:
        return msgspec.json.decode(body, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, f"malformed {kind.__name__}: {exc}") from None


class StatsCollector(Collector):
    """Metrics read from live objects at scrape time, so the hot path counts nothing twice."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def add_metrics_route(app: FastAPI, registry: CollectorRegistry) -> None:
    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class RoleServer(Protocol):
    """An encode or language server as its HTTP app sees it."""

    role: str
    registry: CollectorRegistry

    @property
    def alive(self) -> bool: ...

    def info(self) -> ServerInfo: ...

    def abort(self, room: int) -> None: ...


def role_app(server: RoleServer, token: str) -> FastAPI:
    """What both server roles answer: ``POST /abort``, ``GET /health``, ``GET /info``,
    ``GET /metrics``; the role adds its own work endpoint."""
    app = FastAPI(title=f"mmdisagg {server.role} server")
    install_error_handlers(app)
    add_metrics_route(app, server.registry)
    aborts = Counter("mmdisagg_abort_requests", "Aborts this server was asked for: the router "
                     "sends one for each request it gives up on (client gone, a failure)",
                     registry=server.registry)

    @app.post("/abort")
    async def abort(request: Request) -> dict:
        check_bearer(request, token)
        server.abort(decode_body(await request.body(), AbortRequest).room)
        aborts.inc()
        return {}

    @app.get("/health")
    async def health() -> dict:
        if not server.alive:
            raise ApiError(503, f"{server.role} scheduler stopped")
        return {"status": "ok", "pid": os.getpid()}

    @app.get("/info")
    async def info() -> dict:
        return msgspec.to_builtins(server.info())

    return app


# NOTE: longer than any of our clients keeps an idle connection (httpx: 5 s). With equal
# limits a client can reuse a connection the server is just closing: a ReadError, which the
# router took for a dead encode server (503s until the next health check).
KEEP_ALIVE_S = 30


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM, then return by exception so the caller's cleanup runs.

    NOTE: uvicorn shuts down gracefully, restores the handlers it found and raises the signal
    again. Under the default SIGTERM disposition that kills the process on the spot, before
    any ``finally`` unlinks shared memory; this handler turns it into SystemExit instead."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE_S)
    uvicorn.Server(config).run()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)
