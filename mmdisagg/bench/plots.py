"""PNG plots of serving runs. matplotlib's ``Figure`` draws with Agg and needs no display nor
pyplot's global state. Small files: they are committed next to docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mmdisagg.bench.metrics import RequestRecord

DPI = 80
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "end-to-end latency"))


def latency_cdfs(runs: Mapping[str, Sequence[RequestRecord]], path: Path, title: str) -> Path:
    """One panel per latency (TTFT, TPOT, end-to-end), one CDF line per run; completed
    requests only."""
    figure = Figure(figsize=(12, 3.4))
    axes = figure.subplots(1, len(LATENCIES))
    for axis, (name, caption) in zip(axes, LATENCIES, strict=True):
        for label, records in runs.items():
            values = np.sort([getattr(r, name) * 1e3 for r in records
                              if r.ok and not math.isnan(getattr(r, name))])
            if values.size:
                axis.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                          label=label)
        axis.set_xlabel(f"{caption} (ms)")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("share of requests")
    axes[-1].legend(fontsize="small", loc="lower right")
    figure.suptitle(title)
    return _save(figure, path)


def throughput_curves(series: Mapping[str, Sequence[tuple[float, float, float]]], x_label: str,
                      path: Path, title: str) -> Path:
    """Requests/s and output tokens/s against the offered load: one line per series of
    ``(offered, requests/s, tokens/s)`` points. An infinite rate is drawn at the right end."""
    figure = Figure(figsize=(10, 3.4))
    axes = figure.subplots(1, 2)
    finite = [x for points in series.values() for x, _, _ in points if math.isfinite(x)]
    unbounded = 2 * max(finite) if finite else 1.0
    for label, points in series.items():
        ordered = sorted(points, key=lambda p: p[0])
        xs = [x if math.isfinite(x) else unbounded for x, _, _ in ordered]
        for axis, column in zip(axes, (1, 2), strict=True):
            axis.plot(xs, [p[column] for p in ordered], marker="o", label=label)
    for axis, caption in zip(axes, ("requests/s", "output tokens/s"), strict=True):
        axis.set_xlabel(x_label)
        axis.set_ylabel(caption)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    figure.suptitle(title)
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path
