"""Encode side of the transfer: ``SenderManager`` (one per process) and ``EmbeddingSender``
(one per request room).

The encode server writes a prompt's embeddings into blocks of its own pool and hands the
allocation to ``send``, perhaps before every row is written (``ready``: a prompt whose images
are encoded in stages), then says how far it got (``extend``). The sender fills the receiver's
windows in order, as they are offered and as rows are ready: a chunk per window, or several
when rows come in stages, so that the language side can start on the first ones. It frees its
blocks once the receiver confirms (``Received``) or the room fails. Windows may arrive before
the encode request does: they wait, bounded by the bootstrap timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.core import ImageSpan
from mmdisagg.messages import LANGUAGE_ABORT
from mmdisagg.pool.allocator import Allocation
from mmdisagg.pool.layout import PoolLayout, Runs, runs_within
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.bootstrap import BootstrapRefused, BootstrapServer
from mmdisagg.transfer.manager import Peer, RoomTransfer, TransferManager
from mmdisagg.transfer.planes.base import Link, PlaneError
from mmdisagg.transfer.protocol import (
    Abort,
    Announce,
    Cached,
    ChunkDone,
    Message,
    PeerInfo,
    Poll,
    Received,
    Registration,
    Window,
)

log = logging.getLogger(__name__)


class EmbeddingSender(RoomTransfer):
    """One request's sending half. All state changes happen in its manager, under its lock."""

    def __init__(self, manager: SenderManager, room: int) -> None:
        super().__init__(room)
        self._manager = manager
        self.total_tokens: int | None = None
        self.block_hashes: list[bytes] = []
        self.tail_images: list[ImageSpan] = []
        # Tokens the receiver already holds (its prefix cache): None until it said; nothing is
        # written before. Sending starts at the first token it lacks.
        self.cached_tokens: int | None = None
        self.sent_tokens = 0
        self.ready_tokens = 0  # rows written in ``source`` (from token 0)
        self.mrope_delta = 0
        self.visual_runs: Runs = ()
        self.peer: Peer | None = None
        self.windows: dict[int, Window] = {}
        self.source: Allocation | None = None
        self.created = self.last_progress = time.monotonic()
        self.writing = False
        self.acked = False
        self.announced = False
        self.notify_peer = False
        self.released = False

    def announce(self, total_tokens: int, block_hashes: list[bytes] | None = None,
                 tail_images: list[ImageSpan] | None = None) -> None:
        """Tell the receiver the prompt's length as soon as it is known (before any vision
        work), so it can offer every window at once, and its full blocks' hashes, so it can
        say which of them it already holds (``cached_tokens``)."""
        self._manager._announce(self, total_tokens, block_hashes or [], tail_images or [])

    def send(self, source: Allocation, mrope_delta: int, visual_runs: Runs = (),
             ready: int | None = None) -> None:
        """Send the prompt held in ``source`` (blocks of this manager's pool, tokens from 0),
        with the deepstack rows of the tokens in ``visual_runs``: its first ``ready`` tokens
        (default: all) now, the rest as ``extend`` says they are written. Non-blocking. The
        sender owns ``source`` once every row is ready, and frees it on every path; until
        then the caller writes into it, and frees it itself if the room fails first."""
        self._manager._send(self, source, mrope_delta, visual_runs, ready)

    def extend(self, ready: int, visual_runs: Runs = ()) -> None:
        """The first ``ready`` tokens of ``source`` are written now, deepstack rows of the
        tokens in ``visual_runs`` (those since the last call) included."""
        self._manager._extend(self, ready, visual_runs)

    def abort(self, reason: str = "aborted by the encode server") -> None:
        self._manager._abort(self, reason)


@dataclass
class _EarlyWindows:
    """Windows for a room this encode server has not been asked for yet."""

    peer: Peer
    since: float
    windows: list[Window] = field(default_factory=list)


class _PeerWriter:
    """One thread per receiver, writing that receiver's chunks in order."""

    def __init__(self, manager: SenderManager, peer: Peer, link: Link,
                 layout: PoolLayout) -> None:
        self.link = link
        self.layout = layout
        self._manager = manager
        self._notices = None if manager.plane.notifies_in_band else manager.control.direct(
            peer.endpoint)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"writer-{peer.id}", daemon=True)
        self._thread.start()

    def submit(self, sender: EmbeddingSender, window: Window, blocks: list[int],
               notice: ChunkDone) -> None:
        """Write ``notice``'s tokens into ``blocks``: the window's, from the one its first
        token lands in."""
        self._jobs.put((sender, window, blocks, notice))

    def stop(self, wait: bool = False) -> None:
        """Finish queued writes, then close the link (``wait``: and join the thread)."""
        self._jobs.put(None)
        if wait:
            self._thread.join(timeout=self._manager.settings.transfer_timeout)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            sender, window, blocks, notice = job
            started = time.perf_counter()
            error = None
            try:
                if sender.state == Poll.Failed:
                    error = "the room failed before its write"
                elif self._manager.stalled():
                    error = "this encode server stalled; its peers may have given up on it"
                else:
                    self.link.write(sender.source.blocks, notice.start_token, blocks, notice)
            except PlaneError as exc:
                error = str(exc)
            except Exception as exc:  # a bug must fail the room, never kill the writer
                log.exception("writer crashed on room %d", sender.room)
                error = f"internal error while writing: {exc!r}"
            if error is None and self._notices is not None and sender.state != Poll.Failed:
                self._notices.send(notice)  # after the bytes are in place, from this thread
            self._manager._written(sender, window, notice, error,
                                   time.perf_counter() - started)
        self.link.close()
        if self._notices is not None:
            self._notices.close()


class SenderManager(TransferManager):
    role = "sender"

    def __init__(self, pool: EmbeddingPool, transfer: TransferSettings,
                 network: NetworkSettings) -> None:
        super().__init__(pool, transfer, network)
        self._senders: dict[int, EmbeddingSender] = {}
        self._early: dict[int, _EarlyWindows] = {}
        self._writers: dict[str, _PeerWriter] = {}
        self._claimed: dict[str, dict[int, int]] = {}  # receiver -> its block -> room
        self._prefix_caching: set[str] = set()  # receivers that answer Announce with Cached
        self.bootstrap = BootstrapServer(network.host, transfer.bootstrap_port,
                                         self.codec.authentic, self._register)
        self.bootstrap_address = f"{network.reachable_host}:{self.bootstrap.port}"
        self.start()

    def create_sender(self, room: int) -> EmbeddingSender:
        with self._lock:
            if room in self._senders or room in self._recent:
                raise ValueError(f"duplicate room {room}")
            sender = EmbeddingSender(self, room)
            self._senders[room] = sender
            self.stats.rooms_started += 1
            early = self._early.pop(room, None)
            if early is not None:
                for window in early.windows:
                    self._bind_window(sender, early.peer, window)
            return sender

    def close(self) -> None:
        self.bootstrap.close()
        with self._lock:
            for sender in list(self._senders.values()):
                self._fail(sender, "encode server shutting down", notify=True)
            writers = list(self._writers.values())
            self._writers.clear()
        for writer in writers:
            writer.stop(wait=True)
        super().close()

    # -- bootstrap (HTTP thread) ----------------------------------------------------------

    def _register(self, registration: Registration) -> PeerInfo:
        if registration.backend != self.plane.name:
            raise BootstrapRefused(
                f"data plane mismatch: receiver uses {registration.backend}, this encode "
                f"server {self.plane.name}")
        try:
            layout = PoolLayout.from_dict(registration.layout)
        except (KeyError, TypeError, ValueError) as exc:
            raise BootstrapRefused(f"bad pool layout {registration.layout!r}: {exc}",
                                   400) from None
        mismatch = self.pool.layout.mismatch(layout)
        if mismatch:
            raise BootstrapRefused(mismatch)
        try:
            link = self.plane.connect(registration.plane, registration.layout)
        except PlaneError as exc:
            raise BootstrapRefused(str(exc)) from None
        with self._lock:
            old = self._writers.pop(registration.receiver, None)
            if old is not None:
                old.stop()
            peer = self._peers[registration.receiver] = Peer(
                registration.receiver, registration.control_endpoint, time.monotonic())
            self._writers[registration.receiver] = _PeerWriter(self, peer, link, layout)
            self._claimed.setdefault(registration.receiver, {})
            if registration.prefix_cache:
                self._prefix_caching.add(registration.receiver)
            else:
                self._prefix_caching.discard(registration.receiver)
        log.info("registered receiver %s at %s over %s", registration.receiver,
                 registration.control_endpoint, self.plane.name)
        return PeerInfo(self.id, self.control.endpoint, self.plane.name,
                        self.pool.layout.to_dict())

    # -- messages (loop thread, under the lock) -------------------------------------------

    def _handle(self, source: str, peer: Peer | None, message: Message) -> None:
        if peer is None:
            return self._refuse(f"{type(message).__name__} from unregistered peer {source}")
        room = message.room
        sender = self._senders.get(room)
        if isinstance(message, Window):
            if sender is not None:
                self._bind_window(sender, peer, message)
            elif room in self._recent:
                log.debug("window for finished room %d ignored", room)
            else:
                early = self._early.setdefault(room, _EarlyWindows(peer, time.monotonic()))
                if early.peer is not peer:
                    return self._refuse(f"room {room} already has windows from {early.peer.id}")
                early.windows.append(message)
        elif isinstance(message, Received):
            if sender is None and room in self._recent:  # aborted as it arrived
                log.debug("Received for finished room %d ignored", room)
                return
            if sender is None or sender.peer is not peer:
                return self._refuse(f"Received for room {room} not sent to {source}")
            sender.acked = True
            self._maybe_finish(sender)
        elif isinstance(message, Cached):
            if sender is None or sender.peer is not peer:
                if room not in self._recent:
                    self._refuse(f"Cached for room {room} not sent to {source}")
                return
            self._cached(sender, message.tokens)
        elif isinstance(message, Abort):
            if room in self._early and self._early[room].peer is peer:
                del self._early[room]
            if sender is not None and sender.peer in (peer, None):
                self._fail(sender, f"{LANGUAGE_ABORT}: {message.reason}",
                           notify=True)
            else:  # nothing writes for that room: release the receiver's blocks at once
                self.control.send(peer.endpoint, Abort(room, "released"))
        else:
            self._refuse(f"{type(message).__name__} is not for a sender (room {room})")

    def _bind_window(self, sender: EmbeddingSender, peer: Peer, window: Window) -> None:
        problem = self._window_problem(sender, peer, window)
        if problem:
            return self._refuse(f"window for room {sender.room} from {peer.id}: {problem}")
        if sender.peer is None:
            sender.peer = peer
            peer.rooms.add(sender.room)
            if peer.id not in self._prefix_caching:
                sender.cached_tokens = 0
            sender.state = Poll.WaitingForInput if sender.source is None else Poll.Transferring
            if sender.total_tokens is not None:
                self._send_announce(sender)
        sender.windows[window.start_token] = window
        self._claim(sender, window)
        sender.last_progress = time.monotonic()
        self._pump(sender)

    def _window_problem(self, sender: EmbeddingSender, peer: Peer, window: Window) -> str | None:
        if sender.state in (Poll.Success, Poll.Failed):
            return "room is over"
        if sender.peer is not None and sender.peer is not peer:
            return f"room is served by {sender.peer.id}"
        block_size = self.pool.layout.block_size
        if not window.blocks or window.allocated_tokens != len(window.blocks) * block_size:
            return (f"allocated_tokens {window.allocated_tokens} is not {len(window.blocks)} "
                    f"blocks x {block_size}")
        if window.start_token % block_size or window.start_token < self._window_start(
                sender.sent_tokens):
            return f"start_token {window.start_token} is not the next block-aligned token"
        if window.start_token in sender.windows:
            return f"a window at token {window.start_token} is already offered"
        if sender.total_tokens is not None and window.start_token >= sender.total_tokens:
            return f"start_token {window.start_token} is past the prompt's end"
        writer = self._writers.get(peer.id)
        num_blocks = writer.layout.num_blocks if writer else 0
        if any(not 0 <= b < num_blocks for b in window.blocks) or len(set(window.blocks)) != len(
                window.blocks):
            return f"blocks {window.blocks} are not distinct blocks of a {num_blocks}-block pool"
        claimed = self._claimed.get(peer.id, {})
        taken = {b: claimed[b] for b in self._used_blocks(sender, window) if claimed.get(
            b, sender.room) != sender.room}
        if taken:
            return f"blocks {sorted(taken)} belong to live rooms {sorted(set(taken.values()))}"
        return None

    def _used_blocks(self, sender: EmbeddingSender, window: Window) -> list[int]:
        """The blocks of a window this sender will actually write (all, until it knows the
        length; the receiver frees the rest once told the length)."""
        if sender.total_tokens is None:
            return window.blocks
        tokens = min(sender.total_tokens - window.start_token, window.allocated_tokens)
        return window.blocks[: -(-tokens // self.pool.layout.block_size)]

    def _claim(self, sender: EmbeddingSender, window: Window) -> None:
        claimed = self._claimed.setdefault(sender.peer.id, {})
        for block in self._used_blocks(sender, window):
            claimed[block] = sender.room

    def _unclaim(self, sender: EmbeddingSender, windows: list[Window]) -> None:
        claimed = self._claimed.get(sender.peer.id, {}) if sender.peer else {}
        for window in windows:
            for block in window.blocks:
                if claimed.get(block) == sender.room:
                    del claimed[block]

    # -- requests (scheduler thread) ------------------------------------------------------

    def _announce(self, sender: EmbeddingSender, total_tokens: int, block_hashes: list[bytes],
                  tail_images: list[ImageSpan]) -> None:
        if total_tokens <= 0:
            raise ValueError(f"total_tokens must be > 0, got {total_tokens}")
        with self._lock:
            if sender.total_tokens not in (None, total_tokens):
                raise ValueError(f"room {sender.room} already announced "
                                 f"{sender.total_tokens} tokens")
            sender.total_tokens = total_tokens
            sender.block_hashes, sender.tail_images = block_hashes, tail_images
            if sender.peer is not None:
                self._unclaim(sender, list(sender.windows.values()))
                for window in sender.windows.values():
                    self._claim(sender, window)
                self._send_announce(sender)

    def _send_announce(self, sender: EmbeddingSender) -> None:
        if not sender.announced and sender.state not in (Poll.Success, Poll.Failed):
            sender.announced = True
            self.control.send(sender.peer.endpoint, Announce(
                sender.room, sender.total_tokens, sender.block_hashes, sender.tail_images))

    def _cached(self, sender: EmbeddingSender, tokens: int) -> None:
        """The receiver holds the first ``tokens`` tokens: send from the first it lacks (into
        the window that holds it, from that token's row on). Its windows before that were
        never written (nothing is before this answer); forget them."""
        if sender.state in (Poll.Success, Poll.Failed):
            return
        problem = None
        if sender.cached_tokens is not None:
            problem = "said twice"
        elif sender.total_tokens is None or not 0 <= tokens < sender.total_tokens:
            problem = f"{tokens} tokens of a {sender.total_tokens}-token prompt"
        if problem:
            return self._fail(sender, f"bad Cached for room {sender.room}: {problem}",
                              notify=True)
        first_window = self._window_start(tokens)
        skipped = [window for start, window in sender.windows.items() if start < first_window]
        self._unclaim(sender, skipped)
        for window in skipped:
            del sender.windows[window.start_token]
        sender.cached_tokens = sender.sent_tokens = tokens
        self._pump(sender)

    def _send(self, sender: EmbeddingSender, source: Allocation, mrope_delta: int,
              visual_runs: Runs, ready: int | None) -> None:
        with self._lock:
            if sender.source is not None:
                raise ValueError(f"room {sender.room} was already sent")
            if sender.total_tokens is None:
                raise ValueError(f"announce room {sender.room}'s length before sending it")
            if source.allocated_tokens < sender.total_tokens:
                raise ValueError(f"source holds {source.allocated_tokens} tokens, room "
                                 f"{sender.room} has {sender.total_tokens}")
            if visual_runs and not self.pool.layout.deepstack_layers:
                raise ValueError(f"room {sender.room} has deepstack rows; this pool has none")
            ready = sender.total_tokens if ready is None else ready
            if not 0 <= ready <= sender.total_tokens:
                raise ValueError(f"{ready} tokens ready of room {sender.room}'s "
                                 f"{sender.total_tokens}")
            sender.source = source
            sender.ready_tokens = ready
            if sender.state in (Poll.Success, Poll.Failed):
                return self._free_source_after_release(sender)
            sender.mrope_delta = mrope_delta
            sender.visual_runs = tuple(visual_runs)
            sender.last_progress = time.monotonic()
            if sender.peer is not None:
                sender.state = Poll.Transferring
            self._pump(sender)

    def _extend(self, sender: EmbeddingSender, ready: int, visual_runs: Runs) -> None:
        with self._lock:
            if sender.state in (Poll.Success, Poll.Failed) and sender.released:
                sender.ready_tokens = max(sender.ready_tokens, ready)
                return self._free_source_after_release(sender)
            if sender.source is None:
                raise ValueError(f"room {sender.room} was not sent yet")
            if not sender.ready_tokens <= ready <= sender.total_tokens:
                raise ValueError(f"{ready} tokens ready of room {sender.room}'s "
                                 f"{sender.total_tokens}, after {sender.ready_tokens}")
            sender.ready_tokens = ready
            if sender.state in (Poll.Success, Poll.Failed):
                return  # (its release, once its last write returns, frees ``source``)
            sender.visual_runs += tuple(visual_runs)
            sender.last_progress = time.monotonic()
            self._pump(sender)

    def _abort(self, sender: EmbeddingSender, reason: str) -> None:
        with self._lock:
            if sender.state not in (Poll.Success, Poll.Failed):
                self._fail(sender, reason, notify=True)

    # -- progress -------------------------------------------------------------------------

    def _pump(self, sender: EmbeddingSender) -> None:
        """Start writing the next chunk if its rows and its window are both there: the ready
        rows of the window that holds the next token."""
        if (sender.state in (Poll.Success, Poll.Failed) or sender.writing
                or sender.source is None or sender.peer is None or sender.cached_tokens is None):
            return
        start = sender.sent_tokens
        window = next((w for w in sender.windows.values()
                       if w.start_token <= start < w.start_token + w.allocated_tokens), None)
        if window is None:
            return
        window_end = min(sender.total_tokens, window.start_token + window.allocated_tokens)
        num_tokens = min(window_end, sender.ready_tokens) - start
        if num_tokens <= 0:
            return
        writer = self._writers.get(sender.peer.id)
        if writer is None:
            return self._fail(sender, f"no data link to receiver {sender.peer.id}", notify=False)
        if start + num_tokens == window_end:
            # NOTE: an in-band plane's notice can reach the receiver, which may then reuse
            # these blocks, before this thread hears the write returned. Claims guard windows
            # not yet written; writes to one receiver are serialized, so releasing at the
            # window's last chunk is as safe.
            self._unclaim(sender, [window])
        sender.writing = True
        first_block = (start - window.start_token) // self.pool.layout.block_size
        writer.submit(sender, window, window.blocks[first_block:], ChunkDone(
            sender.room, start, num_tokens, sender.total_tokens, sender.mrope_delta,
            tuple(runs_within(sender.visual_runs, start, num_tokens))))

    def _written(self, sender: EmbeddingSender, window: Window, notice: ChunkDone,
                 error: str | None, seconds: float) -> None:
        """Writer thread: a chunk's write returned."""
        with self._lock:
            sender.writing = False
            if error is None:
                sender.sent_tokens += notice.num_tokens
                if sender.sent_tokens >= min(sender.total_tokens,
                                             window.start_token + window.allocated_tokens):
                    del sender.windows[window.start_token]
                sender.last_progress = time.monotonic()
                self.stats.chunks += 1
                self.stats.bytes += self.pool.layout.chunk_bytes(notice.num_tokens,
                                                                 notice.visual_runs)
                self.stats.seconds += seconds
            if sender.state == Poll.Failed:
                return self._release(sender)
            if error is not None:
                return self._fail(sender, error, notify=True)
            self._maybe_finish(sender)
            self._pump(sender)

    def _maybe_finish(self, sender: EmbeddingSender) -> None:
        if not sender.acked or sender.writing:
            return
        if sender.total_tokens is None or sender.sent_tokens != sender.total_tokens:
            return self._fail(sender, f"receiver confirmed room {sender.room} after only "
                                      f"{sender.sent_tokens} tokens", notify=True)
        sender._end(Poll.Success)
        self.stats.rooms_succeeded += 1
        self._release(sender)

    def _fail(self, sender: EmbeddingSender, reason: str, notify: bool) -> None:
        if sender.state in (Poll.Success, Poll.Failed):
            return
        sender._end(Poll.Failed, reason)
        sender.notify_peer = notify and sender.peer is not None
        self.stats.rooms_failed += 1
        log.info("room %d failed: %s", sender.room, reason)
        if not sender.writing:
            self._release(sender)

    def _release(self, sender: EmbeddingSender) -> None:
        """Free everything a finished room holds. Runs once no write is in flight, so the
        Abort it sends tells the receiver its blocks are safe to reuse."""
        if sender.released:
            return
        sender.released = True
        if sender.notify_peer:
            self.control.send(sender.peer.endpoint, Abort(sender.room, sender.failure))
        self._free_source_after_release(sender)
        self._unclaim(sender, list(sender.windows.values()))
        if sender.peer is not None:
            sender.peer.rooms.discard(sender.room)
        self._senders.pop(sender.room, None)
        self._finished(sender.room)

    def _free_source_after_release(self, sender: EmbeddingSender) -> None:
        """Free a released room's ``source`` once it is the sender's (every row ready); before,
        the encode server still writes into it and frees it itself."""
        if (sender.released and sender.source is not None
                and sender.ready_tokens == sender.total_tokens):
            self.pool.allocator.free(sender.source)
            sender.source = None

    # -- time -----------------------------------------------------------------------------

    def stalled(self) -> bool:
        """This process has not run its loop for so long (stopped, swapped out, starved) that
        a receiver may have declared it dead and taken its windows back: writing into them
        now could overwrite another room's data."""
        return time.monotonic() - self.last_turn > self._stall_limit

    @property
    def _stall_limit(self) -> float:
        # NOTE: a running loop sends a heartbeat at least every interval, so a receiver may
        # declare this sender dead once its loop has been still for timeout - interval.
        return self.settings.heartbeat_timeout - self.settings.heartbeat_interval

    def _turned(self, gap: float) -> None:
        """After a stall, messages that waited in the socket (heartbeats too) would make the
        receivers look alive: they have given this sender up. So do we, before reading them."""
        if gap <= self._stall_limit or not self._peers:
            return
        log.warning("this encode server did not run for %.1fs (stopped, swapped out or "
                    "starved): its receivers have given it up; dropping them", gap)
        for peer in list(self._peers.values()):
            self._declare_dead(peer, f"this encode server stalled for {gap:.1f}s")

    def _tick(self, now: float) -> None:
        timeout = self.settings
        for sender in list(self._senders.values()):
            if sender.peer is None and now - sender.created > timeout.waiting_timeout:
                # A busy language server queues a request until it has blocks for it.
                self._fail(sender, f"no language server offered a window for room "
                                   f"{sender.room} within {timeout.waiting_timeout:g}s",
                           notify=False)
            elif (sender.source is not None and sender.peer is not None
                  and now - sender.last_progress > timeout.transfer_timeout):
                self._fail(sender, f"transfer of room {sender.room} made no progress for "
                                   f"{timeout.transfer_timeout:g}s", notify=True)
        for room, early in list(self._early.items()):
            if now - early.since > timeout.bootstrap_timeout:
                del self._early[room]
                self._refuse(f"no encode request for room {room} arrived within "
                             f"{timeout.bootstrap_timeout:g}s of its window")
                self.control.send(early.peer.endpoint, Abort(
                    room, f"encode server never received room {room}"))

    def _peer_lost(self, peer: Peer, reason: str) -> None:
        writer = self._writers.pop(peer.id, None)
        if writer is not None:
            writer.stop()
        for sender in list(self._senders.values()):
            if sender.peer is peer:
                self._fail(sender, reason, notify=False)
        for room, early in list(self._early.items()):
            if early.peer is peer:
                del self._early[room]
        self._claimed.pop(peer.id, None)
