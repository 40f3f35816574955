"""What the router and the servers say to each other over HTTP: one struct per message, one
codec (msgspec JSON). Imports nothing of ours but ``core``."""

from __future__ import annotations

from typing import Any

import msgspec

from mmdisagg.core import SamplingParams


class EncodeRequest(msgspec.Struct, frozen=True):
    """Router -> encode server: prepare, encode and send this chat to ``room``'s receiver."""

    room: int
    messages: list[dict[str, Any]]
    request_id: str = ""


class EncodeResult(msgspec.Struct, frozen=True):
    """Encode server -> router, once the language server has every token."""

    total_tokens: int
    images: int


class GenerateRequest(msgspec.Struct, frozen=True):
    """Router -> language server: receive ``room`` from the encode server whose bootstrap
    endpoint is ``encoder`` and generate with ``params``; the reply is a stream of events."""

    room: int
    encoder: str
    params: SamplingParams
    request_id: str = ""


class AbortRequest(msgspec.Struct, frozen=True):
    room: int


class TokenEvent(msgspec.Struct, frozen=True, tag="token", tag_field="event"):
    """New text of one request (``text`` may be empty while a stop string is possible)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


TRANSFER_FAILED = "transfer_failed"


class ErrorEvent(msgspec.Struct, frozen=True, tag="error", tag_field="event"):
    """The request failed; ``status`` is the HTTP status a client should see. ``type``
    TRANSFER_FAILED: the prompt never arrived (nothing was generated)."""

    message: str
    status: int
    type: str = "server_error"


Event = TokenEvent | ErrorEvent


class ServerInfo(msgspec.Struct, frozen=True):
    """``GET /info`` of an encode or language server: what the router routes by."""

    role: str
    model: str
    load: int  # requests queued and running
    bootstrap: str | None = None
    max_model_len: int = 0  # most tokens, prompt and output together (0: not told)
    kv_block_size: int = 0  # language servers: tokens per KV-cache block
    kv_blocks: int = 0  # language servers: blocks in the KV cache
    kv_blocks_used: int = 0
    pool_free_blocks: int = 0  # free blocks of the embedding pool


encode = msgspec.json.encode


def decode(data: bytes | str, kind: Any) -> Any:
    return msgspec.json.decode(data, type=kind)
