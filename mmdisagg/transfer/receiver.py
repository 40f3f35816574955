"""Language side of the transfer: ``ReceiverManager`` (one per process) and
``EmbeddingReceiver`` (one per request room).

A receiver offers windows of its pool: ``init`` the first (before the length is known), then,
as soon as the sender announces the length, the rest at once (so a long prompt costs no round
trip), each as large as free blocks allow. A window fills in one chunk or, when the sender
has its rows in stages, in several, in order. Filled windows stay in the pool until ``take``
gathers them, unless blocks run short: then the receiver copies its filled windows out
("spills") and offers the freed blocks again. A language server that prefills while the
prompt arrives takes the prompt early and calls ``landed`` each step: what landed is copied
out as it lands. Progress is ``sent_tokens``, never block ids.

NOTE: after a failure, blocks the sender may still be writing into (one-sided writes) are
quarantined until the sender confirms with an ``Abort`` of its own, dies, or the transfer
timeout passes; only then are they reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mmdisagg.config import NetworkSettings, TransferSettings
from mmdisagg.core import (
    HASH_BLOCK_TOKENS,
    EncodedPrompt,
    ImageSpan,
    PrefixCache,
    PrefixHit,
    runs_mask,
)
from mmdisagg.pool.allocator import Allocation
from mmdisagg.pool.layout import runs_problem
from mmdisagg.pool.pool import EmbeddingPool, Gathered
from mmdisagg.transfer.bootstrap import BootstrapRefused, register_with
from mmdisagg.transfer.manager import Peer, RoomTransfer, TransferManager
from mmdisagg.transfer.planes.base import ChunkRefused
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
    chunk_row,
)

log = logging.getLogger(__name__)

TERMINAL = (Poll.Success, Poll.Failed)


@dataclass
class OfferedWindow:
    start: int
    allocation: Allocation | None  # None once spilled
    skipped: int = 0  # rows at its start a prefix-cache hit holds: never written
    filled: int = 0  # tokens written, after the skipped rows
    copied: int = 0  # of those, copied out of the pool (``staged``)
    landing: bool = False
    visual_runs: tuple[tuple[int, int], ...] = ()  # of the filled tokens, from the first

    @property
    def first(self) -> int:
        """The first token written into it."""
        return self.start + self.skipped

    @property
    def end(self) -> int:
        return (self.start + self.allocation.allocated_tokens if self.allocation
                else self.first + self.filled)

    def whole(self, total_tokens: int) -> bool:
        """Every token it will take has landed."""
        return self.filled > 0 and self.first + self.filled == min(total_tokens, self.end)


class EmbeddingReceiver(RoomTransfer):
    """One request's receiving half. All state changes happen in its manager, under its lock."""

    def __init__(self, manager: ReceiverManager, room: int, encoder: str) -> None:
        super().__init__(room)
        self.encoder = encoder
        self._manager = manager
        self.peer: Peer | None = None
        self.total_tokens: int | None = None
        self.block_hashes: list[bytes] = []
        self.tail_images: list[ImageSpan] = []
        self.prefix: PrefixHit | None = None  # pinned in the prefix cache until taken or failed
        self.first_token = 0  # the first token sent: the first the prefix cache lacks
        self.mrope_delta = 0
        self.sent_tokens = 0
        self.windows: list[OfferedWindow] = []
        self.staged: Gathered | None = None
        self.taken: EncodedPrompt | None = None  # what ``take`` returns: over ``staged``
        # window's first token -> its visual runs (from that token) and their deepstack rows
        self.deepstack: dict[int, tuple[tuple[tuple[int, int], ...], torch.Tensor]] = {}
        self.created = self.waiting_since = self.last_progress = time.monotonic()
        self.release_by: float | None = None  # set while quarantined
        self.started = False  # its first window is offered

        self.refused = False  # failed because the prompt can never run here (client's fault)

    def init(self, allocation: Allocation) -> None:
        """Offer the first window (token 0 on); the receiver owns ``allocation`` from now on.
        With a prefix cache, tokens it holds are skipped once the sender announces them."""
        self._manager._init(self, allocation)

    def abort(self, reason: str = "aborted by the language server") -> None:
        self._manager._abort(self, reason)

    def take(self) -> EncodedPrompt:
        """Once ``Success``: the prompt after its cached prefix (``prefix``, pinned: the caller
        owns it now), gathered out of the pool; frees every block. Called earlier (once rows
        landed, in a pool without deepstack rows), the same prompt whose rows fill in as
        ``landed`` copies them; its tensors are the ones a later ``take`` returns."""
        return self._manager._take(self)

    def landed(self) -> int:
        """After an early ``take``: copy out what landed since, freeing the blocks of every
        window that is whole; the tokens the prompt has rows for (from token 0)."""
        return self._manager._landed_rows(self)


@dataclass
class _EncoderLink:
    """Bootstrap state with one encode server (by its bootstrap address)."""

    address: str
    peer: Peer | None = None
    waiting: list[EmbeddingReceiver] = field(default_factory=list)


class ReceiverManager(TransferManager):
    role = "receiver"

    def __init__(self, pool: EmbeddingPool, transfer: TransferSettings,
                 network: NetworkSettings, prefix_cache: PrefixCache | None = None,
                 check_length: Callable[[int], str | None] = lambda total_tokens: None) -> None:
        """``check_length(total_tokens)``: why a prompt that long can never run here, or None;
        asked on ``Announce``, so that such a prompt is refused before any byte moves."""
        super().__init__(pool, transfer, network)
        self.prefix_cache = prefix_cache
        self.check_length = check_length
        self._receivers: dict[int, EmbeddingReceiver] = {}
        self._quarantine: dict[int, EmbeddingReceiver] = {}
        self._pending: dict[int, EmbeddingReceiver] = {}
        self._encoders: dict[str, _EncoderLink] = {}
        self._bootstrapper = ThreadPoolExecutor(4, thread_name_prefix="bootstrap")
        self._plane_info = self.plane.listen(self)
        self.start()

    def create_receiver(self, room: int, encoder: str) -> EmbeddingReceiver:
        """A receiver for ``room``, whose embeddings the encode server whose bootstrap
        endpoint is ``encoder`` (``host:port``) will send."""
        with self._lock:
            if room in self._receivers or room in self._recent or room in self._quarantine:
                raise ValueError(f"duplicate room {room}")
            receiver = EmbeddingReceiver(self, room, encoder)
            self._receivers[room] = receiver
            self.stats.rooms_started += 1
            link = self._encoders.get(encoder)
            if link is None:
                link = self._encoders[encoder] = _EncoderLink(encoder)
                self._bootstrapper.submit(self._bootstrap, encoder)
            if link.peer is None:
                link.waiting.append(receiver)
            else:
                self._connected(receiver, link.peer)
            return receiver

    def close(self) -> None:
        with self._lock:
            for receiver in list(self._receivers.values()):
                self._fail(receiver, "language server shutting down", notify=True)
        super().close()
        self._bootstrapper.shutdown(wait=False, cancel_futures=True)

    @property
    def _registration(self) -> Registration:
        return Registration(self.id, self.control.endpoint, self.plane.name,
                            self.pool.layout.to_dict(), self._plane_info,
                            prefix_cache=self.prefix_cache is not None)

    @property
    def live_rooms(self) -> int:
        return len(self._receivers)

    # -- bootstrap ------------------------------------------------------------------------

    def _bootstrap(self, address: str) -> None:
        """Bootstrap thread: register with the encode server at ``address``."""
        try:
            info: PeerInfo | None = register_with(address, self._registration,
                                                  self.network.auth_token,
                                                  self.settings.bootstrap_timeout)
            error = None
        except BootstrapRefused as exc:
            info, error = None, str(exc)
        with self._lock:
            link = self._encoders.get(address)
            if link is None:
                return
            waiting, link.waiting = link.waiting, []
            if info is None:
                del self._encoders[address]
                for receiver in waiting:
                    self._fail(receiver, error, notify=False)
                return
            peer = self._peers.get(info.sender)
            if peer is None:
                peer = self._peers[info.sender] = Peer(info.sender, info.control_endpoint,
                                                       time.monotonic())
            link.peer = peer
            for receiver in waiting:
                self._connected(receiver, peer)

    def _connected(self, receiver: EmbeddingReceiver, peer: Peer) -> None:
        if receiver.state in TERMINAL:
            return
        receiver.peer = peer
        peer.rooms.add(receiver.room)
        receiver.state = Poll.WaitingForInput
        for window in receiver.windows:
            self._send_window(receiver, window)

    # -- requests (scheduler thread) ------------------------------------------------------

    def _init(self, receiver: EmbeddingReceiver, allocation: Allocation) -> None:
        with self._lock:
            if receiver.started:
                raise ValueError(f"room {receiver.room} already has its first window")
            receiver.started = True
            receiver.waiting_since = time.monotonic()
            self._offer(receiver, allocation, 0)

    def _abort(self, receiver: EmbeddingReceiver, reason: str) -> None:
        with self._lock:
            if receiver.state == Poll.Success:
                self._drop(receiver)
            elif receiver.state != Poll.Failed:
                self._fail(receiver, reason, notify=True)

    def _take(self, receiver: EmbeddingReceiver) -> EncodedPrompt:
        with self._lock:
            if receiver.state != Poll.Success:
                if receiver.state != Poll.Transferring or self.pool.layout.deepstack_layers:
                    raise RuntimeError(
                        f"room {receiver.room} is {receiver.state.name}, not Success"
                        + (f": {receiver.failure}" if receiver.failure else ""))
                return self._take_early(receiver)
            windows = [w for w in receiver.windows if w.allocation is not None]
            receiver.windows = []
            self._receivers.pop(receiver.room, None)
        out = receiver.staged = receiver.staged or self._new_buffer(receiver)
        for window in windows:
            self._copy_out(receiver, window, out)
        prefix, receiver.prefix = receiver.prefix, None
        with self._lock:
            for window in windows:
                self.pool.allocator.free(window.allocation)
            self._retry_pending()
        if receiver.taken is None:  # NOTE: taken again, it is the same prompt
            receiver.taken = self._prompt(receiver, out, prefix)
            if self.pool.layout.deepstack_layers:
                self._attach_deepstack(receiver, receiver.taken)
        return receiver.taken

    def _take_early(self, receiver: EmbeddingReceiver) -> EncodedPrompt:
        """Under the lock: the prompt over the buffer its rows are copied into as they land.
        The caller owns the prefix-cache pin from now on."""
        if receiver.taken is None:
            receiver.staged = receiver.staged or self._new_buffer(receiver)
            prefix, receiver.prefix = receiver.prefix, None
            receiver.taken = self._prompt(receiver, receiver.staged, prefix)
        return receiver.taken

    @staticmethod
    def _prompt(receiver: EmbeddingReceiver, out: Gathered,
                prefix: PrefixHit | None) -> EncodedPrompt:
        return EncodedPrompt(out.embeddings, out.token_ids, out.positions,
                             receiver.mrope_delta, prefix=prefix,
                             first_token=receiver.first_token,
                             block_hashes=receiver.block_hashes,
                             tail_images=receiver.tail_images)

    def _landed_rows(self, receiver: EmbeddingReceiver) -> int:
        with self._lock:
            if receiver.taken is None or receiver.state not in (Poll.Transferring,
                                                                  Poll.Success):
                return receiver.first_token
            freed = False
            for window in receiver.windows:
                if window.allocation is None or window.copied == window.filled:
                    continue
                self._copy_out(receiver, window, receiver.staged)
                if window.whole(receiver.total_tokens):
                    self.pool.allocator.free(window.allocation)
                    window.allocation = None
                    freed = True
            if freed:
                self._retry_pending()
            return receiver.sent_tokens

    def _attach_deepstack(self, receiver: EmbeddingReceiver, prompt: EncodedPrompt) -> None:
        """The visual mask and ``[layers, visual tokens, hidden]`` rows, in token order."""
        layout = self.pool.layout
        starts = sorted(receiver.deepstack)
        runs = [(start - receiver.first_token + first, count) for start in starts
                for first, count in receiver.deepstack[start][0]]
        rows = [receiver.deepstack[start][1] for start in starts]
        receiver.deepstack = {}
        prompt.visual_mask = runs_mask(runs, prompt.total_tokens)
        prompt.deepstack = torch.cat(rows).transpose(0, 1) if rows else torch.empty(
            layout.deepstack_layers, 0, layout.hidden_size, dtype=layout.torch_dtype)

    # -- offering windows -----------------------------------------------------------------

    def _offer(self, receiver: EmbeddingReceiver, allocation: Allocation, start: int) -> None:
        if receiver.state in TERMINAL:
            self.pool.allocator.free(allocation)
            return
        window = OfferedWindow(start, allocation)
        receiver.windows.append(window)
        receiver.last_progress = time.monotonic()
        self.stats.windows += 1
        if start > 0:
            self.stats.resumes += 1
        if receiver.peer is not None:
            self._send_window(receiver, window)

    def _send_window(self, receiver: EmbeddingReceiver, window: OfferedWindow) -> None:
        allocation = window.allocation
        self.control.send(receiver.peer.endpoint, Window(
            receiver.room, window.start, list(allocation.blocks), allocation.allocated_tokens))

    def _offer_more(self, receiver: EmbeddingReceiver) -> None:
        """Offer windows up to the prompt's end, as far as free blocks allow."""
        self._pending.pop(receiver.room, None)
        if receiver.state in TERMINAL or receiver.total_tokens is None or not receiver.started:
            return
        allocator = self.pool.allocator
        end = receiver.windows[-1].end if receiver.windows else self._window_start(
            receiver.sent_tokens)
        while end < receiver.total_tokens:
            need = allocator.blocks_for(receiver.total_tokens - end)
            want = min(need, self.settings.window_blocks or need)
            if allocator.num_free_blocks == 0:
                self._spill(receiver)
                if receiver.state in TERMINAL:
                    return
            allocation = allocator.alloc_blocks(min(want, max(allocator.num_free_blocks, 1)))
            if allocation is None:
                self._pending[receiver.room] = receiver
                return
            self._offer(receiver, allocation, end)
            end += allocation.allocated_tokens

    def _trim(self, receiver: EmbeddingReceiver) -> None:
        """Give back the blocks of the last window that the announced length will not use."""
        window = receiver.windows[-1] if receiver.windows else None
        if window is None or window.allocation is None or window.filled or window.landing:
            return
        keep = self.pool.allocator.blocks_for(receiver.total_tokens - window.start)
        if keep < window.allocation.num_blocks:
            window.allocation = self.pool.allocator.shrink(window.allocation, keep)
            self._retry_pending()

    def _retry_pending(self) -> None:
        for receiver in list(self._pending.values()):
            if self.pool.allocator.num_free_blocks == 0:
                return
            self._offer_more(receiver)

    # -- data arriving --------------------------------------------------------------------

    def _handle(self, source: str, peer: Peer | None, message: Message) -> None:
        if peer is None:
            return self._refuse(f"{type(message).__name__} from unknown peer {source}")
        room = message.room
        if isinstance(message, Abort):
            quarantined = self._quarantine.get(room)
            if quarantined is not None and quarantined.peer is peer:
                return self._release_quarantine(quarantined)
            receiver = self._receivers.get(room)
            if receiver is not None and receiver.peer is peer:
                self._fail(receiver, f"aborted by the encode server: {message.reason}",
                           notify=False)
            return
        receiver = self._receivers.get(room)
        if receiver is None or receiver.peer is not peer:
            if room not in self._recent:
                self._refuse(f"{type(message).__name__} for room {room} that {source} does "
                             "not serve here")
            return
        if isinstance(message, Announce):
            self._announced(receiver, message)
        elif isinstance(message, ChunkDone):
            try:
                window = self._check_chunk(receiver, message, None)
            except ChunkRefused as exc:
                return self._refuse(str(exc))
            self._landed(receiver, window, message)
        else:
            self._refuse(f"{type(message).__name__} is not for a receiver (room {room})")

    def _announced(self, receiver: EmbeddingReceiver, announce: Announce) -> None:
        total_tokens = announce.total_tokens
        if receiver.state in TERMINAL:
            return
        if total_tokens <= 0 or receiver.total_tokens not in (None, total_tokens):
            return self._fail(receiver, f"inconsistent length {total_tokens} for room "
                                        f"{receiver.room} (had {receiver.total_tokens})",
                              notify=True)
        refusal = self.check_length(total_tokens)
        if refusal is not None:
            receiver.refused = True
            return self._fail(receiver, refusal, notify=True)
        first = receiver.total_tokens is None
        receiver.total_tokens = total_tokens
        if first and self.prefix_cache is not None:
            receiver.block_hashes = announce.block_hashes[: total_tokens // HASH_BLOCK_TOKENS]
            receiver.tail_images = announce.tail_images
            self._skip_cached(receiver)
        self._trim(receiver)
        self._offer_more(receiver)

    def _skip_cached(self, receiver: EmbeddingReceiver) -> None:
        """Pin the longest prefix the cache holds (short of the last token, whose logits
        prefill must compute), tell the sender, and take only what follows: windows start on
        blocks, the first chunk at the first uncached token inside its window. NOTE: the
        sender writes nothing before this answer, so no offered window is filled yet."""
        limit = receiver.total_tokens - 1
        hit = self.prefix_cache.match(receiver.block_hashes, limit)
        if hit is not None and not 0 < hit.tokens <= limit:
            self.prefix_cache.release(hit)
            hit = None
        self.control.send(receiver.peer.endpoint,
                          Cached(receiver.room, hit.tokens if hit is not None else 0))
        if hit is None:
            return
        receiver.prefix = hit
        receiver.first_token = receiver.sent_tokens = hit.tokens
        self.stats.cached_tokens += hit.tokens
        if self._window_start(hit.tokens):
            for window in receiver.windows:
                self.pool.allocator.free(window.allocation)
            receiver.windows = []

    def begin_chunk(self, source: str, notice: ChunkDone, blocks: Sequence[int]) -> None:
        """In-band planes (tcp), before a byte lands: check the chunk and mark it landing."""
        with self._lock:
            receiver = self._receivers.get(notice.room)
            if receiver is None or receiver.peer is None or receiver.peer.id != source:
                self.stats.refused += 1
                raise ChunkRefused(f"chunk for room {notice.room}, which {source} does not "
                                   "serve here", drain=notice.room in self._recent)
            try:
                window = self._check_chunk(receiver, notice, blocks)
            except ChunkRefused:
                self.stats.refused += 1
                raise
            window.landing = True

    def end_chunk(self, source: str, notice: ChunkDone, error: str | None) -> None:
        with self._lock:
            receiver = self._receivers.get(notice.room) or self._quarantine.get(notice.room)
            window = receiver and self._window_of(receiver, notice)
            if window is not None and not window.landing:
                window = None
            if window is None:
                return log.error("end of a chunk for room %d that is not landing", notice.room)
            window.landing = False
            if receiver.state == Poll.Failed:
                return self._maybe_release(receiver)
            if error is not None:
                return self._fail(receiver, error, notify=True)
            self._landed(receiver, window, notice)

    def _check_chunk(self, receiver: EmbeddingReceiver, notice: ChunkDone,
                     blocks: Sequence[int] | None) -> OfferedWindow:
        room = receiver.room
        if receiver.state in TERMINAL:
            raise ChunkRefused(f"chunk for room {room}, which is {receiver.state.name}")
        block_size = self.pool.layout.block_size
        window = self._window_of(receiver, notice)
        if window is None:
            raise ChunkRefused(f"chunk at token {notice.start_token} of room {room} is outside "
                               "every offered window")
        if window.landing or (window.filled and notice.start_token < window.first
                              + window.filled):
            raise ChunkRefused(f"duplicate chunk at token {notice.start_token} of room {room}")
        if notice.start_token != receiver.sent_tokens:
            raise ChunkRefused(f"chunk at token {notice.start_token} of room {room} out of "
                               f"order (next is {receiver.sent_tokens})")
        total = receiver.total_tokens or notice.total_tokens
        room_left = min(total, window.end) - notice.start_token
        if (room_left <= 0 or notice.total_tokens != total
                or not 0 < notice.num_tokens <= room_left):
            raise ChunkRefused(f"chunk of {notice.num_tokens}/{notice.total_tokens} tokens for "
                               f"room {room}; its window takes at most {room_left} of {total}")
        problem = runs_problem(notice.visual_runs, notice.num_tokens)
        if problem is None and notice.visual_runs and not self.pool.layout.deepstack_layers:
            problem = "visual runs for a pool without deepstack rows"
        if problem:
            raise ChunkRefused(f"chunk at token {notice.start_token} of room {room}: {problem}")
        if blocks is not None:
            first = (notice.start_token - window.start) // block_size
            row = chunk_row(notice, block_size)
            used = window.allocation.blocks[
                first: first + self.pool.allocator.blocks_for(row + notice.num_tokens)]
            if list(blocks) != list(used):
                raise ChunkRefused(f"chunk for room {room} aims at blocks {list(blocks)[:16]}, "
                                   f"its window has {list(used)[:16]}")
        return window

    @staticmethod
    def _window_of(receiver: EmbeddingReceiver, notice: ChunkDone) -> OfferedWindow | None:
        """The window a chunk lands in: the one that holds its first token."""
        return next((w for w in receiver.windows if w.allocation is not None
                     and w.start <= notice.start_token < w.end), None)

    def _landed(self, receiver: EmbeddingReceiver, window: OfferedWindow,
                notice: ChunkDone) -> None:
        if not window.filled:
            window.skipped = notice.start_token - window.start
        at = notice.start_token - window.first
        window.visual_runs += tuple((at + first, count) for first, count in notice.visual_runs)
        window.filled += notice.num_tokens
        receiver.total_tokens = notice.total_tokens
        receiver.mrope_delta = notice.mrope_delta
        receiver.sent_tokens = notice.start_token + notice.num_tokens
        receiver.last_progress = time.monotonic()
        self.stats.chunks += 1
        self.stats.bytes += self.pool.layout.chunk_bytes(notice.num_tokens, notice.visual_runs)
        if receiver.sent_tokens == receiver.total_tokens:
            receiver._end(Poll.Success)
            self.stats.rooms_succeeded += 1
            self.stats.seconds += receiver.last_progress - receiver.waiting_since
            self.control.send(receiver.peer.endpoint, Received(receiver.room))
            receiver.peer.rooms.discard(receiver.room)
            self._finished(receiver.room)
        else:
            receiver.state = Poll.Transferring
            self._trim(receiver)
            self._offer_more(receiver)

    # -- leaving --------------------------------------------------------------------------

    def _spill(self, receiver: EmbeddingReceiver) -> None:
        """Copy this room's filled windows out of the pool and free their blocks."""
        filled = [w for w in receiver.windows
                  if w.allocation is not None and w.whole(receiver.total_tokens)]
        if not filled:
            return
        if receiver.staged is None:
            try:
                receiver.staged = self._new_buffer(receiver)
            except (RuntimeError, TypeError) as exc:  # torch: out of memory, size overflow
                return self._fail(receiver, f"cannot stage room {receiver.room}'s "
                                            f"{receiver.total_tokens} tokens: {exc}", notify=True)
        for window in filled:
            self._copy_out(receiver, window, receiver.staged)
            self.pool.allocator.free(window.allocation)
            window.allocation = None
        self.stats.spills += 1

    def _new_buffer(self, receiver: EmbeddingReceiver) -> Gathered:
        """Room for the tokens sent (after the cached prefix), ids and positions as the
        language half takes them."""
        total = receiver.total_tokens - receiver.first_token
        return Gathered(
            torch.empty(total, self.pool.layout.hidden_size, dtype=self.pool.layout.torch_dtype),
            torch.empty(total, dtype=torch.long), torch.empty(total, 3, dtype=torch.long))

    def _copy_out(self, receiver: EmbeddingReceiver, window: OfferedWindow,
                  out: Gathered) -> None:
        """The window's rows not copied yet, deepstack rows with its first copy (a pool with
        deepstack rows copies whole windows only)."""
        start = window.first - receiver.first_token + window.copied
        count = window.filled - window.copied
        span = slice(start, start + count)
        blocks = window.allocation.blocks
        self.pool.arrays.read(blocks, count, window.skipped + window.copied, out=Gathered(
            out.embeddings[span], out.token_ids[span], out.positions[span]))
        window.copied = window.filled
        if window.visual_runs:
            receiver.deepstack[window.first] = (window.visual_runs,
                                                self.pool.arrays.read_deepstack(
                                                    blocks, window.skipped, window.visual_runs))

    def _fail(self, receiver: EmbeddingReceiver, reason: str, notify: bool) -> None:
        """``notify``: tell the sender, and keep unfilled blocks until it confirms."""
        if receiver.state in TERMINAL:
            return
        receiver._end(Poll.Failed, reason)
        self._unpin(receiver)
        self.stats.rooms_failed += 1
        log.info("room %d failed: %s", receiver.room, reason)
        self._receivers.pop(receiver.room, None)
        self._pending.pop(receiver.room, None)
        self._finished(receiver.room)
        receiver.staged = receiver.taken = None
        receiver.deepstack = {}
        if receiver.peer is not None:
            receiver.peer.rooms.discard(receiver.room)
        waits_for_sender = notify and receiver.peer is not None
        kept = [w for w in receiver.windows if w.allocation is not None
                and (w.landing or (waits_for_sender and not w.filled))]
        for window in receiver.windows:
            if window.allocation is not None and window not in kept:
                self.pool.allocator.free(window.allocation)
                window.allocation = None
        receiver.windows = kept
        if waits_for_sender:
            self.control.send(receiver.peer.endpoint, Abort(receiver.room, reason))
        if kept:
            receiver.release_by = (time.monotonic() + self.settings.transfer_timeout
                                   if waits_for_sender else 0.0)
            self._quarantine[receiver.room] = receiver
            self._maybe_release(receiver)
        self._retry_pending()

    def _drop(self, receiver: EmbeddingReceiver) -> None:
        """A Success that will never be taken: free it."""
        self._receivers.pop(receiver.room, None)
        self._unpin(receiver)
        for window in receiver.windows:
            if window.allocation is not None:
                self.pool.allocator.free(window.allocation)
        receiver.windows = []
        receiver.staged = receiver.taken = None
        receiver.deepstack = {}
        self._retry_pending()

    def _unpin(self, receiver: EmbeddingReceiver) -> None:
        if receiver.prefix is not None:
            self.prefix_cache.release(receiver.prefix)
            receiver.prefix = None

    def _release_quarantine(self, receiver: EmbeddingReceiver) -> None:
        receiver.release_by = 0.0
        self._maybe_release(receiver)

    def _maybe_release(self, receiver: EmbeddingReceiver) -> None:
        """Free a failed room's last blocks once nobody can be writing into them: no chunk
        landing here, and the sender confirmed (``release_by`` cleared)."""
        if receiver.release_by or any(w.landing for w in receiver.windows):
            return
        self._quarantine.pop(receiver.room, None)
        for window in receiver.windows:
            self.pool.allocator.free(window.allocation)
        receiver.windows = []
        self._retry_pending()

    # -- time -----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        timeout = self.settings
        for receiver in list(self._receivers.values()):
            if receiver.state == Poll.Bootstrapping:
                if now - receiver.created > timeout.bootstrap_timeout:
                    self._fail(receiver, f"could not meet encode server {receiver.encoder} "
                                         f"within {timeout.bootstrap_timeout:g}s", notify=False)
            elif receiver.state == Poll.WaitingForInput and receiver.windows:
                if now - receiver.waiting_since > timeout.waiting_timeout:
                    self._fail(receiver, f"encode server {receiver.encoder} sent nothing for "
                                         f"room {receiver.room} within "
                                         f"{timeout.waiting_timeout:g}s", notify=True)
            elif (receiver.state == Poll.Transferring
                  and now - receiver.last_progress > timeout.transfer_timeout):
                what = ("no free blocks for its next window" if receiver.room in self._pending
                        else "no data")
                self._fail(receiver, f"transfer of room {receiver.room} stalled: {what} for "
                                     f"{timeout.transfer_timeout:g}s", notify=True)
        for receiver in list(self._quarantine.values()):
            if receiver.release_by and now > receiver.release_by:
                log.warning("room %d: sender never confirmed the abort; reusing its blocks",
                            receiver.room)
                self._release_quarantine(receiver)
        self._retry_pending()

    def _peer_lost(self, peer: Peer, reason: str) -> None:
        for address, link in list(self._encoders.items()):
            if link.peer is peer:
                del self._encoders[address]
        for receiver in list(self._receivers.values()):
            if receiver.peer is peer:
                self._fail(receiver, reason, notify=False)
        for receiver in list(self._quarantine.values()):
            if receiver.peer is peer:
                self._release_quarantine(receiver)
