"""The language server's loop, one thread: receive -> collect -> forward (the engine admits,
schedules and runs) -> reply (handed to the output thread, which detokenizes and delivers).

Requests go prealloc -> transfer -> waiting -> running. Where their prompts come from is the
``PromptSource``: ``TransferSource`` (the language server: a first window of ``alloc_default``
blocks as soon as blocks are free, then receive; a prompt joins the engine at its first rows
and is prefilled as far as its rows landed, while the rest arrive) or, for ``serve
--colocated``, a source that runs an encoder half in this same loop. A request without free
blocks waits in prealloc; it is never dropped. Running requests decode together, new ones
joining between steps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from mmdisagg.config import LanguageServerSettings
from mmdisagg.core import EncodedPrompt, LoopThread
from mmdisagg.language.engine import Engine, StepOutput
from mmdisagg.language.kv_blocks import KVBlockManager
from mmdisagg.language.output import Direct, OutputProcessor, OutputThread
from mmdisagg.language.request import Req, ReqStatus
from mmdisagg.messages import TRANSFER_FAILED, ErrorEvent, Event, TokenEvent
from mmdisagg.models.errors import InputError
from mmdisagg.transfer.protocol import Poll
from mmdisagg.transfer.receiver import EmbeddingReceiver, ReceiverManager

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
BUSY_WAIT_S = 0.0005


Ready = tuple[Req, EncodedPrompt | ErrorEvent]


class PromptSource(Protocol):
    """Where prompts come from. All methods run on the scheduler's loop thread."""

    def attach(self, prefix_cache: KVBlockManager | None) -> None:
        """Before the first request: the engine's prefix cache, to look prompts up in early
        (None: no prefix cache)."""

    def add(self, request: Req) -> None: ...

    def ready(self, limit: int) -> list[Ready]:
        """Requests whose prompt is here or arriving (at most ``limit`` of them; the others
        stay where they are, holding their embedding-pool blocks), or failed, since the last
        call. A request whose prompt was arriving when it came out fails here too; the
        ``landed_tokens`` of each of its choices is kept up to date, None once all landed."""

    def abort(self, request: Req) -> None:
        """Drop ``request`` if it is still here."""

    def queues(self) -> dict[str, int]: ...


class TransferSource:
    """Prompts received from encode servers: prealloc -> transfer (-> arriving: in the engine,
    the rest of the prompt still on its way)."""

    def __init__(self, manager: ReceiverManager, early: bool = True) -> None:
        self.manager = manager
        # NOTE: deepstack rows (Qwen3-VL) are put in token order once every row landed
        self.early = early and not manager.pool.layout.deepstack_layers
        self.prealloc: deque[Req] = deque()
        self.transfer: list[Req] = []
        self.arriving: list[Req] = []

    def attach(self, prefix_cache: KVBlockManager | None) -> None:
        """The receivers look announced prompts up in it, to be sent only what it lacks."""
        self.manager.prefix_cache = prefix_cache

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
                done.append((request, self._failure(request.receiver)))
                continue
            allocation = allocator.alloc_default()
            if allocation is None:
                break
            request.receiver.init(allocation)
            request.status = ReqStatus.TRANSFER
            self.transfer.append(self.prealloc.popleft())
        for request in list(self.transfer):
            state = request.receiver.poll()
            if state == Poll.Failed:
                self.transfer.remove(request)
                done.append((request, self._failure(request.receiver)))
            elif limit > 0 and (state == Poll.Success
                                or (self.early and state == Poll.Transferring)):
                self.transfer.remove(request)
                try:
                    done.append((request, request.receiver.take()))
                except RuntimeError:  # it failed since polled
                    done.append((request, self._failure(request.receiver)))
                    continue
                self.arriving.append(request)
                limit -= 1
        for request in list(self.arriving):
            receiver = request.receiver
            if receiver.poll() == Poll.Failed:
                self.arriving.remove(request)
                done.append((request, self._failure(receiver)))
                continue
            landed: int | None = receiver.landed()
            if receiver.poll() == Poll.Success:
                receiver.take()  # the rest of its rows; frees its last blocks
                self.arriving.remove(request)
                landed = None
            for choice in request.choices or [request]:
                choice.landed_tokens = landed
        return done

    @staticmethod
    def _failure(receiver: EmbeddingReceiver) -> ErrorEvent:
        if receiver.refused:
            return ErrorEvent(receiver.failure, 400, "invalid_request_error")
        return ErrorEvent(f"transfer failed: {receiver.failure}", 503, TRANSFER_FAILED)

    def abort(self, request: Req) -> None:
        for queue in (self.prealloc, self.transfer, self.arriving):
            if request in queue:
                queue.remove(request)
                request.receiver.abort()

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
        self.output = OutputThread(OutputProcessor(engine.half.tokenizer, self._stopped))
        self._requests: dict[int, Req] = {}
        self._inbox: deque[Req] = deque()
        self._aborts: deque[int] = deque()
        self._stops: deque[Req] = deque()

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
            self.output.put(Direct(request, ErrorEvent(
                f"{self.load} requests already queued; try again later", 503, "overloaded")))
            return
        self._inbox.append(request)
        self.wake()

    def abort(self, room: int) -> None:
        """Any thread: stop ``room`` wherever it is."""
        self._aborts.append(room)
        self.wake()

    def close(self) -> None:
        super().close()
        self.output.close()

    def _stopped(self, request: Req) -> None:
        """The output thread: ``request``'s text reached a stop string; its last event is
        out."""
        self._stops.append(request)
        self.wake()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> float:
        self._receive()
        self._collect()
        self._reply(self._forward())
        if self.engine.running and self.engine.stepped_tokens:
            return 0.0
        return BUSY_WAIT_S if self._requests or self._inbox else IDLE_WAIT_S

    def drain(self) -> None:
        for request in list(self._requests.values()):
            for choice in request.choices or [request]:
                self.engine.abort(choice)
            self._finish(request, ErrorEvent("language server shutting down", 503))

    def _receive(self) -> None:
        while self._inbox:
            request = self._inbox.popleft()
            if request.room in self._requests:
                self.output.put(Direct(request, ErrorEvent(f"duplicate room {request.room}",
                                                           409)))
                continue
            try:
                self.source.add(request)
            except ValueError as exc:
                self.output.put(Direct(request, ErrorEvent(str(exc), 409)))
                continue
            self._requests[request.room] = request
        while self._aborts:
            request = self._requests.pop(self._aborts.popleft(), None)
            if request is None:
                continue
            self._drop(request)
            request.status = ReqStatus.FINISHED
            self.outcomes["aborted"] += 1
        while self._stops:
            request = self._stops.popleft()
            owner = self._requests.get(request.room)
            if owner is None or request not in (owner.choices or [owner]):
                continue  # aborted or failed meanwhile
            self.engine.abort(request)
            request.status = ReqStatus.FINISHED
            request.finish_reason = request.finish_reason or "stop"
            if all_done(request):
                del self._requests[request.room]
                self.outcomes["ok"] += 1

    def _collect(self) -> None:
        """Landed prompts join the engine's waiting queue while it is shorter than
        ``max_running_requests``; the rest wait in the embedding pool (back-pressure)."""
        room = self.settings.max_running_requests - len(self.engine.waiting)
        for request, prompt in self.source.ready(max(room, 0)):
            if isinstance(prompt, ErrorEvent):
                self._finish(request, prompt)
                continue
            request.prompt = prompt
            # NOTE: n choices: the prompt was encoded and sent once; each choice holds its own
            # pins of a prefix-cache hit and prefills the rest of the prompt itself.
            choices = [request, *(request.fork(i) for i in range(1, request.params.n))]
            if prompt.prefix is not None:
                for choice in choices[1:]:
                    choice.prompt = replace(prompt, prefix=self.engine.blocks.share(prompt.prefix))
            if len(choices) > 1:
                for choice in choices:
                    choice.choices = choices
            added: list[Req] = []
            try:
                for choice in choices:
                    self.engine.add(choice)
                    added.append(choice)
            except InputError as exc:
                for choice in choices:  # NOTE: a choice not added still holds its pins
                    if choice not in added and choice.prompt.prefix is not None:
                        self.engine.blocks.release(choice.prompt.prefix)
                for choice in added:
                    self.engine.abort(choice)
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
        """Timing metrics and bookkeeping here; text and delivery on the output thread, one
        message per step."""
        now = time.monotonic()
        for output in outputs:
            request = output.req
            if output.error is None:
                if request.last_token_at is None:
                    self.on_first_token(now - request.arrived)
                else:
                    self.on_next_token(now - request.last_token_at)
                request.last_token_at = now
            else:  # one choice failed: so does the request
                for choice in request.choices:
                    if self.engine.abort(choice):
                        choice.finish_reason = "error"
            if (output.finish_reason is not None and all_done(request)
                    and request.room in self._requests):
                del self._requests[request.room]
                self.outcomes["failed" if output.error else "ok"] += 1
        if outputs:
            self.output.put(outputs)

    def _drop(self, request: Req) -> None:
        """Out of the source (its prompt may still be arriving) and the engine."""
        self.source.abort(request)
        for choice in request.choices or [request]:
            self.engine.abort(choice)

    def _finish(self, request: Req, event: Event) -> None:
        self._drop(request)
        self._requests.pop(request.room, None)
        request.status = ReqStatus.FINISHED
        self.outcomes["ok" if isinstance(event, TokenEvent) else "failed"] += 1
        self.output.put(Direct(request, event))


def all_done(request: Req) -> bool:
    """Every choice of ``request``'s room has finished."""
    return all(choice.finish_reason is not None for choice in request.choices or [request])
