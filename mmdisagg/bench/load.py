"""How requests are offered: open loop at a rate (Poisson, or burstier with gamma gaps), or
closed loop at a fixed concurrency; bounded by the stream's length and by time.

At the time limit no new request starts; those in flight finish (each is bounded by the
client's timeout), so every request sent is counted.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mmdisagg.bench.client import Endpoint, send
from mmdisagg.bench.metrics import RequestRecord, Summary, by_group, summarize, wall_time
from mmdisagg.bench.progress import Progress
from mmdisagg.bench.workload import ChatRequest


@dataclass(frozen=True)
class Load:
    """Open loop when ``concurrency`` is 0: requests start at ``request_rate`` per second
    (``inf``: all at once) with gamma-distributed gaps of shape ``burstiness`` (1 = Poisson,
    below 1 = burstier). Closed loop otherwise: ``concurrency`` requests always in flight."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int = 0
    max_seconds: float = 600.0
    start_delay_s: float = 0.0  # wait this long before the first request

    def __post_init__(self) -> None:
        if not self.request_rate > 0 or self.burstiness <= 0 or self.concurrency < 0:
            raise ValueError("need request rate > 0, burstiness > 0 and concurrency >= 0")

    @property
    def label(self) -> str:
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return f"rate {self.request_rate:g}/s"

    def to_dict(self) -> dict:
        return {"request_rate": str(self.request_rate) if math.isinf(self.request_rate)
                else self.request_rate, "burstiness": self.burstiness,
                "concurrency": self.concurrency, "max_seconds": self.max_seconds,
                "start_delay_s": self.start_delay_s}


def arrival_offsets(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each of ``count`` requests is sent: cumulative gamma
    gaps with mean ``1 / rate`` (exponential, i.e. Poisson arrivals, for burstiness 1)."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return offsets


async def run_load(endpoint: Endpoint, requests: list[ChatRequest], load: Load,
                   progress: Progress, seed: int = 0) -> list[RequestRecord]:
    """Offer ``requests`` to ``endpoint`` as ``load`` says; the record of every request sent."""
    async with endpoint.client() as client:
        await asyncio.sleep(load.start_delay_s)
        deadline = time.perf_counter() + load.max_seconds

        async def one(request: ChatRequest | None) -> list[RequestRecord]:
            """A conversation: its turns one after the other, until one fails."""
            records = []
            while request is not None:
                progress.started()
                record = await send(client, endpoint, request)
                progress.finished(record.ok)
                records.append(record)
                request = request.follow_up(record.text) if record.ok else None
            return records

        if load.concurrency:
            pending = iter(requests)
            records: list[RequestRecord] = []

            async def worker() -> None:
                for request in pending:
                    if time.perf_counter() >= deadline:
                        return
                    records.extend(await one(request))

            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
            return records
        tasks = []
        start = time.perf_counter()
        offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, seed)
        for request, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if start + offset >= deadline:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        return [record for records in await asyncio.gather(*tasks) for record in records]


@dataclass(frozen=True)
class Stream:
    """Requests and how they are offered; several streams can share one run."""

    requests: list[ChatRequest]
    load: Load


@dataclass
class Run:
    label: str
    streams: Sequence[Stream]
    records: list[RequestRecord]

    def summary(self, slo: dict[str, float]) -> Summary:
        return summarize(self.records, slo)

    def group_summaries(self, slo: dict[str, float]) -> dict[str, Summary]:
        """Per request group (e.g. ongoing text next to an image burst), over the run's time."""
        duration = wall_time(self.records)
        return {group: summarize(records, slo, duration)
                for group, records in by_group(self.records).items()}


async def measure(endpoint: Endpoint, label: str, streams: Sequence[Stream],
                  seed: int = 0) -> Run:
    """Run every stream at once against ``endpoint``, under one progress bar."""
    progress = Progress(label, sum(request.turns for s in streams for request in s.requests))
    try:
        results = await asyncio.gather(*(run_load(endpoint, s.requests, s.load, progress, seed)
                                         for s in streams))
    finally:
        progress.close()
    return Run(label, streams, [record for records in results for record in records])


async def warm_up(endpoint: Endpoint, requests: list[ChatRequest]) -> None:
    """Send ``requests`` one by one and forget them: first requests pay one-time costs
    (lazy imports, allocator growth, connection set-up) that are not the server's speed."""
    progress = Progress("warm-up", sum(request.turns for request in requests))
    try:
        await run_load(endpoint, requests, Load(concurrency=1), progress)
    finally:
        progress.close()
