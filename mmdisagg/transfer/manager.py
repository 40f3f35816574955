"""What the sending and the receiving transfer manager share: one per process, owning the pool,
the control channel, the data plane, the peers and the loop thread.

The loop thread receives control messages, then ticks (timeouts, heartbeats, retries). Public
methods called from a server's scheduler take the manager's lock briefly and never block on
the network: the scheduler polls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.core import RecentRooms
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.control import ControlChannel
from mmdisagg.transfer.planes import plane_class
from mmdisagg.transfer.protocol import ControlCodec, Heartbeat, Message, Poll

log = logging.getLogger(__name__)

TICK_S = 0.05
RECENT_ROOMS = 65536


@dataclass
class Peer:
    id: str
    endpoint: str
    last_heard: float
    rooms: set[int] = field(default_factory=set)


class RoomTransfer:
    """What a room's sender and receiver share: its ``Poll`` state and why it failed."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.state = Poll.Bootstrapping
        self.failure: str | None = None
        self._over = threading.Event()

    def poll(self) -> Poll:
        return self.state

    def wait(self, timeout: float | None = None) -> Poll:
        """Block until Success or Failed (or the timeout); for tools and tests, since a
        scheduler polls instead."""
        self._over.wait(timeout)
        return self.state

    def _end(self, state: Poll, failure: str | None = None) -> None:
        self.state = state
        self.failure = failure
        self._over.set()


@dataclass
class TransferStats:
    """Counters a server exports as metrics."""

    rooms_started: int = 0
    rooms_succeeded: int = 0
    rooms_failed: int = 0
    windows: int = 0
    resumes: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    spills: int = 0
    cached_tokens: int = 0  # prompt tokens not sent: the receiver's prefix cache held them
    refused: int = 0
    peers_lost: int = 0


class TransferManager:
    role = "transfer"

    def __init__(self, pool: EmbeddingPool, transfer: TransferSettings,
                 network: NetworkSettings) -> None:
        self.pool = pool
        self.settings = transfer
        self.network = network
        self.id = f"{self.role}-{uuid.uuid4().hex[:12]}"
        self.codec = ControlCodec(network.auth_token, self.id)
        self.control = ControlChannel(self.codec, network.host, transfer.control_port,
                                      network.reachable_host)
        self.plane = plane_class(transfer.transfer_backend).create(pool, transfer, network, self.id)
        self.stats = TransferStats()
        self._lock = threading.RLock()
        self._peers: dict[str, Peer] = {}
        self._recent = RecentRooms(RECENT_ROOMS)
        self._next_heartbeat = 0.0
        self.last_turn = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{self.role}-loop", daemon=True)

    def _window_start(self, token: int) -> int:
        """Where the window that holds ``token`` starts: windows start on blocks."""
        return token - token % self.pool.layout.block_size

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop the loop and the plane; the pool stays with its owner."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.plane.close()
        self.control.close()

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            received = self.control.receive(TICK_S)
            with self._lock:
                now = time.monotonic()
                self._turned(now - self.last_turn)
                self.last_turn = now
            for source, message in received:
                with self._lock:
                    peer = self._peers.get(source)
                    if peer is not None:
                        peer.last_heard = time.monotonic()
                    if not isinstance(message, Heartbeat):
                        self._handle(source, peer, message)
            with self._lock:
                now = time.monotonic()
                self._tick(now)
                self._check_peers(now)

    def _declare_dead(self, peer: Peer, reason: str) -> None:
        self.stats.peers_lost += 1
        del self._peers[peer.id]
        self.control.forget(peer.endpoint)
        self._peer_lost(peer, reason)

    def _check_peers(self, now: float) -> None:
        heartbeat = now >= self._next_heartbeat
        if heartbeat:
            self._next_heartbeat = now + self.settings.heartbeat_interval
        for peer in list(self._peers.values()):
            silent = now - peer.last_heard
            if silent > self.settings.heartbeat_timeout:
                log.warning("peer %s (%s) silent for %.1fs: declaring it dead", peer.id,
                            peer.endpoint, silent)
                self._declare_dead(peer, f"peer {peer.id} stopped answering (no heartbeat for "
                                         f"{silent:.1f}s)")
            elif heartbeat:
                self.control.send(peer.endpoint, Heartbeat())

    # -- for subclasses -------------------------------------------------------------------

    def _handle(self, source: str, peer: Peer | None, message: Message) -> None:
        raise NotImplementedError

    def _tick(self, now: float) -> None:
        raise NotImplementedError

    def _turned(self, gap: float) -> None:
        """The loop turns again, ``gap`` seconds after its last turn, before it reads what
        arrived meanwhile."""

    def _peer_lost(self, peer: Peer, reason: str) -> None:
        raise NotImplementedError

    def _finished(self, room: int) -> None:
        """Remember a finished room for a while, so late messages for it are not alarming."""
        self._recent.add(room)

    def _refuse(self, what: str) -> None:
        self.stats.refused += 1
        log.warning("refused: %s", what)
