"""One OpenAI-compatible endpoint seen through the official ``openai`` client: check it, learn
which extensions it takes, and send one streamed request, timestamping every output chunk."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from mmdisagg.bench.metrics import RequestRecord
from mmdisagg.bench.workload import ChatRequest

EXTENSIONS = ("ignore_eos", "return_token_ids")


class EndpointError(Exception):
    """The endpoint cannot be benchmarked (unreachable, wrong key, unknown model)."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str = "none"
    timeout_s: float = 300.0
    temperature: float = 0.0
    extensions: tuple[str, ...] = ()  # of EXTENSIONS, those the server accepts
    response_format: dict[str, Any] | None = None  # sent with every request when set

    def client(self) -> AsyncOpenAI:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                           timeout=self.timeout_s,
                           http_client=httpx.AsyncClient(limits=limits, timeout=self.timeout_s))

    def extra_body(self) -> dict[str, bool]:
        return dict.fromkeys(self.extensions, True)


async def connect(endpoint: Endpoint) -> Endpoint:
    """The endpoint with its model filled in (the first one served, when none is given) and the
    extensions it accepts. EndpointError with a reason when it cannot be used."""
    async with endpoint.client() as client:
        model = endpoint.model
        try:
            served = [m.id for m in (await client.models.list()).data]
        except openai.APIConnectionError as exc:
            raise EndpointError(f"cannot reach {endpoint.base_url}: {exc.__cause__ or exc}"
                                ) from None
        except openai.AuthenticationError:
            raise EndpointError(f"{endpoint.base_url} refused the API key (--api-key)") from None
        except openai.APIStatusError as exc:
            if not model:  # some servers cannot list models; then the user must name one
                raise EndpointError(f"{endpoint.base_url}/models answered {exc.status_code}; "
                                    "name the model with --model") from None
            served = [model]
        if not model:
            if not served:
                raise EndpointError(f"{endpoint.base_url} serves no model")
            model = served[0]
        accepted = []
        for extension in EXTENSIONS:
            try:
                await client.chat.completions.create(
                    model=model, max_tokens=1, extra_body={extension: True},
                    messages=[{"role": "user", "content": "Hi"}])
            except openai.APIConnectionError as exc:
                raise EndpointError(f"cannot reach {endpoint.base_url}: {exc}") from None
            except openai.NotFoundError:
                raise EndpointError(f"{endpoint.base_url} does not serve the model {model!r} "
                                    f"(it serves {', '.join(served) or 'none'})") from None
            except openai.APIStatusError as exc:
                if exc.status_code not in (400, 422):
                    raise EndpointError(f"a first request to {endpoint.base_url} failed: "
                                        f"HTTP {exc.status_code}: {exc.message}") from None
                continue
            accepted.append(extension)
    return replace(endpoint, model=model, extensions=tuple(accepted))


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, openai.APIError):
        return "stream_error"
    return type(exc).__name__


async def send(client: AsyncOpenAI, endpoint: Endpoint, request: ChatRequest) -> RequestRecord:
    """Stream one request; every exception becomes the record's error kind."""
    record = RequestRecord(request.index, request.group, start=time.perf_counter())
    chunks = 0
    try:
        structured = ({"response_format": endpoint.response_format}
                      if endpoint.response_format else {})
        stream = await client.chat.completions.create(
            model=endpoint.model, messages=request.messages, max_tokens=request.max_tokens,
            temperature=endpoint.temperature, stream=True,
            stream_options={"include_usage": True}, extra_body=endpoint.extra_body(),
            **structured)
        async for chunk in stream:
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
                record.prompt_tokens = chunk.usage.prompt_tokens
            if chunk.choices and _carries_output(chunk.choices[0]):
                record.chunk_times.append(time.perf_counter())
                record.text += chunk.choices[0].delta.content or ""
                chunks += 1
        if not chunks:
            record.error, record.error_message = "no_output", "the reply carried no output"
    except Exception as exc:  # any failure is a result to count, not a crash
        record.error, record.error_message = error_kind(exc), str(exc)[:500]
    record.end = time.perf_counter()
    if not record.output_tokens:  # a server that sends no usage: one token per chunk
        record.output_tokens = chunks
    return record


def _carries_output(choice) -> bool:
    """Text, or (``return_token_ids``) token ids: a token can decode to no text yet."""
    return bool(choice.delta.content) or bool((choice.model_extra or {}).get("token_ids"))
