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


def server_metrics(health: Mapping[str, tuple[int, int]],
                   in_flight: Mapping[str, int]) -> Iterator[Metric]:
    """The router's view of its servers: how many of each role answer health checks, and
    what each holds of this router's requests."""
    family = GaugeMetricFamily("mmdisagg_router_servers", "Servers by role and health",
                               labels=["role", "state"])
    for role, (healthy, total) in sorted(health.items()):
        family.add_metric([role, "healthy"], healthy)
        family.add_metric([role, "unhealthy"], total - healthy)
    yield family
    yield by_label(GaugeMetricFamily, "mmdisagg_router_in_flight",
                   "Requests sent to each server and not answered yet", "server", in_flight)


def by_label(kind: type[Metric], name: str, doc: str, label: str,
             values: Mapping[str, float]) -> Metric:
    """One family of ``kind`` (gauge or counter) with a sample per ``label`` value."""
    family = kind(name, doc, labels=[label])
    for value, sample in values.items():
        family.add_metric([value], sample)
    return family


def queue_metrics(queues: Mapping[str, int]) -> Iterator[Metric]:
    yield by_label(GaugeMetricFamily, "mmdisagg_queue_length", "Requests in each queue",
                   "queue", queues)


def pool_metrics(pool: EmbeddingPool) -> Iterator[Metric]:
    stats = pool.allocator.stats()
    yield by_label(GaugeMetricFamily, "mmdisagg_pool_blocks", "Embedding-pool blocks by state",
                   "state", {"free": stats.free_blocks, "used": stats.used_blocks})
    yield GaugeMetricFamily("mmdisagg_pool_live_allocations", "Allocations not yet freed",
                            value=stats.live_allocations)
    yield CounterMetricFamily("mmdisagg_pool_failed_allocs",
                              "Allocations refused for lack of free blocks",
                              value=stats.failed_allocs)


def kv_metrics(engine: Engine) -> Iterator[Metric]:
    stats = engine.blocks.stats()
    yield by_label(GaugeMetricFamily, "mmdisagg_kv_blocks", "Paged KV-cache blocks by state",
                   "state", {"free": stats.free_blocks, "used": stats.used_blocks,
                             "cached": stats.cached_blocks})  # cached: unreferenced, evictable
    yield GaugeMetricFamily("mmdisagg_kv_blocks_total", "Blocks in the paged KV cache",
                            value=stats.total_blocks)
    yield CounterMetricFamily("mmdisagg_prefix_cache_queries_tokens",
                              "Prompt tokens looked up in the prefix cache",
                              value=engine.prefix_query_tokens)
    yield CounterMetricFamily("mmdisagg_prefix_cache_hit_tokens",
                              "Prompt tokens found there: neither sent again nor prefilled",
                              value=engine.prefix_hit_tokens)
    yield GaugeMetricFamily("mmdisagg_kv_block_size", "Tokens per KV-cache block",
                            value=engine.blocks.block_size)
    yield CounterMetricFamily("mmdisagg_prefill_while_arriving_tokens",
                              "Prompt tokens prefilled while the rest of their prompt was still "
                              "on its way", value=engine.prefilled_while_arriving)
    yield CounterMetricFamily("mmdisagg_kv_preemptions",
                              "Requests preempted (KV freed, recomputed later)",
                              value=engine.preemptions)


def transfer_metrics(stats: TransferStats) -> Iterator[Metric]:
    for name, doc in (
        ("bytes", "Embedding bytes moved"), ("seconds", "Seconds spent moving them"),
        ("chunks", "Chunks moved"), ("windows", "Windows offered"),
        ("resumes", "Windows offered after a request's first"),
        ("spills", "Filled windows copied out to free blocks"),
        ("cached_tokens", "Prompt tokens not sent: the receiver's prefix cache held them"),
        ("refused", "Control messages or chunks refused"),
        ("peers_lost", "Peers declared dead for missing heartbeats"),
    ):
        yield CounterMetricFamily(f"mmdisagg_transfer_{name}", doc, value=getattr(stats, name))
    yield by_label(CounterMetricFamily, "mmdisagg_transfer_rooms", "Transfers by outcome",
                   "outcome", {"started": stats.rooms_started,
                               "succeeded": stats.rooms_succeeded, "failed": stats.rooms_failed})
