"""Cross-host data plane over a plain TCP stream.

Each chunk is ``MAGIC, u32 header length, header, payload``. The receiver checks the header
(auth token, room, window, block ids) with its manager *before* any payload byte lands, then
receives the payload with ``recv_into`` straight into the window's blocks: no intermediate
buffer. The header doubles as the chunk notice, so it is acted on only once every byte is in.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
import struct
import threading
from collections.abc import Sequence

import msgspec

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.pool.layout import runs_problem
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.planes.base import ChunkRefused, ChunkSink, DataPlane, Link, PlaneError
from mmdisagg.transfer.protocol import ChunkDone, chunk_row

log = logging.getLogger(__name__)

MAGIC = b"MMDTCP01"
PREFIX = struct.Struct("<8sI")
MAX_HEADER = 1 << 16
SOCKET_BUFFER = 4 << 20


class ChunkHeader(msgspec.Struct, frozen=True):
    auth_token: str
    sender: str
    notice: ChunkDone
    blocks: list[int]


_header_decoder = msgspec.msgpack.Decoder(ChunkHeader)
_header_encoder = msgspec.msgpack.Encoder()


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean end of stream before the first byte."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError(f"stream ended after {got} of {len(view)} bytes")
        got += n
    return True


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class TcpLink(Link):
    """One stream to a receiver's data port. Once it breaks (a cut connection, a receiver that
    closed it), the next write opens a new one: the receiver takes any number of streams."""

    def __init__(self, plane: TcpPlane, address: tuple[str, int]) -> None:
        self.plane = plane
        self.address = address
        self.sock: socket.socket | None = self._connect()
        self.view = memoryview(plane.pool.arrays.buffer.numpy())

    def _connect(self) -> socket.socket:
        host, port = self.address
        try:
            sock = socket.create_connection(self.address, timeout=self.plane.timeout_s)
        except OSError as exc:
            raise PlaneError(f"cannot connect to tcp data port {host}:{port}: {exc}") from exc
        _tune(sock)
        return sock

    def write(self, src_blocks: Sequence[int], src_start: int, dst_blocks: Sequence[int],
              notice: ChunkDone) -> None:
        layout = self.plane.pool.layout
        used = -(-(chunk_row(notice, layout.block_size) + notice.num_tokens) // layout.block_size)
        header = _header_encoder.encode(ChunkHeader(
            self.plane.auth_token, self.plane.source, notice, list(dst_blocks[:used])))
        if self.sock is None:
            self.sock = self._connect()
        try:
            self.sock.sendall(PREFIX.pack(MAGIC, len(header)) + header)
            for offset, size in layout.byte_ranges(src_blocks, src_start, notice.num_tokens,
                                                   notice.visual_runs):
                self.sock.sendall(self.view[offset: offset + size])
        except OSError as exc:
            self.close()
            raise PlaneError(f"tcp data stream broke: {exc}") from exc

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class TcpPlane(DataPlane):
    name = "tcp"
    notifies_in_band = True

    def __init__(self, pool: EmbeddingPool, host: str, advertise_host: str, port: int,
                 auth_token: str, source: str, timeout_s: float, advertise_port: int = 0) -> None:
        super().__init__(pool, host, advertise_host, port, auth_token, source, timeout_s)
        self.advertise_port = advertise_port

    @classmethod
    def create(cls, pool: EmbeddingPool, transfer: TransferSettings, network: NetworkSettings,
               source: str) -> TcpPlane:
        return cls(pool, network.host, network.reachable_host, transfer.data_port,
                   network.auth_token, source, transfer.transfer_timeout,
                   transfer.advertise_data_port)

    def listen(self, sink: ChunkSink) -> dict:
        self._sink = sink
        self._closing = False
        self._server = socket.create_server((self.host, self.port), backlog=128)
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self._accept, name="tcp-accept", daemon=True).start()
        return {"host": self.advertise_host,
                "port": self.advertise_port or self._server.getsockname()[1]}

    def connect(self, description: dict, peer_layout: dict) -> Link:
        try:
            address = (str(description["host"]), int(description["port"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlaneError(f"bad tcp plane description {description!r}") from exc
        return TcpLink(self, address)

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            _tune(conn)
            self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="tcp-recv",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pool_view = memoryview(self.pool.arrays.buffer.numpy())
        prefix = bytearray(PREFIX.size)
        try:
            while True:
                conn.settimeout(None)
                if not _recv_exact(conn, memoryview(prefix)):
                    return
                conn.settimeout(self.timeout_s)
                header = self._read_header(conn, prefix)
                try:
                    self._sink.begin_chunk(header.sender, header.notice, header.blocks)
                except ChunkRefused as exc:
                    if not exc.drain:
                        raise
                    log.info("tcp data plane: discarding a late chunk: %s", exc)
                    self._discard(conn, header.notice)
                    continue
                error = None
                try:
                    layout = self.pool.layout
                    for offset, size in layout.byte_ranges(
                            header.blocks, chunk_row(header.notice, layout.block_size),
                            header.notice.num_tokens, header.notice.visual_runs):
                        if not _recv_exact(conn, pool_view[offset: offset + size]):
                            raise ConnectionError("stream ended inside a chunk")
                except OSError as exc:
                    error = f"tcp data stream broke mid-chunk: {exc}"
                self._sink.end_chunk(header.sender, header.notice, error)
                if error:
                    return
        except ChunkRefused as exc:
            log.warning("tcp data plane: chunk refused, closing the connection: %s", exc)
        except (OSError, ValueError) as exc:
            if not self._closing:
                log.warning("tcp data plane: closing connection: %s", exc)
        finally:
            self._connections.discard(conn)
            conn.close()

    def _discard(self, conn: socket.socket, notice: ChunkDone) -> None:
        """Read and drop a chunk's payload (bounded by what the pool could ever hold)."""
        layout, num_tokens = self.pool.layout, notice.num_tokens
        if not 0 <= num_tokens <= layout.num_blocks * layout.block_size or runs_problem(
                notice.visual_runs, num_tokens):
            raise ValueError(f"chunk of {num_tokens} tokens cannot be discarded")
        left = layout.chunk_bytes(num_tokens, notice.visual_runs)
        scratch = memoryview(bytearray(min(left, 1 << 20) or 1))
        while left:
            n = conn.recv_into(scratch[: min(left, len(scratch))])
            if n == 0:
                raise ConnectionError("stream ended inside a discarded chunk")
            left -= n

    def _read_header(self, conn: socket.socket, prefix: bytearray) -> ChunkHeader:
        magic, length = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ValueError(f"not an mmdisagg data stream (magic {magic!r})")
        if not 0 < length <= MAX_HEADER:
            raise ValueError(f"chunk header of {length} bytes")
        raw = bytearray(length)
        if not _recv_exact(conn, memoryview(raw)):
            raise ValueError("stream ended inside a chunk header")
        try:
            header = _header_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise ValueError(f"malformed chunk header: {exc}") from None
        if not hmac.compare_digest(header.auth_token.encode(), self.auth_token.encode()):
            raise ValueError("chunk header with a wrong auth token")
        return header

    def close(self) -> None:
        self._closing = True
        if hasattr(self, "_server"):
            self._server.close()
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
