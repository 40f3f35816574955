"""The disaggregated backend: each request goes to one encode and one language server at once.

Both get the same random 63-bit room; the language server pre-allocates while the encoder
works. Servers are chosen least-loaded among the healthy ones (health checked periodically).
An encoder that fails before the language server has the prompt is replaced by another, under
a new room; a client that goes away aborts the request on both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec

from mmdisagg.config import RouterSettings
from mmdisagg.core import PromptInput, SamplingParams
from mmdisagg.httpapp import ApiError
from mmdisagg.messages import (
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

HEALTH_TIMEOUT_S = 2.0
ENCODER_VERDICT_S = 2.0


@dataclass
class Server:
    url: str
    role: str
    healthy: bool = False
    in_flight: int = 0
    info: ServerInfo | None = None


class ServerSet:
    """The servers of one role, their health, and the least-loaded choice."""

    def __init__(self, role: str, urls: tuple[str, ...]) -> None:
        self.role = role
        self.servers = [Server(url.rstrip("/"), role) for url in urls]

    def pick(self, exclude: set[str]) -> Server:
        healthy = [s for s in self.servers if s.healthy and s.url not in exclude]
        if not healthy:
            raise ApiError(503, f"no healthy {self.role} server available")
        least = min(s.in_flight for s in healthy)
        return random.choice([s for s in healthy if s.in_flight == least])

    async def check(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        async def one(server: Server) -> None:
            try:
                response = await client.get(f"{server.url}/info", headers=headers,
                                            timeout=HEALTH_TIMEOUT_S)
                response.raise_for_status()
                server.info = msgspec.json.decode(response.content, type=ServerInfo)
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


class LanguageUnreachable(Exception):
    """The language server refused the connection, so it never saw the request: worth
    another language server."""


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
                async for event in self._attempt(encoder, language, prompt, params,
                                                 request_id):
                    yield event
                return
            except (EncoderFailed, LanguageUnreachable) as exc:
                failed, counter = ((encoder, "encoder_retries") if isinstance(exc, EncoderFailed)
                                   else (language, "language_retries"))
                tried.add(failed.url)
                self.outcomes[counter] += 1
                log.warning("request %s: %s server %s failed before sending (%s); attempt %d "
                            "of %d", request_id, failed.role, failed.url, exc, attempt + 1,
                            self.settings.encode_retries + 1)
                last = str(exc)
        raise ApiError(503, f"every attempt failed; last: {last}")

    async def _attempt(self, encoder: Server, language: Server, prompt: PromptInput,
                       params: SamplingParams, request_id: str) -> AsyncIterator[TokenEvent]:
        room = secrets.randbits(63)
        bootstrap = encoder.info.bootstrap
        encoder.in_flight += 1
        language.in_flight += 1
        encoding = asyncio.create_task(self._encode(encoder, room, prompt, request_id))
        events = self._generate(language, room, bootstrap, params, request_id)
        next_event = asyncio.ensure_future(anext(events))
        finished = False
        choices_left = params.n
        try:
            await asyncio.wait({encoding, next_event}, return_when=asyncio.FIRST_COMPLETED)
            if encoding.done() and not next_event.done():
                encoding.result()  # raises ApiError (client's fault) or EncoderFailed
            while True:
                event = await next_event
                if isinstance(event, ErrorEvent):
                    # A dead encoder fails both sides; its own error says whether to retry.
                    await asyncio.wait({encoding}, timeout=ENCODER_VERDICT_S)
                    if encoding.done() and encoding.exception() is not None:
                        encoding.result()
                    if event.type == TRANSFER_FAILED and not encoding.done():
                        # No prompt arrived and the encoder says nothing: it hangs.
                        raise EncoderFailed(f"{encoder.url} is silent; the language server "
                                            f"says: {event.message}")
                    raise ApiError(event.status, event.message)
                yield event
                choices_left -= event.finish_reason is not None
                if not choices_left:
                    finished = True
                    return
                next_event = asyncio.ensure_future(anext(events))
        finally:
            encoder.in_flight -= 1
            language.in_flight -= 1
            if not next_event.done():
                next_event.cancel()
            if not finished:
                self._spawn(self._abort(language, room))
                if not encoding.done():
                    encoding.cancel()
                    self._spawn(self._abort(encoder, room))
            self._spawn(self._close_events(events))
            # The encoder answers once it hears the prompt arrived, maybe after the last token.
            encoding.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _encode(self, server: Server, room: int, prompt: PromptInput,
                      request_id: str) -> None:
        body = msgspec.json.encode(EncodeRequest(room, prompt, request_id))
        try:
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
        body = msgspec.json.encode(GenerateRequest(room, bootstrap, params, request_id))
        try:
            async with self.client.stream("POST", f"{server.url}/generate", content=body,
                                          headers=self.headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    yield ErrorEvent(_error_message(response), response.status_code)
                    return
                async for line in ndjson_lines(response.aiter_bytes()):
                    yield msgspec.json.decode(line, type=Event)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            yield ErrorEvent(f"language server {server.url} sent a bad event: {exc}", 502)
            return
        except httpx.ConnectError as exc:
            server.healthy = False
            raise LanguageUnreachable(f"{server.url} unreachable: {exc!r}") from None
        except httpx.HTTPError as exc:
            yield ErrorEvent(f"language server {server.url} failed: {exc!r}", 503)
            return
        yield ErrorEvent(f"language server {server.url} ended the stream early", 503)

    async def _abort(self, server: Server, room: int) -> None:
        with contextlib.suppress(httpx.HTTPError, RuntimeError):  # RuntimeError: shutting down
            await self.client.post(f"{server.url}/abort", headers=self.headers, timeout=5.0,
                                   content=msgspec.json.encode(AbortRequest(room)))

    @staticmethod
    async def _close_events(events: AsyncIterator[Event]) -> None:
        with contextlib.suppress(Exception):
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
