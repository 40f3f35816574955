"""PNG plots of serving runs. matplotlib's ``Figure`` draws with Agg and needs no display nor
pyplot's global state. Small files: they are committed next to docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
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


def rss_over_time(lives: Mapping[tuple[str, int], Sequence[tuple[float, float]]],
                  events: Sequence[tuple[float, str]], warmup_s: float, path: Path,
                  title: str) -> Path:
    """Resident memory of each server process over time, ``(t, MiB)`` per (server, pid): one
    colour per server, a new line when it was started again; a dashed line per event (a
    fault) coloured by its kind, and the warm-up shaded."""
    figure = Figure(figsize=(12, 4.5))
    axis = figure.subplots()
    servers = sorted({server for server, _ in lives})
    colours = dict(zip(servers, _palette(len(servers)), strict=True))
    for (server, _), points in lives.items():
        axis.plot([t for t, _ in points], [mb for _, mb in points], color=colours[server],
                  linewidth=1.2, label=server)
    kinds = sorted({kind for _, kind in events})
    kind_colours = dict(zip(kinds, _palette(len(kinds), "Dark2"), strict=True))
    for t, kind in events:
        axis.axvline(t, color=kind_colours[kind], linestyle="--", linewidth=0.9, label=kind)
    axis.axvspan(0, warmup_s, color="grey", alpha=0.12, label="warm-up")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per server and per kind
    axis.legend(unique.values(), unique.keys(), fontsize="small", loc="center left",
                bbox_to_anchor=(1.01, 0.5))
    axis.set_xlabel("seconds since start")
    axis.set_ylabel("resident memory (MiB)")
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


def _palette(count: int, name: str = "tab10") -> list:
    cmap = colormaps[name]
    return [cmap(i % cmap.N) for i in range(count)]


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path
