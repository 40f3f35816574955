"""The load generator's metric math on hand-made timestamp streams."""

from __future__ import annotations

import math

import pytest

from mmdisagg.bench.metrics import RequestRecord, Stats, meets_slo, parse_slo, summarize


def record(start: float, chunks: list[float], end: float, tokens: int | None = None,
           index: int = 0, error: str | None = None, group: str = "main") -> RequestRecord:
    return RequestRecord(index, group, start, end, list(chunks),
                         len(chunks) if tokens is None else tokens, 10, error)


def test_one_request_ttft_tpot_itl_e2e():
    r = record(10.0, [10.5, 10.6, 10.8, 11.1], 11.2)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert r.tpot == pytest.approx((1.2 - 0.5) / 3)  # after the first token, per token


def test_tpot_uses_the_token_count_not_the_chunk_count():
    r = record(0.0, [1.0, 2.0], 3.0, tokens=5)  # a chunk may carry several tokens
    assert r.tpot == pytest.approx((3.0 - 1.0) / 4)


def test_tpot_and_ttft_are_missing_where_undefined():
    assert math.isnan(record(0.0, [1.0], 1.0).tpot)
    assert math.isnan(record(0.0, [], 1.0, tokens=0).ttft)


def test_stats_in_milliseconds_with_interpolated_percentiles():
    stats = Stats.of([i / 1000 for i in range(1, 101)] + [math.nan])  # 1..100 ms; NaN ignored
    assert stats.count == 100
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)


def test_empty_stats_are_nan_not_an_error():
    stats = Stats.of([])
    assert stats.count == 0 and math.isnan(stats.p99)


def test_summary_of_a_run():
    records = [record(0.0, [0.1, 0.2, 0.3], 0.4, index=0),
               record(1.0, [1.3, 1.5], 1.6, index=1),
               record(2.0, [], 2.5, index=2, error="http_503"),
               record(3.0, [], 3.1, index=3, error="timeout"),
               record(3.5, [], 4.0, index=4, error="http_503")]
    summary = summarize(records)
    assert (summary.requests, summary.completed, summary.failed) == (5, 2, 3)
    assert summary.duration_s == pytest.approx(4.0)  # first start to last end
    assert summary.request_throughput == pytest.approx(2 / 4.0)
    assert summary.output_throughput == pytest.approx(5 / 4.0)
    assert summary.mean_output_tokens == pytest.approx(2.5)
    assert summary.ttft_ms.mean == pytest.approx((100 + 300) / 2)
    assert summary.e2e_ms.p50 == pytest.approx((400 + 600) / 2)
    assert summary.itl_ms.count == 3  # 2 gaps + 1 gap; failed requests contribute none
    assert summary.itl_ms.mean == pytest.approx((100 + 100 + 200) / 3)
    assert summary.errors == {"http_503": 2, "timeout": 1}


def test_duration_can_be_given():
    summary = summarize([record(0.0, [0.1], 0.2)], duration_s=10.0)
    assert summary.request_throughput == pytest.approx(0.1)


def test_goodput_counts_completed_requests_within_every_limit():
    fast = record(0.0, [0.1, 0.11, 0.12], 0.13, index=0)  # ttft 100 ms, tpot 15 ms
    slow_first = record(0.0, [0.9, 0.91, 0.92], 0.93, index=1)  # ttft 900 ms
    slow_tokens = record(0.0, [0.1, 0.5, 0.9], 1.3, index=2)  # tpot 600 ms
    failed = record(0.0, [0.1], 0.2, index=3, error="stream_error")
    records = [fast, slow_first, slow_tokens, failed]
    slo = {"ttft": 500.0, "tpot": 50.0}
    assert [meets_slo(r, slo) for r in records] == [True, False, False, False]
    assert summarize(records, slo, duration_s=2.0).goodput == pytest.approx(0.5)
    assert summarize(records, {}, duration_s=2.0).goodput == pytest.approx(1.5)


def test_a_single_token_reply_is_not_failed_by_a_tpot_limit():
    assert meets_slo(record(0.0, [0.1], 0.1), {"tpot": 1.0})


def test_parse_slo():
    assert parse_slo("ttft=500, tpot=50ms") == {"ttft": 500.0, "tpot": 50.0}
    assert parse_slo("") == {}
    for bad in ("ttft", "itl=5", "ttft=fast", "tpot=-1", "e2e=inf"):
        with pytest.raises(ValueError):
            parse_slo(bad)
