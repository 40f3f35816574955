"""The encode server's loop, one thread: receive -> admit -> encode -> transfer -> reply.

A request arrives prepared (tokenized, images processed), its sender created and its length
already announced, so the language server offers every window while the vision tower works.
It is admitted once the language server offered it a window and its whole prompt fits in this
server's pool. Vision forwards take the next images of admitted requests, in prompt order, up
to ``max_patches``: a prompt with more images takes several. After each forward, the rows of
every prompt up to its first image not encoded yet are written into its blocks and handed to
its sender, so the language server receives (and prefills) a long prompt's first part while
the vision tower works on the rest. A request is answered when the language server confirms
every token arrived, or the transfer failed.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from mmdisagg.core import EncodedPrompt, LoopThread, RecentRooms
from mmdisagg.messages import EncodeResult, ErrorEvent
from mmdisagg.models.base import EncoderHalf, PreparedImage, PreparedPrompt
from mmdisagg.models.image_cache import ImageCache
from mmdisagg.pool.allocator import Allocation
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.sender import EmbeddingSender, SenderManager

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
BUSY_WAIT_S = 0.001


T = TypeVar("T")


def take_batches(queue: deque[T], images_of: Callable[[T], list[PreparedImage]],
                 cache: ImageCache | None, max_batch: int,
                 max_patches: int) -> tuple[list[T], list[T]]:
    """What to encode now, taken off ``queue``: every prompt that needs no vision forward (no
    images it still needs, per ``images_of``, or all of them cached), and one vision forward's
    worth of the others, bounded in requests and in patches (one request always goes unless
    ``max_batch`` is 0)."""
    def needs_vision(item: T) -> bool:
        images = images_of(item)
        return bool(images) and not (cache is not None and all(
            image.content_hash in cache for image in images))

    quick = [item for item in queue if not needs_vision(item)]
    for item in quick:
        queue.remove(item)
    vision, patches = [], 0
    while queue and len(vision) < max_batch:
        size = sum(image.pixel_values.shape[0] for image in images_of(queue[0]))
        if vision and patches + size > max_patches:
            break
        vision.append(queue.popleft())
        patches += size
    return quick, vision


@dataclass(eq=False)
class EncodeJob:
    room: int
    prepared: PreparedPrompt
    sender: EmbeddingSender
    reply: Callable[[EncodeResult | ErrorEvent], None]  # called once, from the loop thread
    allocation: Allocation | None = None  # ours until every row is written (then its sender's)
    replied: bool = False
    encoded: set[str] = field(default_factory=set)  # its images' content hashes, so far
    stage: list[PreparedImage] = field(default_factory=list)  # its next images (next_stage)
    merged: EncodedPrompt | None = None  # its embeddings so far (merged stage by stage)
    written: int | None = None  # tokens whose rows are in its blocks; None: nothing sent yet

    @property
    def cached_tokens(self) -> int:
        """Tokens the language server already holds: they need no encoding."""
        return self.sender.cached_tokens or 0

    @property
    def images_needed(self) -> list[PreparedImage]:
        return self.prepared.images_after(self.cached_tokens)

    def next_stage(self, max_patches: int) -> list[PreparedImage]:
        """Its next images not encoded yet, in prompt order: one vision forward's worth (at
        least one)."""
        stage, patches = [], 0
        for image in self.images_needed:
            if image.content_hash in self.encoded:
                continue
            size = image.pixel_values.shape[0]
            if stage and max_patches and patches + size > max_patches:
                break
            stage.append(image)
            patches += size
        return stage

    def ready_tokens(self) -> int:
        """Tokens whose rows can be written: those before its first image not encoded yet."""
        return min((span.start for span in self.prepared.image_spans()
                    if span.end > self.cached_tokens and span.key not in self.encoded),
                   default=self.prepared.total_tokens)

    def answer(self, outcome: EncodeResult | ErrorEvent) -> None:
        self.replied = True
        self.reply(outcome)


class EncodeScheduler(LoopThread):
    def __init__(self, half: EncoderHalf, manager: SenderManager, cache: ImageCache | None,
                 max_batch: int, max_patches: int) -> None:
        super().__init__("encode-scheduler")
        self.half = half
        self.manager = manager
        self.pool = manager.pool
        self.cache = cache
        self.max_batch = max_batch
        self.max_patches = max_patches
        self.waiting: deque[EncodeJob] = deque()
        self.admitted: deque[EncodeJob] = deque()
        self.encoding: list[EncodeJob] = []  # in the vision forward running now
        self.sending: list[EncodeJob] = []
        self.outcomes: Counter[str] = Counter()
        self._inbox: deque[EncodeJob] = deque()
        self._aborts: deque[int] = deque()
        self._aborted_early = RecentRooms()
        self._vision = ThreadPoolExecutor(1, thread_name_prefix="vision")
        self._vision_run: Future | None = None

    @property
    def load(self) -> int:
        return (len(self._inbox) + len(self.waiting) + len(self.admitted) + len(self.encoding)
                + len(self.sending))

    def submit(self, room: int, prepared: PreparedPrompt,
               reply: Callable[[EncodeResult | ErrorEvent], None]) -> None:
        """Any thread. Announces the prompt's length at once. ValueError: duplicate room."""
        sender = self.manager.create_sender(room)
        sender.announce(prepared.total_tokens, prepared.block_hashes(), prepared.tail_images())
        self._inbox.append(EncodeJob(room, prepared, sender, reply))
        self.wake()

    def abort(self, room: int) -> None:
        """Any thread: stop ``room`` wherever it is."""
        self._aborts.append(room)
        self.wake()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> float:
        self._receive()
        self._admit()
        self._encode()
        self._reply()
        busy = self.waiting or self.admitted or self.encoding or self.sending
        return BUSY_WAIT_S if busy else IDLE_WAIT_S

    def drain(self) -> None:
        self._vision.shutdown(wait=True)
        for job in [*self._inbox, *self.waiting, *self.admitted, *self.encoding,
                    *self.sending]:
            self._fail(job, ErrorEvent("encode server shutting down", 503))

    def _receive(self) -> None:
        while self._inbox:
            job = self._inbox.popleft()
            if job.room in self._aborted_early:
                self._fail(job, ErrorEvent("aborted", 499), outcome="aborted")
            else:
                self.waiting.append(job)
        while self._aborts:
            room = self._aborts.popleft()
            found = False
            for queue in (self.waiting, self.admitted, self.sending):
                for job in [job for job in queue if job.room == room]:
                    queue.remove(job)
                    self._fail(job, ErrorEvent("aborted", 499), outcome="aborted")
                    found = True
            for job in self.encoding:  # answered now, dropped when its forward ends
                if job.room == room:
                    self._fail(job, ErrorEvent("aborted", 499), outcome="aborted")
                    found = True
            if not found:  # NOTE: its request may still be preparing (fetching, decoding)
                self._aborted_early.add(room)

    def _admit(self) -> None:
        """First come, first served among requests the language server already offered a
        window for. NOTE: blocks spent on a request with no window yet could wait on a
        language server whose pool is full of first windows for requests waiting here:
        a deadlock. A request with a window always completes (its receiver can spill)."""
        allocator = self.pool.allocator
        for job in list(self.waiting):
            state = job.sender.poll()
            if state == Poll.Failed:
                self.waiting.remove(job)
                self._fail(job, ErrorEvent(job.sender.failure, 503))
                continue
            if state == Poll.Bootstrapping or job.sender.cached_tokens is None:
                continue  # no window yet, or the receiver has not said what it holds
            needed = allocator.blocks_for(job.prepared.total_tokens)
            if needed > allocator.num_blocks:
                self.waiting.remove(job)
                self._fail(job, ErrorEvent(
                    f"the prompt is {job.prepared.total_tokens} tokens; this encode server's "
                    f"pool holds {allocator.num_blocks * allocator.block_size}", 413),
                    outcome="too_large")
                continue
            job.allocation = allocator.alloc_blocks(needed)
            if job.allocation is None:
                return
            self.waiting.remove(job)
            self.admitted.append(job)

    def _encode(self) -> None:
        """Stages that need no vision forward (no images, or all cached) are done here at
        once; vision forwards run one at a time on the vision thread (torch releases the GIL),
        so that this loop keeps admitting, answering text prompts and sending while a burst of
        large images is encoded."""
        if self._vision_run is not None and self._vision_run.done():
            batch, self.encoding = self.encoding, []
            run, self._vision_run = self._vision_run, None
            self._encoded(batch, run.result())
        quick, vision = take_batches(self.admitted, self._stage, self.cache,
                                     self.max_batch if self._vision_run is None else 0,
                                     self.max_patches)
        if quick:
            self._encoded(quick, self._forward(quick))
        if vision:
            self.encoding = list(vision)
            self._vision_run = self._vision.submit(self._forward, vision)
            self._vision_run.add_done_callback(lambda _: self.wake())

    def _stage(self, job: EncodeJob) -> list[PreparedImage]:
        """``job``'s next stage, kept for the forward it may be taken into."""
        job.stage = job.next_stage(self.max_patches)
        return job.stage

    def _forward(self, batch: list[EncodeJob]) -> dict[str, torch.Tensor] | Exception:
        try:
            return self.half.image_features([image for job in batch for image in job.stage],
                                            self.cache, self.max_patches)
        except Exception as exc:  # a model failure fails these requests, not the server
            log.exception("encoding failed for rooms %s", [job.room for job in batch])
            return exc

    def _encoded(self, batch: list[EncodeJob],
                 result: dict[str, torch.Tensor] | Exception) -> None:
        """A stage of each job of ``batch`` is encoded: write and send what is ready. A job
        with images left goes back to the head of the queue; a job aborted meanwhile is
        already answered."""
        unfinished = []
        for job in batch:
            if job.replied:
                continue
            if isinstance(result, Exception):
                self._fail(job, ErrorEvent(f"encoding failed: {result!r}", 500))
                continue
            if job.sender.poll() == Poll.Failed:
                self._transfer_failed(job)
                continue
            self._write(job, result)
            (self.sending if job.allocation is None else unfinished).append(job)
        self.admitted.extendleft(reversed(unfinished))

    def _write(self, job: EncodeJob, features: dict[str, torch.Tensor]) -> None:
        """Merge the features of ``job``'s stage just encoded, write the rows that are ready
        since the last stage into its blocks and tell its sender; once every row is written,
        the blocks are the sender's."""
        new = {image.content_hash for image in job.stage}
        job.encoded |= new
        job.stage = []
        first = job.cached_tokens if job.written is None else job.written
        ready = job.ready_tokens()
        # (an image found again later in the prompt was encoded with its first place)
        prompt = job.merged = self.half.merge(
            job.prepared, [image for image in job.images_needed if image.content_hash in new],
            features, job.merged)
        runs = self.pool.write_prompt(job.allocation, prompt, first, ready)
        if job.written is None:
            job.sender.send(job.allocation, prompt.mrope_delta, runs, ready=ready)
        else:
            job.sender.extend(ready, runs)
        job.written = ready
        if ready == job.prepared.total_tokens:
            job.allocation = None
            job.merged = None

    def _reply(self) -> None:
        for job in [job for job in self.admitted if job.written is not None]:
            if job.sender.poll() == Poll.Failed:  # between stages
                self.admitted.remove(job)
                self._transfer_failed(job)
        for job in list(self.sending):
            state = job.sender.poll()
            if state == Poll.Success:
                self.sending.remove(job)
                self.outcomes["ok"] += 1
                job.answer(EncodeResult(job.prepared.total_tokens, len(job.prepared.images)))
            elif state == Poll.Failed:
                self.sending.remove(job)
                self._transfer_failed(job)

    def _transfer_failed(self, job: EncodeJob) -> None:
        self._fail(job, ErrorEvent(f"transfer failed: {job.sender.failure}", 503))

    def _fail(self, job: EncodeJob, error: ErrorEvent, outcome: str = "failed") -> None:
        if job.replied:
            return
        job.sender.abort(error.message)  # first: it stops reading the blocks freed next
        if job.allocation is not None:
            self.pool.allocator.free(job.allocation)
            job.allocation = None
        self.outcomes[outcome] += 1
        job.answer(error)
