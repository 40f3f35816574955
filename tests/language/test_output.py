"""Step outputs -> client events on the output thread: incremental text, stop strings found
after the engine generated more, usage counts, one delivery per step."""

from __future__ import annotations

import pytest

from mmdisagg.core import SamplingParams
from mmdisagg.language.engine import Engine
from mmdisagg.language.output import Direct, OutputProcessor, OutputThread
from mmdisagg.language.request import Req
from mmdisagg.messages import ErrorEvent, Event, TokenEvent
from tests.language.test_engine import req
from tests.models.fixtures import TinyModel, paged_engine


@pytest.fixture
def qwen2_vl(tiny_models: dict[str, TinyModel]) -> TinyModel:
    return tiny_models["qwen2_vl"]


def events_of(engine: Engine, new: Req) -> list[Event]:
    """Run ``new`` alone; every event it gets, the stop-string stop aborting it as the
    scheduler does."""
    processor = OutputProcessor(engine.half.tokenizer, on_stop=engine.abort)
    engine.add(new)
    events = []
    while engine.has_work():
        events += [event for _, event in processor.process(engine.step())]
    return events


def text(events: list[Event]) -> str:
    return "".join(event.text for event in events)


def test_text_is_the_detokenized_tokens(qwen2_vl: TinyModel) -> None:
    new = req(qwen2_vl, "one image", SamplingParams(max_tokens=20))
    events = events_of(paged_engine(qwen2_vl.language), new)
    decoded = qwen2_vl.language.tokenizer.decode(new.output_ids, skip_special_tokens=True)
    assert text(events) == decoded
    assert [event.completion_tokens for event in events] == list(range(1, len(events) + 1))
    assert events[-1].finish_reason is not None


def test_stop_string_ends_the_text_before_it(qwen2_vl: TinyModel) -> None:
    full = text(events_of(paged_engine(qwen2_vl.language),
                          req(qwen2_vl, "one image", SamplingParams(max_tokens=20))))
    start = next(i for i in range(3, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
    stop = full[start:start + 3]
    engine = paged_engine(qwen2_vl.language)
    stopped = req(qwen2_vl, "one image", SamplingParams(max_tokens=20, stop=("never", stop)))
    events = events_of(engine, stopped)
    assert text(events) == full[:full.index(stop)]
    assert events[-1].finish_reason == "stop" and len(events) < 20
    assert engine.blocks.stats().used_blocks == 0 and len(engine) == 0


def test_tokens_after_the_final_event_are_dropped(qwen2_vl: TinyModel) -> None:
    engine = paged_engine(qwen2_vl.language)
    new = req(qwen2_vl, "text only", SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add(new)
    processor = OutputProcessor(engine.half.tokenizer)
    first = processor.process(engine.step())
    failed = processor.process(Direct(new, ErrorEvent("gone", 503)))
    assert [type(event) for _, event in first + failed] == [TokenEvent, ErrorEvent]
    assert processor.process(engine.step()) == []


def test_output_thread_delivers_one_batch_per_step(qwen2_vl: TinyModel) -> None:
    engine = paged_engine(qwen2_vl.language)
    batches: list[list[tuple[Req, Event]]] = []
    thread = OutputThread(OutputProcessor(engine.half.tokenizer), batches.append)
    reqs = [req(qwen2_vl, "text only", SamplingParams(max_tokens=3, ignore_eos=True), str(i))
            for i in range(3)]
    for new in reqs:
        engine.add(new)
    steps = 0
    while engine.has_work():
        thread.put(engine.step())
        steps += 1
    thread.close()
    assert len(batches) == steps == 3
    assert all({r.request_id for r, _ in batch} == {"0", "1", "2"} for batch in batches)
    assert all(event.finish_reason == "length" for _, event in batches[-1])
