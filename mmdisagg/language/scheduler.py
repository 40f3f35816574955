"""The language server's loop, one thread: receive -> collect -> admit -> forward -> reply.

Requests go prealloc -> transfer -> waiting -> running. Where their prompts come from is the
``PromptSource``: ``TransferSource`` (the language server: a first window of ``alloc_default``
blocks as soon as blocks are free, then receive) or, for ``serve --colocated``, a source that
runs an encoder half in this same loop. A request without free blocks waits in prealloc; it is
never dropped. Running requests decode together, new ones joining between steps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol

from mmdisagg.config import LanguageServerSettings
from mmdisagg.core import EncodedPrompt, LoopThread
from mmdisagg.language.engine import Engine, StepOutput
from mmdisagg.language.request import Req, ReqStatus
from mmdisagg.messages import TRANSFER_FAILED, ErrorEvent, Event, TokenEvent
from mmdisagg.models.errors import InputError
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.receiver import ReceiverManager

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
BUSY_WAIT_S = 0.0005


Ready = tuple[Req, EncodedPrompt | ErrorEvent]


class PromptSource(Protocol):
    """Where prompts come from. All methods run on the scheduler's loop thread."""

    def add(self, request: Req) -> None: ...

    def ready(self, limit: int) -> list[Ready]:
        """Requests whose prompt is here (at most ``limit`` of them; the others stay where
        they are, holding their embedding-pool blocks) or failed, since the last call."""

    def abort(self, request: Req) -> bool:
        """Drop ``request`` if it is still here; False if it is not."""

    def queues(self) -> dict[str, int]: ...


class TransferSource:
    """Prompts received from encode servers: prealloc -> transfer."""

    def __init__(self, manager: ReceiverManager) -> None:
        self.manager = manager
        self.prealloc: deque[Req] = deque()
        self.transfer: list[Req] = []

    def add(self, request: Req) -> None:
        request.receiver = self.manager.create_receiver(request.room, request.encoder)
        self.prealloc.append(request)

    def ready(self, limit: int) -> list[Ready]:
        done: list[Ready] = []
        allocator = self.manager.pool.allocator
        while self.prealloc:
            request = self.prealloc[0]
            if request.receiver.poll() == Poll.Failed:
                self.prealloc.popleft()
                done.append((request, ErrorEvent(request.receiver.failure, 503, TRANSFER_FAILED)))
                continue
            allocation = allocator.alloc_default()
            if allocation is None:
                break
            request.receiver.init(allocation)
            request.status = ReqStatus.TRANSFER
            self.transfer.append(self.prealloc.popleft())
        for request in list(self.transfer):
            state = request.receiver.poll()
            if state == Poll.Success and limit > 0:
                self.transfer.remove(request)
                done.append((request, request.receiver.take()))
                limit -= 1
            elif state == Poll.Failed:
                self.transfer.remove(request)
                done.append((request, ErrorEvent(f"transfer failed: {request.receiver.failure}",
                                                 503, TRANSFER_FAILED)))
        return done

    def abort(self, request: Req) -> bool:
        for queue in (self.prealloc, self.transfer):
            if request in queue:
                queue.remove(request)
                request.receiver.abort()
                return True
        return False

    def queues(self) -> dict[str, int]:
        return {"prealloc": len(self.prealloc), "transfer": len(self.transfer)}


class LanguageScheduler(LoopThread):
    """Every live request is in ``_requests`` (by room); where it is, is its ``status``: in
    the source (prealloc, transfer), or in the engine (waiting, running, preempted)."""

    def __init__(self, engine: Engine, source: PromptSource,
                 settings: LanguageServerSettings) -> None:
        super().__init__("language-scheduler")
        self.engine = engine
        self.source = source
        self.settings = settings
        self.outcomes: Counter[str] = Counter()
        self.on_first_token: Callable[[float], None] = lambda seconds: None
        self.on_next_token: Callable[[float], None] = lambda seconds: None
        self._requests: dict[int, Req] = {}
        self._inbox: deque[Req] = deque()
        self._aborts: deque[int] = deque()

    @property
    def load(self) -> int:
        return len(self._requests) + len(self._inbox)

    def queues(self) -> dict[str, int]:
        return {**self.source.queues(), "waiting": len(self.engine.waiting),
                "running": len(self.engine.running)}

    def submit(self, request: Req) -> None:
        """Any thread. Overloaded: the request gets a 503 event at once."""
        if self.load >= self.settings.max_queued_requests:
            self.outcomes["overloaded"] += 1
            request.emit(ErrorEvent(f"{self.load} requests already queued; try again later",
                                    503, "overloaded"))
            return
        self._inbox.append(request)
        self.wake()

    def abort(self, room: int) -> None:
        """Any thread: stop ``room`` wherever it is; it gets no more events."""
        self._aborts.append(room)
        self.wake()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> float:
        self._receive()
        self._collect()
        self._reply(self._forward())
        if self.engine.running:
            return 0.0
        return BUSY_WAIT_S if self._requests or self._inbox else IDLE_WAIT_S

    def drain(self) -> None:
        for request in list(self._requests.values()):
            self.engine.abort(request)
            self._finish(request, ErrorEvent("language server shutting down", 503))

    def _receive(self) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            if request.room in self._requests:
                request.emit(ErrorEvent(f"duplicate room {request.room}", 409))
                continue
            try:
                self.source.add(request)
            except ValueError as exc:
                request.emit(ErrorEvent(str(exc), 409))
                continue
            self._requests[request.room] = request
        while self._aborts:
            request = self._requests.pop(self._aborts.popleft(), None)
            if request is None:
                continue
            if not self.source.abort(request):
                self.engine.abort(request)
            request.status = ReqStatus.FINISHED
            self.outcomes["aborted"] += 1

    def _collect(self) -> None:
        """Landed prompts join the engine's waiting queue while it is shorter than
        ``max_running_requests``; the rest wait in the embedding pool (back-pressure)."""
        room = self.settings.max_running_requests - len(self.engine.waiting)
        for request, prompt in self.source.ready(max(room, 0)):
            if isinstance(prompt, ErrorEvent):
                self._finish(request, prompt)
                continue
            request.prompt = prompt
            try:
                self.engine.add(request)
            except InputError as exc:
                self._finish(request, ErrorEvent(exc.message, exc.status))

    def _forward(self) -> list[StepOutput]:
        if not self.engine.has_work():
            return []
        try:
            return self.engine.step()
        except Exception as exc:  # a model failure fails the batch, not the server
            log.exception("forward pass failed")
            for request in [*self.engine.running, *self.engine.waiting]:
                self.engine.abort(request)
                self._finish(request, ErrorEvent(f"generation failed: {exc!r}", 500))
            return []

    def _reply(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            request = output.req
            if output.error is not None:
                self._finish(request, ErrorEvent(output.error, 503))
                continue
            if request.last_token_at is None:
                self.on_first_token(now - request.arrived)
            else:
                self.on_next_token(now - request.last_token_at)
            request.last_token_at = now
            event = TokenEvent(output.text, [output.token_id], output.finish_reason,
                               request.prompt_tokens, len(request.output_ids))
            if output.finish_reason is None:
                request.emit(event)
            else:
                self._finish(request, event)

    def _finish(self, request: Req, event: Event) -> None:
        self._requests.pop(request.room, None)
        request.status = ReqStatus.FINISHED
        self.outcomes["ok" if isinstance(event, TokenEvent) else "failed"] += 1
        request.emit(event)
