"""A TCP proxy in front of a language server's tcp data port that follows the chunk framing
(``mmdisagg/transfer/planes/tcp.py``: prefix, header, payload) as it forwards, so that a test
can hold the stream or cut it at an exact place: before a chunk, or halfway through its
payload. The language server advertises the proxy (``--advertise-data-port``), so encode
servers connect to it as they would to the server itself."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mmdisagg.transfer.planes.tcp import PREFIX, _header_decoder
from mmdisagg.transfer.protocol import ChunkDone

Match = Callable[[ChunkDone], bool]


@dataclass
class Rule:
    """What to do to the first chunk ``match`` accepts: ``hold`` or ``cut`` it, ``before`` its
    header or halfway through its payload (``mid``)."""

    action: str
    where: str
    match: Match


class ChunkProxy:
    def __init__(self, target_port: int, token_bytes: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.token_bytes = token_bytes
        self._server = socket.create_server((host, 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._rule: Rule | None = None
        self._released = threading.Event()
        self._released.set()
        self.fired = threading.Event()  # the rule met its chunk
        self.fired_on: ChunkDone | None = None
        self.chunks = 0  # chunks forwarded whole
        self._sockets: set[socket.socket] = set()
        self._cut = False
        self._closing = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def arm(self, action: str, where: str, match: Match = lambda notice: True) -> None:
        """Hold or cut (``action``) the next chunk ``match`` accepts, ``before`` it or ``mid``
        payload. ``fired`` is set once it happened."""
        assert action in ("hold", "cut") and where in ("before", "mid")
        with self._lock:
            self._rule = Rule(action, where, match)
            self.fired.clear()
            self.fired_on = None

    def release(self) -> None:
        """Forward again (what was held goes on its way) and forget the rule."""
        with self._lock:
            self._rule = None
        self._released.set()

    def cut_held(self) -> None:
        """Cut the held connection instead: what it held is lost."""
        self._cut = True
        self.release()

    def close(self) -> None:
        self._closing = True
        self.release()
        self._server.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    # -- forwarding -----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets |= {client, upstream}
            threading.Thread(target=self._forward, args=(client, upstream), name="proxy",
                             daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                prefix = _read(client, PREFIX.size)
                if prefix is None:
                    break
                header = _read(client, PREFIX.unpack(prefix)[1])
                if header is None:
                    break
                notice = _header_decoder.decode(header).notice
                rule = self._take_rule(notice)
                if rule and rule.where == "before" and not self._apply(rule, notice,
                                                                       client, upstream):
                    return
                upstream.sendall(prefix + header)
                size = notice.num_tokens * self.token_bytes
                if not self._pipe(client, upstream, size // 2):
                    break
                if rule and rule.where == "mid" and not self._apply(rule, notice,
                                                                    client, upstream):
                    return
                if not self._pipe(client, upstream, size - size // 2):
                    break
                self.chunks += 1
            upstream.shutdown(socket.SHUT_WR)  # the sender ended its stream: so do we
        except OSError:
            _reset(client)
            _reset(upstream)

    def _take_rule(self, notice: ChunkDone) -> Rule | None:
        with self._lock:
            rule = self._rule
            if rule is None or not rule.match(notice):
                return None
            self._rule = None
            if rule.action == "hold":
                self._released.clear()
            return rule

    def _apply(self, rule: Rule, notice: ChunkDone, client: socket.socket,
               upstream: socket.socket) -> bool:
        """False: the connection was cut."""
        self.fired_on = notice
        self.fired.set()
        if rule.action == "cut":
            _reset(client)
            _reset(upstream)
            return False
        self._released.wait()
        if self._cut:
            self._cut = False
            _reset(client)
            _reset(upstream)
            return False
        return True

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, size: int) -> bool:
        """Forward ``size`` bytes; False if the source ended first."""
        while size:
            data = source.recv(min(size, 1 << 20))
            if not data:
                return False
            sink.sendall(data)
            size -= len(data)
        return True


def _read(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a cut cable or a crashed middlebox would look."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
