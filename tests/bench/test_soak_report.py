"""How a soak judges what it saw: errors against fault windows, memory growth per process."""

from __future__ import annotations

import math

from mmdisagg.bench.rss import FlatLimit, RssSample, growth
from mmdisagg.bench.soak_faults import Fault
from mmdisagg.bench.soak_load import Outcome
from mmdisagg.bench.soak_report import SoakPlan, SoakReport

PLAN = SoakPlan(duration_s=100, seed=0, concurrency=1, fault_interval_s=10, warmup_s=10,
                deadline_s=30, kinds=("encode-kill",))


def report(outcomes: list[Outcome], faults: list[Fault], **fields) -> SoakReport:
    values = dict(plan=PLAN, elapsed_s=100, outcomes=outcomes, faults=faults, grace_s=5,
                  leaked_blocks={"encode-0": 0}, growth=[], limit=FlatLimit(),
                  final_check=["ok"])
    return SoakReport(**{**values, **fields})


def test_an_error_counts_as_at_a_fault_only_when_in_flight_in_its_window():
    fault = Fault("encode-kill", "encode-0", at=20, recovered=30)
    during = Outcome("text/whole", 15, 21, "error", "http_503")
    just_after = Outcome("text/whole", 34, 34.5, "error", "connection")  # within the grace
    before = Outcome("text/whole", 10, 19.9, "error", "http_503")
    long_after = Outcome("text/whole", 36, 37, "error", "stream_error")
    seen = report([during, just_after, before, long_after, Outcome("text/whole", 1, 2, "ok")],
                  [fault])
    assert seen.errors() == ([during, just_after], [before, long_after])
    assert seen.failures() == ["2 errors outside any fault window"]
    summary = seen.to_dict()
    assert (summary["requests"]["errored_at_fault"], summary["requests"]["ok"]) == (2, 1)
    assert not summary["passed"]


def test_a_fault_never_recovered_from_explains_everything_after_it():
    fault = Fault("router-restart", "router", at=50, recovered=math.nan)
    assert fault.overlaps(90, 95, grace_s=0) and not fault.overlaps(10, 49, grace_s=0)


def test_lost_requests_leaked_blocks_and_a_dead_cluster_fail_the_soak():
    seen = report([Outcome("1-image/stream", 5, 35, "lost", "no answer within 30 s")], [],
                  leaked_blocks={"language-1": 3}, final_check=["error: connection"])
    assert len(seen.failures()) == 3
    assert report([Outcome("text/whole", 1, 2, "left", "mid-stream")], []).failures() == []


def life(server: str, pid: int, start: float, mbs: list[float]) -> list[RssSample]:
    return [RssSample(start + 2 * i, server, pid, mb) for i, mb in enumerate(mbs)]


def test_memory_is_judged_per_process_after_its_warm_up():
    flat = life("encode-0", 1, 0, [100] * 5 + [400] * 5 + [405] * 40)  # warm-up growth is fine
    leaking = life("language-0", 2, 0, [400 + 3 * i for i in range(50)])  # +3 MiB every 2 s
    restarted = life("language-0", 3, 100, [300] * 12)  # too short after its warm-up
    grown = {g.pid: g for g in growth(flat + leaking + restarted, warmup_s=20,
                                      limit=FlatLimit())}
    assert grown[1].flat is True and grown[1].start_mb == 405
    assert grown[2].flat is False and grown[2].growth_mb > 80
    assert grown[3].flat is None
