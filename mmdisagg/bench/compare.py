"""``mmdisagg bench compare``: disaggregated vs colocated vs ``transformers serve``, one run.

Each system (``scenarios.SYSTEMS``) is started in turn on the same checkpoint, runs every
scenario it takes part in with the same request streams, and is stopped. A system that cannot
start (typically the peer, whose venv is created on first use) is reported with the reason and
the rest goes on. Results: a table per scenario, the goals as measured ratios, results.json and
PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from mmdisagg.bench import plots
from mmdisagg.bench.client import Endpoint, EndpointError, connect
from mmdisagg.bench.goals import evaluate
from mmdisagg.bench.load import Run, Stream, measure, warm_up
from mmdisagg.bench.metrics import Summary
from mmdisagg.bench.peer_venv import DEFAULT_PATH
from mmdisagg.bench.scenarios import SYSTEMS, Scenario, scenarios
from mmdisagg.bench.serve import (
    TABLE,
    UsageError,
    run_json,
    slo_from,
    summary_row,
)
from mmdisagg.bench.systems import RunningServer, ServerFailed
from mmdisagg.bench.timing import print_table, write_json
from mmdisagg.bench.workload import build_requests, warmup_workload

BENCH_MODEL = "bench-small-qwen2-vl-2"  # -2: its chat template places videos


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results/compare"),
                        help="folder for results.json, the PNG plots and server logs")
    parser.add_argument("--model-path", type=Path,
                        help="checkpoint to serve (default: the 'small' tiny checkpoint with "
                             "Qwen2-VL's image-size limits, built once under --cache-dir)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/mmdisagg"))
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_PATH,
                        help="venv with transformers serve, created there if missing "
                             "(torch 2.14.1 + torchvision 0.29.1, several GB)")
    parser.add_argument("--systems", nargs="+", choices=tuple(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--scenarios", nargs="+", help="names of scenarios (default: all)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every scenario's request count (e.g. 0.25: quick look)")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="no new request starts after this long in a run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=2,
                        help="requests per stream sent (not counted) before each run")
    parser.add_argument("--slo", default="", help="goodput limits in ms, e.g. ttft=500,tpot=50")


def bench_checkpoint(cache_dir: Path) -> Path:
    """The ``small`` tiny checkpoint with Qwen2-VL's own image-size limits (at most 1003520
    pixels, video frames too): a 448x448 image is 256 tokens and a 1024x768 one about 1000, as
    with the real model. (Test checkpoints cap every image at 64 tokens to stay fast.)"""
    from transformers import Qwen2VLImageProcessorPil

    from mmdisagg.models.tiny import make_tiny_model

    path = cache_dir.expanduser() / "models" / BENCH_MODEL
    if not (path / "config.json").is_file():
        print(f"building the benchmark checkpoint in {path}", file=sys.stderr, flush=True)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        make_tiny_model(partial, family="qwen2_vl", size="small", seed=0)
        Qwen2VLImageProcessorPil().save_pretrained(partial)
        # videos by the image processor's limits, as on the Hub's Qwen2-VL checkpoints
        (partial / "video_preprocessor_config.json").unlink()
        partial.rename(path)
    return path


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


async def run_scenario(endpoint: Endpoint, scenario: Scenario, system: str,
                       warmup: int) -> Run:
    streams = [Stream(build_requests(workload), load) for workload, load in scenario.streams]
    if warmup:
        await warm_up(endpoint, [request for workload, _ in scenario.streams
                                 for request in build_requests(warmup_workload(workload, warmup))])
    return await measure(endpoint, f"{system} / {scenario.name}", streams)


def measure_system(name: str, chosen: list[Scenario], args: argparse.Namespace,
                   checkpoint: Path, runs: dict[str, dict[str, Run]],
                   loads: dict[str, dict[str, list[float]]]) -> str:
    """Start ``name``, run its scenarios into ``runs``, stop it; its status in words."""
    system = SYSTEMS[name]
    print(f"== {name}: {system.description}", file=sys.stderr, flush=True)
    try:
        server = RunningServer(system, checkpoint, args.peer_venv, args.out / "logs",
                               args.startup_timeout)
    except ServerFailed as exc:
        print(f"== {name}: NOT MEASURED: {exc}", file=sys.stderr, flush=True)
        return f"not measured: {exc}"
    try:
        endpoint = asyncio.run(connect(Endpoint(server.base_url, system.model(checkpoint),
                                                timeout_s=args.timeout)))
        for scenario in chosen:
            if name not in scenario.systems:
                continue
            before = os.getloadavg()[0]
            run = asyncio.run(run_scenario(endpoint, scenario, name, args.warmup))
            runs.setdefault(scenario.name, {})[name] = run
            loads.setdefault(scenario.name, {})[name] = [before, os.getloadavg()[0]]
    except EndpointError as exc:
        print(f"== {name}: NOT MEASURED: {exc}", file=sys.stderr, flush=True)
        return f"not measured: {exc}"
    finally:
        server.stop()
    return "measured" + ("" if endpoint.extensions else
                         " (no ignore_eos: output length held by a stop-free prompt)")


def focus_summary(run: Run, scenario: Scenario, slo: dict[str, float]) -> Summary:
    return run.group_summaries(slo)[scenario.focus]


def make_plots(chosen: list[Scenario], runs: dict[str, dict[str, Run]], out: Path) -> list[Path]:
    """A latency-CDF figure per scenario (its focus group), one throughput-vs-rate figure."""
    paths = []
    sweep: dict[str, list[tuple[float, float, float]]] = {}
    for scenario in chosen:
        measured = runs.get(scenario.name, {})
        if scenario.in_rate_sweep:
            for system, run in measured.items():
                summary = run.summary({})
                sweep.setdefault(system, []).append((scenario.offered_rate,
                                                     summary.request_throughput,
                                                     summary.output_throughput))
        elif measured:
            records = {system: [r for r in run.records if r.group == scenario.focus]
                       for system, run in measured.items()}
            paths.append(plots.latency_cdfs(records, out / f"{scenario.name}_cdf.png",
                                            f"{scenario.name}: {scenario.about}"))
    if sweep:
        paths.append(plots.throughput_curves(sweep, "offered requests/s",
                                             out / "throughput_vs_rate.png",
                                             "open loop, one 448x448 image, 32 output tokens"))
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        slo = slo_from(args)
        if args.scale <= 0:
            raise UsageError("--scale must be > 0")
        chosen = scenarios(args.scale, args.max_seconds)
        if args.scenarios:
            unknown = set(args.scenarios) - {s.name for s in chosen}
            if unknown:
                raise UsageError(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose "
                                 f"from {', '.join(s.name for s in chosen)}")
            chosen = [s for s in chosen if s.name in args.scenarios]
    except UsageError as exc:
        print(f"mmdisagg bench compare: {exc}", file=sys.stderr)
        return 2
    checkpoint = args.model_path or bench_checkpoint(args.cache_dir)
    wanted = [name for name in args.systems if any(name in s.systems for s in chosen)]
    runs: dict[str, dict[str, Run]] = {}
    loads: dict[str, dict[str, list[float]]] = {}
    status = {name: measure_system(name, chosen, args, checkpoint, runs, loads)
              for name in wanted}
    results = {scenario.name: {system: focus_summary(run, scenario, slo)
                               for system, run in runs.get(scenario.name, {}).items()}
               for scenario in chosen}
    for scenario in chosen:
        print(f"\n### {scenario.name}: {scenario.about} (group '{scenario.focus}')\n")
        print_table([summary_row(system, summary)
                     for system, summary in results[scenario.name].items()], TABLE)
    goals = evaluate(results)
    print("\n### goals\n")
    print_table([{"goal": g.name, "target": g.target, "ratio": g.ratio,
                  "met": {True: "yes", False: "NO", None: "not measured"}[g.met]}
                 for g in goals], ["goal", "target", "ratio", "met"])
    print("\n### systems\n")
    for name, words in status.items():
        print(f"* {name}: {words}")
    payload = {"bench": "compare", "machine": machine(), "checkpoint": str(checkpoint),
               "systems": {name: {"description": SYSTEMS[name].description,
                                  "status": status[name]} for name in wanted},
               "slo_ms": slo, "goals": [g.to_dict() for g in goals],
               "scenarios": [{"name": s.name, "about": s.about, "focus": s.focus,
                              "workloads": [asdict(w) for w, _ in s.streams],
                              "runs": {system: {**run_json(run, slo),
                                                "loadavg_1min": loads[s.name][system]}
                                       for system, run in runs.get(s.name, {}).items()}}
                             for s in chosen]}
    payload["plots"] = [str(p) for p in make_plots(chosen, runs, args.out)]
    print(f"\nwrote {write_json(args.out / 'results.json', payload)}", file=sys.stderr)
    return 0
