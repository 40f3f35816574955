"""The goals of issues 6, 13 and 15 as ratios of measured numbers, over run summaries."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mmdisagg.bench.metrics import Summary

Results = Mapping[str, Mapping[str, Summary]]  # scenario -> system -> focus-group summary


@dataclass(frozen=True)
class Goal:
    name: str
    target: str  # the ratio and its bound, in words
    ratio: float  # NaN: not measured (a system or scenario missing or failed)
    met: bool | None  # None: not measured

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target,
                "ratio": None if math.isnan(self.ratio) else self.ratio, "met": self.met}


def _ratio(results: Results, scenario: str, numerator: str, denominator: str,
           value: Callable[[Summary], float]) -> float:
    runs = results.get(scenario, {})
    if numerator not in runs or denominator not in runs:
        return math.nan
    top, bottom = value(runs[numerator]), value(runs[denominator])
    return top / bottom if bottom > 0 else math.nan


def _goal(name: str, target: str, ratio: float, ok: Callable[[float], bool]) -> Goal:
    return Goal(name, target, ratio, None if math.isnan(ratio) else ok(ratio))


def evaluate(results: Results) -> list[Goal]:
    return [
        _goal("TTFT at concurrency 1",
              "disagg-1+1 TTFT p50 / colocated TTFT p50 <= 1.10",
              _ratio(results, "latency", "disagg-1+1", "colocated", lambda s: s.ttft_ms.p50),
              lambda r: r <= 1.10),
        _goal("throughput at concurrency 16",
              "disagg-1+1 requests/s / transformers-serve requests/s >= 2",
              _ratio(results, "throughput", "disagg-1+1", "transformers-serve",
                     lambda s: s.request_throughput), lambda r: r >= 2.0),
        _goal("TPOT of ongoing generations under an image burst",
              "disagg-1+1 text TPOT p99 / colocated text TPOT p99 < 1",
              _ratio(results, "burst", "disagg-1+1", "colocated", lambda s: s.tpot_ms.p99),
              lambda r: r < 1.0),
        _goal("resume-heavy transfer",
              "windows-1 requests/s / windows-16 requests/s >= 0.90",
              _ratio(results, "resume", "disagg-1+1-windows-1", "disagg-1+1-windows-16",
                     lambda s: s.request_throughput), lambda r: r >= 0.90),
        _goal("second chat turn with the prefix cache",
              "no-prefix-cache turn-2 TTFT p50 / prefix-cache turn-2 TTFT p50 >= 3",
              _ratio(results, "chat", "disagg-1+1-no-prefix-cache", "disagg-1+1",
                     lambda s: s.ttft_ms.p50), lambda r: r >= 3.0),
        _goal("second chat turn after a long system prompt",
              "no-prefix-cache turn-2 TTFT p50 / prefix-cache turn-2 TTFT p50 >= 10",
              _ratio(results, "chat-system", "disagg-1+1-no-prefix-cache", "disagg-1+1",
                     lambda s: s.ttft_ms.p50), lambda r: r >= 10.0),
        _goal("prefix cache when nothing hits",
              "prefix-cache TTFT p50 / no-prefix-cache TTFT p50 <= 1.05",
              _ratio(results, "cold", "disagg-1+1", "disagg-1+1-no-prefix-cache",
                     lambda s: s.ttft_ms.p50), lambda r: r <= 1.05),
        _goal("8-image prompt prefilled while it arrives",
              "prefill-while-arriving TTFT p50 / prefill-after-arrival TTFT p50 <= 0.75",
              _ratio(results, "many-images", "disagg-1+1", "disagg-1+1-prefill-after-arrival",
                     lambda s: s.ttft_ms.p50), lambda r: r <= 0.75),
        _goal("TTFT of a 16-frame video at concurrency 1",
              "disagg-1+1 TTFT p50 / colocated TTFT p50 <= 1.10",
              _ratio(results, "video", "disagg-1+1", "colocated", lambda s: s.ttft_ms.p50),
              lambda r: r <= 1.10),
    ]
