"""``mmdisagg bench serve``: a load generator against any OpenAI-compatible endpoint.

It builds a seeded stream of synthetic chat requests (images drawn locally, a text prompt, a
fixed output length), offers it once per request rate (open loop) and once per concurrency
(closed loop), streams every reply to timestamp its tokens, and reports TTFT, TPOT,
inter-token latency, end-to-end latency, throughput and goodput as a table, a JSON file and
PNG plots. Output length is held with the ``ignore_eos`` extension where the server takes it;
elsewhere the prompt asks for text without an end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from mmdisagg.bench import plots
from mmdisagg.bench.client import Endpoint, EndpointError, connect
from mmdisagg.bench.load import Load, Run, Stream, measure, warm_up
from mmdisagg.bench.metrics import Summary, parse_slo
from mmdisagg.bench.timing import print_table, write_json
from mmdisagg.bench.workload import (
    Workload,
    build_requests,
    parse_range,
    parse_size,
    warmup_workload,
)

TABLE = ["run", "completed", "failed", "req/s", "out tok/s", "goodput", "TTFT p50", "TTFT p99",
         "TPOT p50", "TPOT p99", "ITL p50", "E2E p50", "E2E p99"]


class UsageError(Exception):
    """A flag value the benchmark cannot run with."""


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--num-requests", type=int, default=64, help="requests per run")
    group.add_argument("--images", default="1", help="images per request: 2, or a range 0-3")
    group.add_argument("--image-sizes", nargs="+", default=["448x448"],
                       help="sizes drawn from, e.g. 224x224 448x448 1024x768")
    group.add_argument("--repeat-images", type=float, default=0.0,
                       help="share of images that repeat an earlier one (image-cache hits)")
    group.add_argument("--videos", default="0", help="videos per request: 1, or a range 0-2")
    group.add_argument("--video-frames", type=int, default=16,
                       help="frames per video (drawn at 2 fps: all of them are sampled)")
    group.add_argument("--video-size", default="448x448", help="frame size of every video")
    group.add_argument("--prompt-words", type=int, default=32, help="words of text per prompt")
    group.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    group.add_argument("--seed", type=int, default=0,
                       help="run n of a sweep uses seed + n (no image-cache hits across runs)")


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("endpoint")
    group.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--slo", default="", help="goodput limits in ms, e.g. ttft=500,tpot=50")
    group.add_argument("--warmup", type=int, default=2,
                       help="requests sent (and not counted) before the runs")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="", help="default: the first model the server lists")
    parser.add_argument("--api-key", default="none")
    add_endpoint_arguments(parser)
    add_workload_arguments(parser)
    group = parser.add_argument_group("load (one run per rate and per concurrency)")
    group.add_argument("--request-rate", type=float, nargs="+", default=[],
                       help="open loop: requests/s (Poisson), 'inf' = all at once")
    group.add_argument("--burstiness", type=float, default=1.0,
                       help="gamma shape of the gaps between requests: 1 = Poisson, <1 burstier")
    group.add_argument("--concurrency", type=int, nargs="+", default=[],
                       help="closed loop: requests in flight (default 1 if no rate is given)")
    group.add_argument("--max-seconds", type=float, default=600.0,
                       help="no new request starts after this long in a run")
    parser.add_argument("--out", type=Path, default=Path("bench-results/serve"),
                        help="folder for results.json and the PNG plots")


def workload_from(args: argparse.Namespace) -> Workload:
    try:
        return Workload(num_requests=args.num_requests, images=parse_range(args.images),
                        image_sizes=tuple(parse_size(s) for s in args.image_sizes),
                        repeat_images=args.repeat_images, videos=parse_range(args.videos),
                        video_frames=args.video_frames, video_size=parse_size(args.video_size),
                        prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                        seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def slo_from(args: argparse.Namespace) -> dict[str, float]:
    try:
        return parse_slo(args.slo)
    except ValueError as exc:
        raise UsageError(f"--slo: {exc}") from None


def loads_from(args: argparse.Namespace) -> list[Load]:
    concurrencies = args.concurrency or ([] if args.request_rate else [1])
    try:
        return ([Load(request_rate=rate, burstiness=args.burstiness,
                      max_seconds=args.max_seconds) for rate in args.request_rate]
                + [Load(concurrency=c, max_seconds=args.max_seconds) for c in concurrencies])
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def connect_or_explain(endpoint: Endpoint) -> Endpoint:
    """The connected endpoint, telling the user what it accepts."""
    endpoint = asyncio.run(connect(endpoint))
    how = ("ignore_eos" if "ignore_eos" in endpoint.extensions
           else "no ignore_eos: output length held by a stop-free prompt")
    print(f"endpoint {endpoint.base_url}, model {endpoint.model} ({how})", file=sys.stderr)
    return endpoint


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def summary_row(label: str, summary: Summary) -> dict:
    return {"run": label, "completed": summary.completed, "failed": summary.failed,
            "req/s": summary.request_throughput, "out tok/s": summary.output_throughput,
            "goodput": summary.goodput,
            "TTFT p50": _ms(summary.ttft_ms.p50), "TTFT p99": _ms(summary.ttft_ms.p99),
            "TPOT p50": _ms(summary.tpot_ms.p50), "TPOT p99": _ms(summary.tpot_ms.p99),
            "ITL p50": _ms(summary.itl_ms.p50), "E2E p50": _ms(summary.e2e_ms.p50),
            "E2E p99": _ms(summary.e2e_ms.p99)}


def run_json(run: Run, slo: dict[str, float]) -> dict:
    return {"label": run.label, "loads": [s.load.to_dict() for s in run.streams],
            "summary": run.summary(slo).to_dict(),
            "groups": {group: summary.to_dict()
                       for group, summary in run.group_summaries(slo).items()}}


def plot_runs(runs: Sequence[Run], out: Path, title: str) -> list[Path]:
    paths = [plots.latency_cdfs({run.label: run.records for run in runs},
                                out / "latency_cdf.png", title)]
    for kind, x_label, offered in (
            ("rate", "offered requests/s", lambda load: load.request_rate),
            ("concurrency", "concurrency", lambda load: float(load.concurrency))):
        chosen = [run for run in runs if bool(run.streams[0].load.concurrency) == (
            kind == "concurrency")]
        if len(chosen) > 1:
            points = [(offered(run.streams[0].load), run.summary({}).request_throughput,
                       run.summary({}).output_throughput) for run in chosen]
            paths.append(plots.throughput_curves({"measured": points}, x_label,
                                                 out / f"throughput_vs_{kind}.png", title))
    return paths


def run(args: argparse.Namespace) -> int:
    try:
        slo = slo_from(args)
        loads = loads_from(args)
        workload = workload_from(args)
        endpoint = connect_or_explain(Endpoint(args.base_url, args.model, args.api_key,
                                               args.timeout, args.temperature))
    except (UsageError, EndpointError) as exc:
        print(f"mmdisagg bench serve: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    if args.warmup:
        asyncio.run(warm_up(endpoint, build_requests(warmup_workload(workload, args.warmup))))
    runs = []
    for number, load in enumerate(loads):
        # NOTE: run n draws its images with seed + n: the server's image cache must not turn
        # later runs into cache hits (--repeat-images asks for hits within a run)
        stream = replace(workload, seed=workload.seed + number)
        runs.append(asyncio.run(measure(endpoint, load.label,
                                        [Stream(build_requests(stream), load)], stream.seed)))
    print_table([summary_row(run.label, run.summary(slo)) for run in runs], TABLE)
    payload = {"bench": "serve",
               "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model,
                            "extensions": list(endpoint.extensions)},
               "workload": asdict(workload), "slo_ms": slo,
               "runs": [run_json(run, slo) for run in runs]}
    payload["plots"] = [str(p) for p in plot_runs(runs, args.out, f"{endpoint.model}")]
    print(f"wrote {write_json(args.out / 'results.json', payload)}", file=sys.stderr)
    return 0
