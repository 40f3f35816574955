"""Serving metrics from per-request timestamps: pure functions, no I/O, no clock.

Definitions (the ones vLLM's and SGLang's serving benchmarks use):

* TTFT: request sent -> first chunk that carries output.
* TPOT: (end-to-end - TTFT) / (output tokens - 1), per request with at least two tokens.
* ITL: the gap between consecutive output chunks of a request, pooled over requests.
* end-to-end latency: request sent -> last byte of the reply.
* throughput: completed requests (or their output tokens) per second of the run's wall time.
* goodput: completed requests that meet every SLO, per second.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds on one monotonic clock."""

    index: int
    group: str
    start: float
    end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried output
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # the kind of failure: "http_503", "timeout", ...
    error_message: str = ""
    text: str = ""  # the answer, for a conversation's next turn

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start if self.chunk_times else math.nan

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float:
        if self.output_tokens < 2 or not self.chunk_times:
            return math.nan
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.chunk_times)]


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one latency, in milliseconds; NaN where there was no sample."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: Iterable[float]) -> Stats:
        values = np.array([s for s in seconds if not math.isnan(s)], dtype=float) * 1e3
        if values.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = np.percentile(values, PERCENTILES)
        return cls(int(values.size), float(values.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Summary:
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens of completed requests / s
    goodput: float  # completed requests meeting every SLO / s
    mean_output_tokens: float
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    errors: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=500,tpot=50"`` -> limits in milliseconds. ValueError with a reason otherwise."""
    limits: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"{item!r}: expected NAME=MILLISECONDS with NAME one of "
                             f"{', '.join(SLO_METRICS)}")
        try:
            limit = float(value.removesuffix("ms"))
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a number of milliseconds") from None
        if not limit > 0 or math.isinf(limit):
            raise ValueError(f"{item!r}: the limit must be a positive number of milliseconds")
        limits[name] = limit
    return limits


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Completed, and every limited latency within its limit (a missing TPOT, as for a
    one-token reply, does not fail the TPOT limit)."""
    if not record.ok:
        return False
    for name, limit_ms in slo.items():
        value = getattr(record, name)
        if not math.isnan(value) and value * 1e3 > limit_ms:
            return False
    return True


def wall_time(records: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last one finished."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def summarize(records: Sequence[RequestRecord], slo: dict[str, float] | None = None,
              duration_s: float | None = None) -> Summary:
    """Every metric of one run. ``duration_s`` defaults to the records' own wall time."""
    slo = slo or {}
    done = [r for r in records if r.ok]
    duration = wall_time(records) if duration_s is None else duration_s
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    tokens = sum(r.output_tokens for r in done)
    return Summary(
        requests=len(records), completed=len(done), failed=len(records) - len(done),
        duration_s=duration, request_throughput=per_second(len(done)),
        output_throughput=per_second(tokens),
        goodput=per_second(sum(meets_slo(r, slo) for r in done)),
        mean_output_tokens=tokens / len(done) if done else math.nan,
        ttft_ms=Stats.of(r.ttft for r in done), tpot_ms=Stats.of(r.tpot for r in done),
        itl_ms=Stats.of(gap for r in done for gap in r.itls),
        e2e_ms=Stats.of(r.e2e for r in done),
        errors=dict(Counter(r.error for r in records if not r.ok)))


def by_group(records: Sequence[RequestRecord]) -> dict[str, list[RequestRecord]]:
    groups: dict[str, list[RequestRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    return groups
