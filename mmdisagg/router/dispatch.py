"""The disaggregated backend: each request goes to one encode and one language server at once.

Both get the same random 63-bit room; the language server pre-allocates while the encoder
works. Servers are chosen least-loaded among the healthy ones, by the load each reports in
``/info`` (polled every ``--health-interval``) plus what this router sent it since. An encoder
that fails before the language server has the prompt, or a language server that fails before
its first token, is replaced by another under a new room; a language server that fails after
streaming tokens ends the request with an error. A client that goes away aborts the request
on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import NoReturn

import httpx
import msgspec

from mmdisagg.config import RouterSettings
from mmdisagg.core import PromptInput, SamplingParams
from mmdisagg.httpapp import ApiError
from mmdisagg.messages import (
    LANGUAGE_ABORT,
    TRANSFER_FAILED,
    AbortRequest,
    EncodeRequest,
    ErrorEvent,
    Event,
    GenerateRequest,
    ServerInfo,
    TokenEvent,
)

log = logging.getLogger(__name__)

ABORTED = 499  # what an encoder answers for a room this router aborted

HEALTH_TIMEOUT_S = 2.0
ABORT_TIMEOUT_S = 5.0


@dataclass
class Server:
    url: str
    role: str
    healthy: bool = False
    info: ServerInfo | None = None
    in_flight: int = 0  # sent by this router and not answered yet
    in_flight_at_info: int = 0  # of those, in flight when ``info`` was asked for

    @property
    def load(self) -> int:
        """Requests this router has on the server now, plus the others the server reported
        (other routers'): a report counts this router's requests of that moment, which may
        have been answered since."""
        reported = self.info.load if self.info is not None else 0
        return max(0, reported - self.in_flight_at_info) + self.in_flight

    @property
    def rank(self) -> tuple[int, int, int]:
        """Least load first; among equals, most free pool blocks, then most free KV blocks
        (language servers)."""
        info = self.info
        if info is None:
            return (self.load, 0, 0)
        return (self.load, -info.pool_free_blocks, info.kv_blocks_used - info.kv_blocks)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """One request sent to this server, until it answers."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class ServerSet:
    """The servers of one role, their health, and the least-loaded choice."""

    def __init__(self, role: str, urls: tuple[str, ...]) -> None:
        self.role = role
        self.servers = [Server(url.rstrip("/"), role) for url in urls]

    def pick(self, exclude: set[str]) -> Server:
        healthy = [s for s in self.servers if s.healthy and s.url not in exclude]
        if not healthy:
            raise ApiError(503, f"no healthy {self.role} server available")
        best = min(s.rank for s in healthy)
        return random.choice([s for s in healthy if s.rank == best])

    async def check(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        async def one(server: Server) -> None:
            in_flight = server.in_flight
            try:
                response = await client.get(f"{server.url}/info", headers=headers,
                                            timeout=HEALTH_TIMEOUT_S)
                response.raise_for_status()
                server.info = msgspec.json.decode(response.content, type=ServerInfo)
                server.in_flight_at_info = in_flight
                if not server.healthy:
                    log.info("%s server %s is healthy", self.role, server.url)
                server.healthy = True
            except (httpx.HTTPError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                if server.healthy:
                    log.warning("%s server %s is unhealthy: %r", self.role, server.url, exc)
                server.healthy = False

        await asyncio.gather(*(one(server) for server in self.servers))


class EncoderFailed(Exception):
    """The encoder failed before the language server had the prompt: worth another encoder."""


class LanguageFailed(Exception):
    """The language server failed before streaming a token (refused the connection, died,
    ended the stream): worth another language server."""


class Dispatcher:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.encoders = ServerSet("encode", settings.encode)
        self.languages = ServerSet("language", settings.language)
        token = settings.network.auth_token
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(settings.request_timeout,
                                                              connect=5.0),
                                        limits=httpx.Limits(max_connections=None,
                                                            max_keepalive_connections=256))
        self.outcomes: Counter[str] = Counter()
        self._background: set[asyncio.Task] = set()
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.client.aclose()

    async def check_health(self) -> None:
        await asyncio.gather(self.encoders.check(self.client, self.headers),
                             self.languages.check(self.client, self.headers))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            await self.check_health()

    @property
    def model(self) -> str | None:
        for server in self.languages.servers + self.encoders.servers:
            if server.healthy and server.info is not None:
                return server.info.model
        return None

    @property
    def max_model_len(self) -> int | None:
        lengths = [s.info.max_model_len for s in self.languages.servers + self.encoders.servers
                   if s.healthy and s.info is not None and s.info.max_model_len]
        return min(lengths, default=None)

    @property
    def sampling_defaults(self) -> dict[str, float]:
        for server in self.languages.servers:
            if server.healthy and server.info is not None:
                return server.info.sampling_defaults
        return {}

    @property
    def healthy(self) -> bool:
        return (any(s.healthy for s in self.encoders.servers)
                and any(s.healthy for s in self.languages.servers))

    def server_health(self) -> dict[str, tuple[int, int]]:
        return {group.role: (sum(s.healthy for s in group.servers), len(group.servers))
                for group in (self.encoders, self.languages)}

    def in_flight(self) -> dict[str, int]:
        return {server.url: server.in_flight
                for group in (self.encoders, self.languages) for server in group.servers}

    async def generate(self, prompt: PromptInput, params: SamplingParams,
                       request_id: str) -> AsyncIterator[TokenEvent]:
        """Token events of one request; ApiError before the first one if it cannot run."""
        tried: set[str] = set()
        last = ""
        for attempt in range(self.settings.encode_retries + 1):
            try:
                encoder = self.encoders.pick(tried)
                language = self.languages.pick(tried)
            except ApiError as exc:
                if not last:
                    raise
                raise ApiError(503, f"{exc.message} to retry on; last failure: {last}") from None
            try:
                async with contextlib.aclosing(self._attempt(
                        encoder, language, prompt, params, request_id)) as events:
                    async for event in events:
                        yield event
                return
            except (EncoderFailed, LanguageFailed) as exc:
                failed, counter = ((encoder, "encoder_retries") if isinstance(exc, EncoderFailed)
                                   else (language, "language_retries"))
                tried.add(failed.url)
                self.outcomes[counter] += 1
                log.warning("request %s: %s server %s failed before the first token (%s); "
                            "attempt %d of %d", request_id, failed.role, failed.url, exc,
                            attempt + 1, self.settings.encode_retries + 1)
                last = str(exc)
        raise ApiError(503, f"every attempt failed; last: {last}")

    async def _attempt(self, encoder: Server, language: Server, prompt: PromptInput,
                       params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        room = secrets.randbits(63)
        bootstrap = encoder.info.bootstrap
        encoding = asyncio.create_task(self._encode(encoder, room, prompt, request_id))
        events = self._generate(language, room, bootstrap, params, request_id)
        next_event = asyncio.ensure_future(anext(events))
        finished = False
        choices_left = params.n
        try:
            with language.hold():
                await asyncio.wait({encoding, next_event}, return_when=asyncio.FIRST_COMPLETED)
                if encoding.done() and not next_event.done():
                    if LANGUAGE_ABORT in str(encoding.exception() or ""):
                        # The language server ended the room (say, the prompt is longer than
                        # its KV cache): its own event says why; a 4xx is no cause to retry.
                        await asyncio.wait({next_event}, timeout=ABORT_TIMEOUT_S)
                        refusal = next_event.result() if next_event.done() else None
                        if isinstance(refusal, ErrorEvent) and refusal.status < 500:
                            raise ApiError(refusal.status, refusal.message)
                    encoding.result()  # raises ApiError (client's fault) or EncoderFailed
                while True:
                    event = await next_event
                    if isinstance(event, ErrorEvent):
                        if event.status < 500:
                            raise ApiError(event.status, event.message)  # the client's
                        if event.type == TRANSFER_FAILED:
                            await self._blame_transfer(encoder, room, encoding, event)
                        raise ApiError(event.status, event.message)
                    choices_left -= event.finish_reason is not None
                    # NOTE: before the yield: a caller that has every choice's last event
                    # closes this generator there, and that is no reason to abort the room
                    finished = not choices_left
                    yield event
                    if finished:
                        return
                    next_event = asyncio.ensure_future(anext(events))
        finally:
            if not next_event.done():
                next_event.cancel()
            if not finished:
                self._spawn(self._abort(language, room))
                if not encoding.done():
                    encoding.cancel()
                    self._spawn(self._abort(encoder, room))
            self._spawn(self._close_events(events, finished))
            # The encoder answers once it hears the prompt arrived, maybe after the last token.
            encoding.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _blame_transfer(self, encoder: Server, room: int, encoding: asyncio.Task,
                              event: ErrorEvent) -> NoReturn:
        """The language server says the prompt never arrived; the encoder's own answer says
        why. One it has not given yet is asked for by aborting the room there: an encoder that
        does not take the abort, or answers nothing after it, is dead or hung. Raises the
        encoder's refusal of the client's input (ApiError 4xx), else EncoderFailed: worth
        another encoder."""
        if not encoding.done() and not await self._abort(encoder, room):
            encoder.healthy = False
            raise EncoderFailed(f"{encoder.url} does not answer; the language server says: "
                                f"{event.message}")
        await asyncio.wait({encoding}, timeout=ABORT_TIMEOUT_S)
        if not encoding.done():
            raise EncoderFailed(f"{encoder.url} took the abort but does not answer; the "
                                f"language server says: {event.message}")
        try:
            encoding.result()
        except ApiError as exc:
            if exc.status != ABORTED:
                raise
        raise EncoderFailed(f"transfer from {encoder.url} failed: {event.message}")

    async def _encode(self, server: Server, room: int, prompt: PromptInput,
                      request_id: str) -> None:
        body = msgspec.json.encode(EncodeRequest(room, prompt, request_id))
        try:
            with server.hold():
                response = await self.client.post(f"{server.url}/encode", content=body,
                                                   headers=self.headers)
        except httpx.HTTPError as exc:
            server.healthy = False
            raise EncoderFailed(f"{server.url} unreachable: {exc!r}") from None
        if response.status_code < 400:
            return
        message = _error_message(response)
        if response.status_code < 500:
            raise ApiError(response.status_code, message)
        raise EncoderFailed(f"{server.url}: {message}")

    async def _generate(self, server: Server, room: int, bootstrap: str,
                        params: SamplingParams, request_id: str) -> AsyncIterator[Event]:
        """The language server's events; LanguageFailed if it fails before the first token,
        an ErrorEvent if after."""
        body = msgspec.json.encode(GenerateRequest(room, bootstrap, params, request_id))
        tokens = 0
        try:
            async with self.client.stream("POST", f"{server.url}/generate", content=body,
                                          headers=self.headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    yield ErrorEvent(_error_message(response), response.status_code)
                    return
                async for line in ndjson_lines(response.aiter_bytes()):
                    event = msgspec.json.decode(line, type=Event)
                    tokens += isinstance(event, TokenEvent)
                    yield event
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            yield ErrorEvent(f"language server {server.url} sent a bad event: {exc}", 502)
            return
        except httpx.HTTPError as exc:
            server.healthy = False
            if not tokens:
                raise LanguageFailed(f"{server.url} failed: {exc!r}") from None
            yield ErrorEvent(f"language server {server.url} failed after {tokens} tokens: "
                             f"{exc!r}", 503)
            return
        if not tokens:
            raise LanguageFailed(f"{server.url} ended the stream before the first token")
        yield ErrorEvent(f"language server {server.url} ended the stream early, after {tokens} "
                         "tokens", 503)

    async def _abort(self, server: Server, room: int) -> bool:
        """Abort ``room`` on ``server``; False if the server did not take it."""
        try:
            response = await self.client.post(f"{server.url}/abort", headers=self.headers,
                                              timeout=ABORT_TIMEOUT_S,
                                              content=msgspec.json.encode(AbortRequest(room)))
        except (httpx.HTTPError, RuntimeError):  # RuntimeError: shutting down
            return False
        return response.status_code < 400

    @staticmethod
    async def _close_events(events: AsyncIterator[Event], finished: bool) -> None:
        """End the language server's stream. A finished one is read to its end first (the
        server ends it right after the last event), so that its connection goes back to the
        pool: closed early, it is dropped, and the next request pays a new connection."""
        with contextlib.suppress(Exception):
            if finished:
                async with asyncio.timeout(ABORT_TIMEOUT_S):
                    async for _ in events:
                        pass
            await events.aclose()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def ndjson_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-empty lines of an NDJSON stream, split on b"\\n" only.

    NOTE: not ``aiter_lines``: it splits like ``str.splitlines``, also on U+2028, U+2029 and
    U+0085, which JSON strings (a generated token's text) carry unescaped."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"
