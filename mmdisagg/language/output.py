"""Generated tokens -> client events, off the scheduler's thread.

The scheduler hands over one message per step (every request's new token) and the events it
decides itself (errors); ``OutputProcessor`` detokenizes incrementally (stop strings held back,
see ``Detokenizer``) and ``OutputThread`` delivers each message's events in one batch, so the
HTTP side gets one wake-up per step instead of one callback per token.

NOTE: a stop string is found here, after the engine may have generated a token or two more:
the request's last event ends the text before the stop string, ``on_stop`` asks the scheduler
to end it, and tokens still arriving for it are dropped.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mmdisagg.language.detokenizer import Detokenizer, TokenTexts
from mmdisagg.language.engine import StepOutput
from mmdisagg.language.request import Req
from mmdisagg.messages import ErrorEvent, Event, TokenEvent, TokenLogprob

log = logging.getLogger(__name__)

Delivered = list[tuple[Req, Event]]


@dataclass(frozen=True)
class Direct:
    """An event the scheduler decided (an error, an overload): delivered as it is, in order."""

    req: Req
    event: Event


class OutputProcessor:
    """Turns step outputs into events. One thread calls it (not thread-safe)."""

    def __init__(self, tokenizer: Any, on_stop: Callable[[Req], None] = lambda req: None
                 ) -> None:
        self.tokenizer = tokenizer
        self.on_stop = on_stop
        self.token_texts = TokenTexts(tokenizer)

    def process(self, message: Sequence[StepOutput] | Direct) -> Delivered:
        if isinstance(message, Direct):
            return [] if message.req.delivered_final else [self._final(message.req,
                                                                      message.event)]
        events = []
        for output in message:
            req = output.req
            if req.delivered_final:
                continue
            if output.error is not None:
                events.append(self._final(req, ErrorEvent(output.error, 503)))
                continue
            text, finish_reason = self._text(req, output)
            req.delivered_tokens += 1
            event = TokenEvent(text, [output.token_id], finish_reason, req.prompt_tokens,
                               req.delivered_tokens, req.index, self._logprobs(output))
            events.append(self._final(req, event) if finish_reason else (req, event))
            if finish_reason and output.finish_reason is None:
                self.on_stop(req)
        return events

    def _logprobs(self, output: StepOutput) -> list[TokenLogprob] | None:
        if output.logprob is None:
            return None
        logprob, top = output.logprob
        text = self.token_texts
        return [TokenLogprob(text(output.token_id), logprob,
                             [(text(token), value) for token, value in top])]

    @staticmethod
    def _final(req: Req, event: Event) -> tuple[Req, Event]:
        req.delivered_final = True
        return req, event

    def _text(self, req: Req, output: StepOutput) -> tuple[str, str | None]:
        """The new text safe to show and the finish reason, a stop string's included."""
        if req.detokenizer is None:
            req.detokenizer = Detokenizer(self.tokenizer, req.params.stop)
        detokenizer = req.detokenizer
        if output.finish_reason == "stop":  # a stop id or EOS: not part of the text
            return detokenizer.flush(), "stop"
        text = detokenizer.push(output.token_id)
        if detokenizer.stopped:
            return text, "stop"
        if output.finish_reason is not None:
            return text + detokenizer.flush(), output.finish_reason
        return text, None


def emit_each(delivered: Delivered) -> None:
    """Deliver by calling each request's ``emit`` on this thread."""
    for req, event in delivered:
        req.emit(event)


class OutputThread:
    """``OutputProcessor`` on a thread of its own; ``deliver`` gets each message's events."""

    def __init__(self, processor: OutputProcessor,
                 deliver: Callable[[Delivered], None] = emit_each) -> None:
        self.processor = processor
        self.deliver = deliver
        self._inbox: queue.SimpleQueue[Sequence[StepOutput] | Direct | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="language-output", daemon=True)
        self._thread.start()

    def put(self, message: Sequence[StepOutput] | Direct) -> None:
        """Any thread (the scheduler's): a step's outputs, or one event."""
        self._inbox.put(message)

    def close(self) -> None:
        """After the last ``put``: deliver what is queued, then stop."""
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while (message := self._inbox.get()) is not None:
                delivered = self.processor.process(message)
                if delivered:
                    self.deliver(delivered)
        except Exception:  # as LoopThread: never a server that looks alive and answers nothing
            log.critical("the output thread crashed; stopping this server", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
