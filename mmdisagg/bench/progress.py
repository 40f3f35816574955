"""A one-line progress bar on stderr: redrawn in place on a terminal, a line now and then in a
log file."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24
TERMINAL_EVERY_S = 0.2
LOG_EVERY_S = 10.0


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.sent = self.done = self.failed = 0
        self.began = time.perf_counter()
        self._live = self.stream.isatty()
        self._drawn_at = -float("inf")

    def started(self) -> None:
        self.sent += 1
        self._draw()

    def finished(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        self._draw()

    def close(self) -> None:
        self._draw(force=True)
        if self._live:
            self.stream.write("\n")
        self.stream.flush()

    def line(self) -> str:
        filled = WIDTH * self.done // max(1, self.total)
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}"
                f" done{failed}, {self.sent - self.done} in flight, "
                f"{time.perf_counter() - self.began:.1f} s")

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._drawn_at < (TERMINAL_EVERY_S if self._live else LOG_EVERY_S):
            return
        self._drawn_at = now
        self.stream.write(("\r" + self.line() + "\x1b[K") if self._live else self.line() + "\n")
        self.stream.flush()
