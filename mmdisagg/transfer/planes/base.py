"""The data-plane interface: register the local pool once, write blocks, deliver the notice.

A plane moves the bytes of one window from the sender's pool blocks into the receiver's pool
blocks. The chunk notice (``ChunkDone``) goes over the control channel after ``write`` returns,
unless the plane carries it in band (``notifies_in_band``: tcp, where it must arrive after
the bytes on the same stream).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Protocol

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.protocol import ChunkDone


class PlaneError(RuntimeError):
    """This peer cannot be reached, or a write failed, on this data plane."""


class ChunkRefused(PlaneError):
    """The receiver will not take this chunk (wrong room, window or blocks); nothing landed.

    ``drain``: the chunk is a sender's late write for a room that just ended here (a race, not
    an attack): an in-band plane discards its payload and keeps the stream, which other rooms
    share, instead of closing it."""

    def __init__(self, message: str, drain: bool = False) -> None:
        super().__init__(message)
        self.drain = drain


class ChunkSink(Protocol):
    """The receiving manager as an in-band plane sees it."""

    def begin_chunk(self, source: str, notice: ChunkDone, blocks: Sequence[int]) -> None:
        """Check the chunk against the offered window and mark it landing, or raise
        ChunkRefused. ``blocks`` are the receiver blocks the sender says it writes."""

    def end_chunk(self, source: str, notice: ChunkDone, error: str | None) -> None:
        """The chunk's bytes are all in place (``error`` None) or the stream broke."""


class Link(ABC):
    """A sender's way into one receiver's pool."""

    @abstractmethod
    def write(self, src_blocks: Sequence[int], src_start: int, dst_blocks: Sequence[int],
              notice: ChunkDone) -> None:
        """Blocking: put ``notice.num_tokens`` tokens from the sender's blocks (request token
        ``src_start`` on) into ``dst_blocks`` (a window's, from row ``chunk_row(notice)`` of
        the first on). Raises PlaneError."""

    def close(self) -> None:
        """Release what the link holds."""


class DataPlane(ABC):
    name: ClassVar[str]
    notifies_in_band: ClassVar[bool] = False
    receiver_backing: ClassVar[str] = "process"

    def __init__(self, pool: EmbeddingPool, host: str, advertise_host: str, port: int,
                 auth_token: str, source: str, timeout_s: float) -> None:
        self.pool = pool
        self.host = host
        self.advertise_host = advertise_host
        self.port = port
        self.auth_token = auth_token
        self.source = source
        self.timeout_s = timeout_s

    @classmethod
    def create(cls, pool: EmbeddingPool, transfer: TransferSettings, network: NetworkSettings,
               source: str) -> DataPlane:
        """The plane a transfer manager runs; a plane with knobs of its own (a settings group
        inside ``transfer``) overrides this to pass them on."""
        return cls(pool, network.host, network.reachable_host, transfer.data_port,
                   network.auth_token, source, transfer.transfer_timeout)

    @abstractmethod
    def listen(self, sink: ChunkSink) -> dict:
        """Receiving side: start taking chunks; return what a sender needs to reach us."""

    @abstractmethod
    def connect(self, description: dict, peer_layout: dict) -> Link:
        """Sending side: a link to the receiver ``description`` names, or PlaneError."""

    def close(self) -> None:
        """Stop receiving and release registered memory."""
