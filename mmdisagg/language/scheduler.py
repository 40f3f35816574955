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
from dataclasses import dataclass, field
from typing import Protocol

from mmdisagg.config import LanguageServerSettings
from mmdisagg.core import EncodedPrompt, LoopThread, SamplingParams
from mmdisagg.language.engine import Engine, StepOutput
from mmdisagg.messages import TRANSFER_FAILED, ErrorEvent, Event, TokenEvent
from mmdisagg.models.base import PreparedPrompt
from mmdisagg.models.errors import InputError
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.receiver import EmbeddingReceiver, ReceiverManager

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
BUSY_WAIT_S = 0.0005


@dataclass(eq=False)
class GenerationRequest:
    room: int
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the loop thread, once per event
    encoder: str = ""  # bootstrap address of the encode server sending the prompt
    prepared: PreparedPrompt | None = None  # colocated: the prompt to encode here
    receiver: EmbeddingReceiver | None = None
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return str(self.room)


Ready = tuple[GenerationRequest, EncodedPrompt | ErrorEvent]


class PromptSource(Protocol):
    """Where prompts come from. All methods run on the scheduler's loop thread."""

    def add(self, request: GenerationRequest) -> None: ...

    def ready(self) -> list[Ready]:
        """Requests whose prompt is here (or failed), since the last call."""

    def abort(self, request: GenerationRequest) -> bool:
        """Drop ``request`` if it is still here; False if it is not."""

    def queues(self) -> dict[str, int]: ...


class TransferSource:
    """Prompts received from encode servers: prealloc -> transfer."""

    def __init__(self, manager: ReceiverManager) -> None:
        self.manager = manager
        self.prealloc: deque[GenerationRequest] = deque()
        self.transfer: list[GenerationRequest] = []

    def add(self, request: GenerationRequest) -> None:
        request.receiver = self.manager.create_receiver(request.room, request.encoder)
        self.prealloc.append(request)

    def ready(self) -> list[Ready]:
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
            self.transfer.append(self.prealloc.popleft())
        for request in list(self.transfer):
            state = request.receiver.poll()
            if state == Poll.Success:
                self.transfer.remove(request)
                done.append((request, request.receiver.take()))
            elif state == Poll.Failed:
                self.transfer.remove(request)
                done.append((request, ErrorEvent(f"transfer failed: {request.receiver.failure}",
                                                 503, TRANSFER_FAILED)))
        return done

    def abort(self, request: GenerationRequest) -> bool:
        for queue in (self.prealloc, self.transfer):
            if request in queue:
                queue.remove(request)
                request.receiver.abort()
                return True
        return False

    def queues(self) -> dict[str, int]:
        return {"prealloc": len(self.prealloc), "transfer": len(self.transfer)}


class LanguageScheduler(LoopThread):
    def __init__(self, engine: Engine, source: PromptSource,
                 settings: LanguageServerSettings) -> None:
        super().__init__("language-scheduler")
        self.engine = engine
        self.source = source
        self.settings = settings
        self.waiting: deque[tuple[GenerationRequest, EncodedPrompt]] = deque()
        self.running: dict[str, GenerationRequest] = {}
        self.outcomes: Counter[str] = Counter()
        self.on_first_token: Callable[[float], None] = lambda seconds: None
        self.on_next_token: Callable[[float], None] = lambda seconds: None
        self._requests: dict[int, GenerationRequest] = {}
        self._inbox: deque[GenerationRequest] = deque()
        self._aborts: deque[int] = deque()

    @property
    def load(self) -> int:
        return len(self._requests) + len(self._inbox)

    def queues(self) -> dict[str, int]:
        return {**self.source.queues(), "waiting": len(self.waiting),
                "running": len(self.running)}

    def submit(self, request: GenerationRequest) -> None:
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
        self._admit()
        self._reply(self._forward())
        if self.engine.has_work():
            return 0.0
        return BUSY_WAIT_S if self._requests or self._inbox else IDLE_WAIT_S

    def drain(self) -> None:
        for request in list(self._requests.values()):
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
            request = self._requests.get(self._aborts.popleft())
            if request is None:
                continue
            if not self.source.abort(request):
                self.engine.abort(request.request_id)
                self.running.pop(request.request_id, None)
                self.waiting = deque(item for item in self.waiting if item[0] is not request)
            self._requests.pop(request.room, None)
            self.outcomes["aborted"] += 1

    def _collect(self) -> None:
        for request, prompt in self.source.ready():
            if isinstance(prompt, ErrorEvent):
                self._finish(request, prompt)
            else:
                self.waiting.append((request, prompt))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.settings.max_running_requests:
            request, prompt = self.waiting.popleft()
            try:
                self.engine.add(request.request_id, prompt, request.params)
            except InputError as exc:
                self._finish(request, ErrorEvent(exc.message, exc.status))
                continue
            self.running[request.request_id] = request

    def _forward(self) -> list[StepOutput]:
        if not self.engine.has_work():
            return []
        try:
            return self.engine.step()
        except Exception as exc:  # a model failure fails the batch, not the server
            log.exception("forward pass failed")
            for request_id, request in list(self.running.items()):
                self.engine.abort(request_id)
                self._finish(request, ErrorEvent(f"generation failed: {exc!r}", 500))
            return []

    def _reply(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            request = self.running.get(output.request_id)
            if request is None:
                continue
            if request.last_token_at is None:
                self.on_first_token(now - request.arrived)
            else:
                self.on_next_token(now - request.last_token_at)
            request.last_token_at = now
            event = TokenEvent(output.text, [output.token_id], output.finish_reason,
                               output.prompt_tokens, output.completion_tokens)
            if output.finish_reason is None:
                request.emit(event)
            else:
                self._finish(request, event)

    def _finish(self, request: GenerationRequest, event: Event) -> None:
        self.running.pop(request.request_id, None)
        self._requests.pop(request.room, None)
        self.outcomes["ok" if isinstance(event, TokenEvent) else "failed"] += 1
        request.emit(event)
