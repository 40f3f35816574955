"""What a soak found, and whether it passed: every request's outcome set against the fault
windows, the blocks still used at the end, each server's memory growth."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from mmdisagg.bench.rss import FlatLimit, Growth
from mmdisagg.bench.soak_faults import Fault
from mmdisagg.bench.soak_load import Outcome

LISTED = 20  # unexplained or lost requests written out one by one


@dataclass(frozen=True)
class SoakPlan:
    duration_s: float
    seed: int
    concurrency: int
    fault_interval_s: float
    warmup_s: float  # no fault before this; memory is judged from here on
    deadline_s: float  # a request with no answer by then is lost
    kinds: tuple[str, ...]
    video_share: float = 0.1  # of the requests that stay: one short video added


@dataclass
class SoakReport:
    plan: SoakPlan
    elapsed_s: float
    outcomes: list[Outcome]
    faults: list[Fault]
    grace_s: float  # a fault's window lasts this long after the cluster recovered
    leaked_blocks: dict[str, float]
    growth: list[Growth]
    limit: FlatLimit
    final_check: list[str]  # results of requests sent after the run
    stopped_early: str = ""  # why the soak stopped before its time, if it did

    def at_fault(self, outcome: Outcome) -> bool:
        return any(f.overlaps(outcome.start, outcome.end, self.grace_s) for f in self.faults)

    def errors(self) -> tuple[list[Outcome], list[Outcome]]:
        """(errors of requests in flight at a fault, the others)."""
        errors = [o for o in self.outcomes if o.result == "error"]
        explained = [o for o in errors if self.at_fault(o)]
        return explained, [o for o in errors if not self.at_fault(o)]

    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "lost"]

    def memory_flat(self) -> bool:
        return all(g.flat is not False for g in self.growth)

    def failures(self) -> list[str]:
        """Why the soak failed; empty when it passed."""
        _, unexplained = self.errors()
        reasons = []
        if self.stopped_early:
            reasons.append(self.stopped_early)
        if self.lost():
            reasons.append(f"{len(self.lost())} requests lost (no answer within "
                           f"{self.plan.deadline_s:g} s)")
        if unexplained:
            reasons.append(f"{len(unexplained)} errors outside any fault window")
        if any(self.leaked_blocks.values()):
            reasons.append(f"blocks still used at the end: {self.leaked_blocks}")
        if not self.memory_flat():
            grown = ", ".join(f"{g.server} (pid {g.pid}) +{g.growth_mb:.0f} MiB"
                              for g in self.growth if g.flat is False)
            reasons.append(f"memory grew after warm-up: {grown}")
        if any(result != "ok" for result in self.final_check):
            reasons.append(f"requests after the run: {self.final_check}")
        return reasons

    def to_dict(self) -> dict:
        explained, unexplained = self.errors()
        results = Counter(o.result for o in self.outcomes)
        by_shape: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            by_shape.setdefault(o.shape, Counter())[o.result] += 1
        judged = {g.server for g in self.growth if g.flat is not None}
        return {
            "bench": "soak",
            "plan": asdict(self.plan),
            "elapsed_s": round(self.elapsed_s, 1),
            "requests": {
                "total": len(self.outcomes), "ok": results["ok"],
                "errored_at_fault": len(explained), "unexplained_errors": len(unexplained),
                "lost": results["lost"],
                "left_on_purpose": dict(Counter(o.detail for o in self.outcomes
                                                if o.result == "left")),
                "errors_by_kind": dict(Counter(o.detail for o in self.outcomes
                                               if o.result == "error")),
                "by_shape": {shape: dict(counts) for shape, counts in sorted(by_shape.items())},
            },
            "unexplained": [asdict(o) for o in unexplained[:LISTED]],
            "lost_requests": [asdict(o) for o in self.lost()[:LISTED]],
            "faults": {"injected": len(self.faults),
                       "by_kind": dict(Counter(f.kind for f in self.faults)),
                       "grace_s": self.grace_s, "list": [f.to_dict() for f in self.faults]},
            "leaked_blocks": {"total": sum(self.leaked_blocks.values()),
                              "by_server": self.leaked_blocks},
            "memory": {"limit": asdict(self.limit), "flat": self.memory_flat(),
                       "not_judged": sorted({g.server for g in self.growth} - judged),
                       "lives": [g.to_dict() for g in self.growth]},
            "final_check": self.final_check,
            "failures": self.failures(),
            "passed": not self.failures(),
        }
