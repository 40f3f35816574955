"""Timing and reporting shared by the benchmarks: medians of repeated runs, one table format."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MB = 1_000_000


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gbps(num_bytes: int, seconds: float) -> float:
    return num_bytes / seconds / 1e9


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A Markdown table, so the output pastes straight into docs/benchmarks.md."""
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def finite(value):
    """``value`` with NaN and infinities as None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(payload), indent=2, allow_nan=False, default=str))
    return path


def save_json(path: str | None, payload: dict) -> None:
    """``--json PATH`` of the micro-benchmarks: written only when asked."""
    if path:
        print(f"wrote {write_json(Path(path), payload)}")
