"""Faults a soak injects into a running cluster: one at a time, on a seeded schedule, each
recorded with when it began and when the router saw every server healthy again, so that a
request's error can be told apart as caused by a fault or not."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from mmdisagg.serve.launcher import Child, Launcher
from mmdisagg.serve.probe import metrics

KINDS = ("encode-kill", "encode-hang", "language-kill", "router-restart")
HANG_S = (2.0, 8.0)  # a hung encoder stays stopped this long: around the heartbeat timeout
RECOVERY_TIMEOUT_S = 120.0
BUSY_QUEUES = {"encode": ("encoding", "sending"), "language": ("running", "transfer")}


@dataclass
class Fault:
    """One fault; times in seconds since the soak began."""

    kind: str
    target: str
    at: float
    recovered: float = math.nan  # the router sees every server healthy again

    def overlaps(self, start: float, end: float, grace_s: float) -> bool:
        """Whether a request in flight from ``start`` to ``end`` met this fault: it was
        under way between the fault and ``grace_s`` after the cluster recovered."""
        until = self.recovered + grace_s if math.isfinite(self.recovered) else math.inf
        return start <= until and end >= self.at

    def to_dict(self) -> dict:
        return asdict(self)


class SoakFailed(Exception):
    """The cluster did something no fault explains: a server died by itself, or did not
    recover."""


class Injector:
    """Injects faults every ``interval_s`` (±50 %, seeded), cycling through ``kinds`` in a
    shuffled order so that a short run still sees several kinds."""

    def __init__(self, launcher: Launcher, clock: Callable[[], float], seed: int,
                 interval_s: float, kinds: tuple[str, ...] = KINDS) -> None:
        self.launcher = launcher
        self.clock = clock
        self.rng = random.Random(seed)
        self.interval_s = interval_s
        self.kinds = kinds
        self.faults: list[Fault] = []
        self.failure: str = ""  # why the soak must stop, if it must

    def run(self, begin_at: float, stop: threading.Event) -> None:
        """The injecting thread: from ``begin_at`` until ``stop``; a fault under way is
        always finished (the server brought back) before returning."""
        order: list[str] = []
        next_at = begin_at
        try:
            while not stop.wait(max(0.0, next_at - self.clock())):
                self._check_alive()
                if not order:
                    order = self.rng.sample(self.kinds, len(self.kinds))
                self._inject(order.pop())
                next_at = self.clock() + self.interval_s * self.rng.uniform(0.5, 1.5)
        except SoakFailed as exc:
            self.failure = str(exc)
            stop.set()

    def _inject(self, kind: str) -> None:
        role = {"encode-kill": "encode", "encode-hang": "encode", "language-kill": "language",
                "router-restart": "router"}[kind]
        child = self._victim(role)
        fault = Fault(kind, child.name, self.clock())
        self.faults.append(fault)
        if kind == "encode-hang":
            os.kill(child.process.pid, signal.SIGSTOP)
            time.sleep(self.rng.uniform(*HANG_S))
            os.kill(child.process.pid, signal.SIGCONT)
        else:
            child.process.send_signal(signal.SIGKILL)
            child.process.wait(timeout=30)
            try:
                self.launcher.restart(child)
            except RuntimeError as exc:
                raise SoakFailed(f"{kind}: {child.name} did not come back: {exc}") from None
        self._wait_recovered()
        fault.recovered = self.clock()

    def _victim(self, role: str) -> Child:
        """A busy server of ``role`` if there is one (so faults hit vision work, transfers
        and decoding), else any."""
        candidates = [c for c in self.launcher.children if c.name.split("-")[0] == role]
        if role == "router":
            return candidates[0]
        busy = [c for c in candidates if self._busy(c, BUSY_QUEUES[role])]
        return self.rng.choice(busy or candidates)

    @staticmethod
    def _busy(child: Child, queues: tuple[str, ...]) -> bool:
        try:
            samples = metrics(child.url)
        except OSError:
            return False
        return any(samples.get(f'mmdisagg_queue_length{{queue="{q}"}}', 0) for q in queues)

    def _wait_recovered(self) -> None:
        router = next(c for c in self.launcher.children if c.name == "router")
        wanted = {"encode": self.launcher.settings.encoders,
                  "language": self.launcher.settings.language_servers}
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while not self._router_sees(router, wanted):
            self._check_alive()
            if time.monotonic() > deadline:
                raise SoakFailed(f"the router did not see every server healthy within "
                                 f"{RECOVERY_TIMEOUT_S:g} s of a fault")
            time.sleep(0.2)

    @staticmethod
    def _router_sees(router: Child, wanted: dict[str, int]) -> bool:
        try:
            samples = metrics(router.url)
        except OSError:
            return False
        return all(samples.get(f'mmdisagg_router_servers{{role="{role}",state="healthy"}}')
                   == count for role, count in wanted.items())

    def _check_alive(self) -> None:
        try:
            self.launcher.check_alive()
        except RuntimeError as exc:
            raise SoakFailed(f"a server died with no fault injected: {exc}") from None
