"""Prometheus views of the live objects a server exposes, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mmdisagg.pool.pool import EmbeddingPool

if TYPE_CHECKING:
    from mmdisagg.language.engine import Engine
from mmdisagg.transfer.manager import TransferStats

# Latencies from tens of microseconds (tiny models) to minutes (huge images, CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120)


def latency_histogram(name: str, doc: str, registry) -> Histogram:
    return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)


def outcome_metrics(role: str, outcomes: Mapping[str, int]) -> Iterator[Metric]:
    family = CounterMetricFamily("mmdisagg_requests", "Requests by outcome",
                                 labels=["role", "outcome"])
    for outcome, count in sorted(outcomes.items()):
        family.add_metric([role, outcome], count)
    yield family


def server_metrics(health: Mapping[str, tuple[int, int]]) -> Iterator[Metric]:
    """The router's view of its servers: how many of each role answer health checks."""
    family = GaugeMetricFamily("mmdisagg_router_servers", "Servers by role and health",
                               labels=["role", "state"])
    for role, (healthy, total) in sorted(health.items()):
        family.add_metric([role, "healthy"], healthy)
        family.add_metric([role, "unhealthy"], total - healthy)
    yield family


def queue_metrics(queues: Mapping[str, int]) -> Iterator[Metric]:
    family = GaugeMetricFamily("mmdisagg_queue_length", "Requests in each queue",
                               labels=["queue"])
    for queue, length in queues.items():
        family.add_metric([queue], length)
    yield family


def pool_metrics(pool: EmbeddingPool) -> Iterator[Metric]:
    stats = pool.allocator.stats()
    blocks = GaugeMetricFamily("mmdisagg_pool_blocks", "Embedding-pool blocks by state",
                               labels=["state"])
    blocks.add_metric(["free"], stats.free_blocks)
    blocks.add_metric(["used"], stats.used_blocks)
    yield blocks
    yield GaugeMetricFamily("mmdisagg_pool_live_allocations", "Allocations not yet freed",
                            value=stats.live_allocations)
    yield CounterMetricFamily("mmdisagg_pool_failed_allocs",
                              "Allocations refused for lack of free blocks",
                              value=stats.failed_allocs)


def kv_metrics(engine: Engine) -> Iterator[Metric]:
    stats = engine.blocks.stats()
    blocks = GaugeMetricFamily("mmdisagg_kv_blocks", "Paged KV-cache blocks by state",
                               labels=["state"])
    blocks.add_metric(["free"], stats.free_blocks)
    blocks.add_metric(["used"], stats.used_blocks)
    yield blocks
    yield GaugeMetricFamily("mmdisagg_kv_blocks_total", "Blocks in the paged KV cache",
                            value=stats.total_blocks)
    yield GaugeMetricFamily("mmdisagg_kv_block_size", "Tokens per KV-cache block",
                            value=engine.blocks.block_size)
    yield CounterMetricFamily("mmdisagg_kv_preemptions",
                              "Requests preempted (KV freed, recomputed later)",
                              value=engine.preemptions)


def transfer_metrics(stats: TransferStats) -> Iterator[Metric]:
    for name, doc in (
        ("bytes", "Embedding bytes moved"), ("seconds", "Seconds spent moving them"),
        ("chunks", "Chunks moved"), ("windows", "Windows offered"),
        ("resumes", "Windows offered after a request's first"),
        ("spills", "Filled windows copied out to free blocks"),
        ("refused", "Control messages or chunks refused"),
        ("peers_lost", "Peers declared dead for missing heartbeats"),
    ):
        yield CounterMetricFamily(f"mmdisagg_transfer_{name}", doc, value=getattr(stats, name))
    rooms = CounterMetricFamily("mmdisagg_transfer_rooms", "Transfers by outcome",
                                labels=["outcome"])
    rooms.add_metric(["started"], stats.rooms_started)
    rooms.add_metric(["succeeded"], stats.rooms_succeeded)
    rooms.add_metric(["failed"], stats.rooms_failed)
    yield rooms
