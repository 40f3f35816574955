"""The transfer protocol: control messages, their one codec, and the ``Poll`` states.

Control messages travel over ZeroMQ as four frames ``[VERSION, auth token, source manager id,
body]``; the body is a msgpack-encoded tagged struct. Registration travels over HTTP as JSON.
NOTE: metadata (total length, mrope delta) only ever travels in these messages; it is never
written to or read back from pool blocks (seed note 05).
"""

from __future__ import annotations

import hmac
from enum import IntEnum

import msgspec

from mmdisagg.core import ImageSpan

VERSION = b"mmdisagg-control/2"


class ProtocolError(ValueError):
    """A message that is malformed, unauthenticated or of another protocol version."""


class Poll(IntEnum):
    """Ordered so that the least advanced of several transfers is their ``min()``."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class Window(msgspec.Struct, tag="window", frozen=True):
    """Receiver -> sender: write tokens from ``start_token`` on into these blocks."""

    room: int
    start_token: int
    blocks: list[int]
    allocated_tokens: int


class Announce(msgspec.Struct, tag="announce", frozen=True):
    """Sender -> receiver: the prompt's length, known right after tokenizing, and the chain
    hashes of its full blocks (``core.block_hashes``) for the receiver's prefix cache, with
    the images in its last partial block (``core.tail_images``): the receiver continues the
    chain over the tokens it generates, so that a next turn finds them."""

    room: int
    total_tokens: int
    block_hashes: list[bytes] = []
    tail_images: list[ImageSpan] = []


class Cached(msgspec.Struct, tag="cached", frozen=True):
    """Receiver -> sender, in answer to ``Announce`` when the receiver has a prefix cache: it
    already holds the first ``tokens`` tokens (0: none); send from there on, never before.
    A sender to such a receiver writes nothing until it has this answer."""

    room: int
    tokens: int


class ChunkDone(msgspec.Struct, tag="chunk", frozen=True, omit_defaults=True):
    """Sender -> receiver: tokens ``[start_token, start_token + num_tokens)`` are in place in
    the window that holds ``start_token``. A chunk starts at its window's start, except the
    first after a prefix-cache hit: it starts at the first uncached token, row ``chunk_row``
    of its window's first block (the rows before it are never written).

    ``visual_runs``: (first, count) runs of those tokens, counted from ``start_token``, whose
    deepstack rows came too (pools with deepstack rows only; empty, and not on the wire, for
    text)."""

    room: int
    start_token: int
    num_tokens: int
    total_tokens: int
    mrope_delta: int
    visual_runs: tuple[tuple[int, int], ...] = ()


def chunk_row(notice: ChunkDone, block_size: int) -> int:
    """The row of its window's first block where a chunk's first token lands (windows start
    on blocks)."""
    return notice.start_token % block_size


class Received(msgspec.Struct, tag="received", frozen=True):
    """Receiver -> sender: every token arrived; the sender may free its blocks."""

    room: int


class Abort(msgspec.Struct, tag="abort", frozen=True):
    """Either way: this room is over; free everything it holds."""

    room: int
    reason: str


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    """Either way, every heartbeat interval: the sending manager is alive."""


Message = Window | Announce | Cached | ChunkDone | Received | Abort | Heartbeat


class Registration(msgspec.Struct, frozen=True):
    """Receiver -> encode side's bootstrap endpoint, once per encode server."""

    receiver: str
    control_endpoint: str
    backend: str
    layout: dict
    plane: dict
    prefix_cache: bool = False  # it answers every Announce with Cached


class PeerInfo(msgspec.Struct, frozen=True):
    """The bootstrap endpoint's answer: where to send windows."""

    sender: str
    control_endpoint: str
    backend: str
    layout: dict


class ControlCodec:
    """Frames and unframes control messages; refuses a wrong version or auth token."""

    def __init__(self, auth_token: str, source: str) -> None:
        self._token = auth_token.encode()
        self._source = source.encode()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Message)

    def encode(self, message: Message) -> list[bytes]:
        return [VERSION, self._token, self._source, self._encoder.encode(message)]

    def decode(self, frames: list[bytes]) -> tuple[str, Message]:
        """(source manager id, message)."""
        if len(frames) != 4:
            raise ProtocolError(f"expected 4 frames, got {len(frames)}")
        version, token, source, body = frames
        if version != VERSION:
            raise ProtocolError(f"protocol version {bytes(version)[:40]!r}, expected {VERSION!r}")
        if not hmac.compare_digest(bytes(token), self._token):
            raise ProtocolError("wrong or missing auth token")
        try:
            return bytes(source).decode(), self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError,
                RecursionError) as exc:  # msgspec skips an unknown field recursively
            raise ProtocolError(f"malformed control message: {exc}") from None

    def authentic(self, token: str | None) -> bool:
        return hmac.compare_digest((token or "").encode(), self._token)
