"""The language scheduler with its output thread, prompts encoded in-process (the colocated
source): requests answered through ``emit``, overload answered with a 503 at once."""

from __future__ import annotations

import queue

import pytest

from mmdisagg.config import EngineSettings, LanguageServerSettings
from mmdisagg.core import SamplingParams
from mmdisagg.language.engine import Engine
from mmdisagg.language.request import Req
from mmdisagg.language.scheduler import LanguageScheduler
from mmdisagg.messages import ErrorEvent, Event, TokenEvent
from mmdisagg.serve.colocated import LocalEncodeSource
from tests.models.fixtures import TinyModel, generate_greedy, text_part, user


@pytest.fixture
def qwen2_vl(tiny_models: dict[str, TinyModel]) -> TinyModel:
    return tiny_models["qwen2_vl"]


def scheduler(model: TinyModel, **knobs) -> LanguageScheduler:
    settings = LanguageServerSettings(**knobs)
    engine = Engine.build(model.language, EngineSettings(kv_cache_memory="1MiB"),
                          settings.max_running_requests)
    return LanguageScheduler(engine, LocalEncodeSource(model.encoder, None, 16, 16384), settings)


def submit(loop: LanguageScheduler, model: TinyModel, room: int, text: str,
           params: SamplingParams) -> queue.SimpleQueue[Event]:
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    loop.submit(Req(str(room), params, emit=events.put, room=room,
                    prepared=model.encoder.prepare(user(text_part(text)))))
    return events


def until_final(events: queue.SimpleQueue[Event]) -> list[Event]:
    received = [events.get(timeout=60)]
    while isinstance(received[-1], TokenEvent) and received[-1].finish_reason is None:
        received.append(events.get(timeout=60))
    return received


def test_requests_answered_through_the_output_thread(qwen2_vl: TinyModel) -> None:
    loop = scheduler(qwen2_vl)
    loop.start()
    try:
        texts = ["Tell me about boats.", "And about the sea?"]
        streams = [submit(loop, qwen2_vl, room, text, SamplingParams(max_tokens=8))
                   for room, text in enumerate(texts, start=1)]
        for text, events in zip(texts, streams, strict=True):
            received = until_final(events)
            tokens = [token for event in received for token in event.token_ids]
            assert tokens == generate_greedy(qwen2_vl, user(text_part(text)), 8).tokens
        assert loop.outcomes["ok"] == 2 and loop.load == 0
        assert loop.engine.blocks.stats().used_blocks == 0
    finally:
        loop.close()


def test_overload_gets_503_at_once(qwen2_vl: TinyModel) -> None:
    loop = scheduler(qwen2_vl, max_queued_requests=1)  # not started: the first stays queued
    try:
        submit(loop, qwen2_vl, 1, "first", SamplingParams())
        refused = submit(loop, qwen2_vl, 2, "second", SamplingParams()).get(timeout=30)
        assert isinstance(refused, ErrorEvent) and refused.status == 503
        assert "already queued" in refused.message and loop.outcomes["overloaded"] == 1
    finally:
        loop.output.close()
