"""Resident memory of a cluster's servers over a long run, and whether it stayed flat.

A server started again after a fault is a new process whose memory starts over: each
process ("life") is judged on its own, from the end of its warm-up to its last sample.
"""

from __future__ import annotations

import csv
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from mmdisagg.serve.launcher import Child

MB = 1024 * 1024


@dataclass(frozen=True)
class RssSample:
    t: float  # seconds since the run began
    server: str
    pid: int
    rss_mb: float


@dataclass(frozen=True)
class FlatLimit:
    """Growth allowed after warm-up: the larger of an absolute and a relative bound (a
    small process jitters by megabytes as the allocator keeps and returns pages)."""

    max_growth_mb: float = 20.0
    max_growth_share: float = 0.10
    min_span_s: float = 30.0  # a life shorter than this after warm-up is not judged
    reference_s: float = 20.0  # each end is the median RSS over this long

    def allows(self, start_mb: float, growth_mb: float) -> bool:
        return growth_mb <= max(self.max_growth_mb, self.max_growth_share * start_mb)


@dataclass(frozen=True)
class Growth:
    """RSS of one process from the end of its warm-up to its last sample."""

    server: str
    pid: int
    from_s: float
    to_s: float
    start_mb: float
    end_mb: float
    flat: bool | None  # None: too short after warm-up to judge

    @property
    def growth_mb(self) -> float:
        return self.end_mb - self.start_mb

    def to_dict(self) -> dict:
        return {**asdict(self), "growth_mb": round(self.growth_mb, 1),
                "growth_pct": round(100 * self.growth_mb / self.start_mb, 1)
                if self.start_mb else None}


class RssSampler:
    """Samples every server process's RSS every ``interval_s`` in its own thread."""

    def __init__(self, children: Sequence[Child], clock: Callable[[], float],
                 interval_s: float = 2.0) -> None:
        self.children = children
        self.clock = clock
        self.interval_s = interval_s
        self.samples: list[RssSample] = []

    def run(self, stop: threading.Event) -> None:
        while True:
            self.sample()
            if stop.wait(self.interval_s):
                return

    def sample(self) -> None:
        for child in self.children:
            pid = child.process.pid
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:  # between a kill and the restart
                continue
            self.samples.append(RssSample(round(self.clock(), 2), child.name, pid, rss / MB))


def lives(samples: Sequence[RssSample]) -> dict[tuple[str, int], list[RssSample]]:
    """Samples per process, in time order."""
    grouped: dict[tuple[str, int], list[RssSample]] = {}
    for sample in sorted(samples, key=lambda s: s.t):
        grouped.setdefault((sample.server, sample.pid), []).append(sample)
    return grouped


def growth(samples: Sequence[RssSample], warmup_s: float, limit: FlatLimit) -> list[Growth]:
    """Each process's growth after its warm-up (``warmup_s`` from its first sample)."""
    results = []
    for (server, pid), life in lives(samples).items():
        warm = life[0].t + warmup_s
        after = [s for s in life if s.t >= warm]
        if not after:
            continue
        end_t = after[-1].t
        reference = min(limit.reference_s, (end_t - after[0].t) / 4)
        head = [s.rss_mb for s in after if s.t <= after[0].t + reference]
        tail = [s.rss_mb for s in after if s.t >= end_t - reference]
        start_mb, end_mb = statistics.median(head), statistics.median(tail)
        judged = end_t - after[0].t >= limit.min_span_s
        results.append(Growth(server, pid, after[0].t, end_t, round(start_mb, 1),
                              round(end_mb, 1),
                              limit.allows(start_mb, end_mb - start_mb) if judged else None))
    return results


def write_csv(samples: Sequence[RssSample], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "server", "pid", "rss_mb"])
        for s in samples:
            writer.writerow([s.t, s.server, s.pid, f"{s.rss_mb:.1f}"])
    return path
