"""Start transfer peers (tests/transfer/peer.py) as real processes and talk to them."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import SPAWNED

PEER = Path(__file__).with_name("peer.py")
FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5, "bootstrap_timeout": 10.0,
        "transfer_timeout": 10.0, "waiting_timeout": 20.0, "bootstrap_port": 0}


EXIT_POLL_S = 0.2


class PeerExited(AssertionError):
    """The peer's process ended while a test waited for one of its events."""


class Peer:
    def __init__(self, role: str, backend: str, layout: dict, transfer: dict | None = None,
                 network: dict | None = None, default_blocks: int = 8) -> None:
        config = {"role": role, "layout": layout, "default_blocks": default_blocks,
                  "transfer": {**FAST, "transfer_backend": backend, **(transfer or {})},
                  "network": {"auth_token": "secret", **(network or {})}}
        self.proc = subprocess.Popen([sys.executable, str(PEER), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     bufsize=1)
        SPAWNED.add(self.proc.pid)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.backlog: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.wait(lambda e: e["event"] == "ready", 60)
        self.id, self.control, self.bootstrap = ready["id"], ready["control"], ready["bootstrap"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def command(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, predicate, timeout: float) -> dict:
        for i, event in enumerate(self.backlog):
            if predicate(event):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer {self.id if hasattr(self, 'id') else '?'}: no matching "
                                   f"event in {timeout}s; backlog {self.backlog[-5:]}")
            try:
                event = self.events.get(timeout=min(left, EXIT_POLL_S))
            except queue.Empty:
                code = self.proc.poll()
                if code is not None and self.events.empty():
                    raise PeerExited(f"peer {getattr(self, 'id', '?')} (pid {self.proc.pid}) "
                                     f"exited with code {code}; backlog {self.backlog[-5:]}"
                                     ) from None
                continue
            if predicate(event):
                return event
            self.backlog.append(event)

    def done(self, rooms, timeout: float = 60) -> dict[int, dict]:
        rooms, results = set(rooms), {}
        while rooms - results.keys():
            event = self.wait(lambda e: e["event"] == "done" and e["room"] in rooms, timeout)
            results[event["room"]] = event
        return results

    def stats(self, timeout: float = 30) -> dict:
        self.command(op="stats")
        return self.wait(lambda e: e["event"] == "stats", timeout)

    def wait_until(self, predicate, timeout: float = 30) -> dict:
        """Ask for stats until ``predicate(stats)`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        while not predicate(stats := self.stats()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {self.id}: stats never matched in {timeout}s: {stats}")
            time.sleep(0.05)
        return stats

    def wait_pool_full(self, timeout: float = 15) -> dict:
        """Pools drain asynchronously after a failure; wait (bounded) until every block is free."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats["free_blocks"] == stats["total_blocks"] or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def ask_to_exit(self) -> None:
        """Tell the peer to shut down without waiting, so that several shut down together."""
        if self.proc.poll() is None and not self.proc.stdin.closed:
            try:
                self.command(op="exit")
                self.proc.stdin.close()
            except OSError:
                self.proc.kill()

    def close(self) -> None:
        self.ask_to_exit()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
