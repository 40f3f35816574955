"""The goals read the right ratios, and say 'not measured' when a system is missing."""

from __future__ import annotations

import math

import pytest

from mmdisagg.bench.goals import evaluate
from mmdisagg.bench.metrics import RequestRecord, summarize


def summary(ttft: float, gap: float, requests: int = 4):
    """``requests`` back-to-back requests of 3 tokens: first after ``ttft``, then every
    ``gap`` seconds."""
    records, start = [], 0.0
    for index in range(requests):
        chunks = [start + ttft, start + ttft + gap, start + ttft + 2 * gap]
        records.append(RequestRecord(index, "g", start, chunks[-1], chunks, 3))
        start = chunks[-1]
    return summarize(records)


def test_goals_from_measured_ratios():
    results = {
        "latency": {"disagg-1+1": summary(0.105, 0.01), "colocated": summary(0.100, 0.01)},
        "throughput": {"disagg-1+1": summary(0.1, 0.01), "transformers-serve":
                       summary(0.3, 0.01)},
        "burst": {"disagg-1+1": summary(0.1, 0.02), "colocated": summary(0.1, 0.01)},
        "resume": {"disagg-1+1-windows-1": summary(0.12, 0.01),
                   "disagg-1+1-windows-16": summary(0.1, 0.01)},
        "video": {"disagg-1+1": summary(0.23, 0.01), "colocated": summary(0.2, 0.01)},
        "chat": {"disagg-1+1": summary(0.1, 0.01),
                 "disagg-1+1-no-prefix-cache": summary(0.4, 0.01)},
        "chat-system": {"disagg-1+1": summary(0.1, 0.01),
                        "disagg-1+1-no-prefix-cache": summary(0.9, 0.01)},
        "cold": {"disagg-1+1": summary(0.104, 0.01),
                 "disagg-1+1-no-prefix-cache": summary(0.1, 0.01)},
        "many-images": {"disagg-1+1": summary(0.7, 0.01),
                        "disagg-1+1-prefill-after-arrival": summary(1.0, 0.01)},
    }
    (latency, throughput, burst, resume, chat, chat_system, cold, arrival,
     video) = evaluate(results)
    assert latency.ratio == pytest.approx(1.05) and latency.met is True
    assert throughput.ratio == pytest.approx(0.32 / 0.12) and throughput.met is True
    assert burst.ratio == pytest.approx(2.0) and burst.met is False
    assert resume.ratio == pytest.approx(0.12 / 0.14) and resume.met is False
    assert video.ratio == pytest.approx(1.15) and video.met is False
    assert chat.ratio == pytest.approx(4.0) and chat.met is True
    assert chat_system.ratio == pytest.approx(9.0) and chat_system.met is False
    assert cold.ratio == pytest.approx(1.04) and cold.met is True
    assert arrival.ratio == pytest.approx(0.7) and arrival.met is True


def test_a_missing_system_is_not_measured_rather_than_failed():
    goals = evaluate({"latency": {"disagg-1+1": summary(0.1, 0.01)}})
    assert all(goal.met is None and math.isnan(goal.ratio) for goal in goals)
    assert goals[0].to_dict()["ratio"] is None
