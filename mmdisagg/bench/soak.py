"""``mmdisagg bench soak``: a bounded run of mixed load with random faults.

It starts a cluster of its own (2 encode + 2 language servers and a router over the tcp data
plane, on the tiny random checkpoint), drives mixed load through the official ``openai``
client (``soak_load``), and after a warm-up injects a fault now and then (``soak_faults``):
an encode server killed or hung, a language server killed, the router killed; each killed
process is started again. Meanwhile every server's resident memory is sampled (``rss``).

It passes when no request was lost, every error came to a request in flight at a fault, every
pool is free at the end, each server's memory stayed flat after warm-up, and the cluster
still answers. Results: summary.json, rss.csv and rss.png in ``--out``; exit code 1 on
failure.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from mmdisagg.bench import plots
from mmdisagg.bench.rss import FlatLimit, RssSample, RssSampler, growth, lives, write_csv
from mmdisagg.bench.serve import UsageError
from mmdisagg.bench.soak_faults import HANG_S, KINDS, RECOVERY_TIMEOUT_S, Injector
from mmdisagg.bench.soak_load import (
    Client,
    ImageSource,
    Outcome,
    Shape,
    Tally,
    drive,
    messages_for,
)
from mmdisagg.bench.soak_report import SoakPlan, SoakReport
from mmdisagg.bench.timing import write_json
from mmdisagg.config import ServeSettings, load
from mmdisagg.serve.launcher import Launcher, free_port, tiny_model
from mmdisagg.serve.probe import wait_pools_free

PROGRESS_EVERY_S = 10.0
# Short failure-detection times, so that a fault's window (and a soak) stays short. Image
# caches small enough to fill during warm-up (the tiny model's features are ~32 kB an image,
# its processed pixels ~300 kB): the default 256 MiB each would fill for the whole run and
# read as a leak, and a full cache also exercises eviction. The same for the KV cache, whose
# prefix cache keeps what it may: a 4 GiB one would be touched page by page for the whole run.
CLUSTER_KNOBS = dict(encoders=2, language_servers=2, transfer_backend="tcp", torch_threads=1,
                     log_level="warning", heartbeat_interval=0.5, heartbeat_timeout=3.0,
                     transfer_timeout=10.0, startup_timeout=180.0,
                     image_cache_bytes=8 * 1024 * 1024,
                     prepared_image_cache_bytes=8 * 1024 * 1024, kv_cache_memory="32MiB")
HEALTH_CHECKS_S = 4.0  # two of the router's health checks (every 2 s)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of load; requests in flight then finish")
    parser.add_argument("--seed", type=int, default=0, help="requests and fault schedule")
    parser.add_argument("--concurrency", type=int, default=6, help="clients, each closed loop")
    parser.add_argument("--fault-interval", type=float, default=40.0,
                        help="mean seconds between faults (each gap ±50 %%)")
    parser.add_argument("--faults", nargs="+", choices=KINDS, default=list(KINDS),
                        help="kinds injected, in a shuffled cycle")
    parser.add_argument("--warmup", type=float, default=0.2,
                        help="share of the duration with no fault; memory is judged after it")
    parser.add_argument("--deadline", type=float, default=120.0,
                        help="seconds after which a request with no answer counts as lost")
    parser.add_argument("--video-share", type=float, default=0.1,
                        help="share of the requests that stay which carry a short video")
    parser.add_argument("--model-path", type=Path,
                        help="checkpoint (default: the tiny random one, built under --cache-dir)")
    parser.add_argument("--cache-dir", default="~/.cache/mmdisagg")
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak"),
                        help="folder for summary.json, rss.csv and rss.png")


def plan_from(args: argparse.Namespace) -> SoakPlan:
    if args.duration <= 0 or args.fault_interval <= 0 or args.deadline <= 0:
        raise UsageError("--duration, --fault-interval and --deadline must be > 0")
    if args.concurrency < 1 or not 0 <= args.warmup < 1:
        raise UsageError("need --concurrency >= 1 and 0 <= --warmup < 1")
    return SoakPlan(duration_s=args.duration, seed=args.seed, concurrency=args.concurrency,
                    fault_interval_s=args.fault_interval, warmup_s=args.warmup * args.duration,
                    deadline_s=args.deadline, kinds=tuple(dict.fromkeys(args.faults)),
                    video_share=args.video_share)


def cluster_settings(args: argparse.Namespace) -> ServeSettings:
    model_path = str(args.model_path or tiny_model(args.cache_dir))
    return load(ServeSettings, {**CLUSTER_KNOBS, "model_path": model_path,
                                "port": free_port("127.0.0.1"),
                                "auth_token": secrets.token_hex(16)}, environ={})


def openai_client(url: str, deadline_s: float) -> AsyncOpenAI:
    """A client whose own timeout never beats the soak's deadline."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                       timeout=deadline_s + 10,
                       http_client=httpx.AsyncClient(limits=limits, timeout=deadline_s + 10))


async def drive_load(url: str, model: str, plan: SoakPlan, clock: Callable[[], float],
                     stop: threading.Event, injector: Injector) -> list[Outcome]:
    """The load, with a progress line every ``PROGRESS_EVERY_S``."""
    tally = Tally()

    def over() -> bool:
        return clock() >= plan.duration_s or stop.is_set()

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            kinds = Counter(f.kind for f in injector.faults)
            print(f"soak {clock():.0f}/{plan.duration_s:.0f} s: {tally.line()}; "
                  f"{len(injector.faults)} faults {dict(kinds)}", file=sys.stderr, flush=True)

    async with openai_client(url, plan.deadline_s) as openai:
        progress = asyncio.create_task(report())
        try:
            return await drive(Client(openai, model, plan.deadline_s, clock), plan.concurrency,
                               over, plan.seed, tally, plan.video_share)
        finally:
            progress.cancel()


async def final_check(url: str, model: str, clock: Callable[[], float]) -> list[str]:
    """A text and an image request after the run: the cluster still serves."""
    rng = random.Random(0)
    async with openai_client(url, 60.0) as openai:
        client = Client(openai, model, 60.0, clock)
        images = ImageSource(rng, repeated=1)
        results = []
        for shape in (Shape(0, 8, 8, False), Shape(1, 8, 8, True)):
            outcome = await client.send(shape, messages_for(shape, images, rng), rng)
            results.append(outcome.result if outcome.result == "ok" else
                           f"{outcome.result}: {outcome.detail}")
        return results


def soak(launcher: Launcher, url: str, plan: SoakPlan,
         limit: FlatLimit) -> tuple[SoakReport, list[RssSample]]:
    """Load, faults and memory samples at once; then the pools and a last request."""
    began = time.monotonic()

    def clock() -> float:
        return time.monotonic() - began

    model = launcher.settings.model.name
    servers = [c for c in launcher.children if c.name != "router"]
    sampler = RssSampler(launcher.children, clock)
    injector = Injector(launcher, clock, plan.seed, plan.fault_interval_s, plan.kinds)
    stop_faults, stop_sampling = threading.Event(), threading.Event()
    sampling = threading.Thread(target=sampler.run, args=(stop_sampling,), daemon=True)
    injecting = threading.Thread(target=injector.run, args=(plan.warmup_s, stop_faults),
                                 daemon=True)
    sampling.start()
    injecting.start()
    outcomes = asyncio.run(drive_load(url, model, plan, clock, stop_faults, injector))
    stop_faults.set()
    injecting.join(RECOVERY_TIMEOUT_S + HANG_S[1] + 60)  # the fault under way is undone
    stop_sampling.set()
    sampling.join()
    elapsed = clock()
    transfer = launcher.settings.transfer
    leaked = wait_pools_free(servers, timeout=transfer.transfer_timeout
                             + transfer.heartbeat_timeout + 30)
    return SoakReport(
        plan=plan, elapsed_s=elapsed, outcomes=outcomes, faults=injector.faults,
        grace_s=transfer.transfer_timeout + transfer.heartbeat_timeout + HEALTH_CHECKS_S,
        leaked_blocks=leaked, growth=growth(sampler.samples, plan.warmup_s, limit),
        limit=limit, final_check=asyncio.run(final_check(url, model, clock)),
        stopped_early=injector.failure), sampler.samples


def write_results(report: SoakReport, samples: list[RssSample], out: Path) -> dict:
    summary = report.to_dict()
    summary["rss_csv"] = str(write_csv(samples, out / "rss.csv"))
    curves = {key: [(s.t, s.rss_mb) for s in life] for key, life in lives(samples).items()}
    events = [(f.at, f.kind) for f in report.faults]
    summary["rss_png"] = str(plots.rss_over_time(
        curves, events, report.plan.warmup_s, out / "rss.png",
        f"resident memory during a {report.plan.duration_s:.0f} s soak "
        f"({len(report.faults)} faults)"))
    write_json(out / "summary.json", summary)
    return summary


def print_summary(summary: dict) -> None:
    requests, faults = summary["requests"], summary["faults"]
    print(f"requests: {requests['total']} ({requests['ok']} ok, "
          f"{requests['errored_at_fault']} errored at a fault, "
          f"{requests['unexplained_errors']} unexplained errors, {requests['lost']} lost, "
          f"left on purpose {requests['left_on_purpose']})")
    print(f"faults: {faults['injected']} {faults['by_kind']}")
    print(f"leaked blocks: {summary['leaked_blocks']['total']:g}")
    for life in summary["memory"]["lives"]:
        verdict = {True: "flat", False: "GREW", None: "not judged"}[life["flat"]]
        print(f"memory {life['server']} pid {life['pid']} {life['from_s']:.0f}-"
              f"{life['to_s']:.0f} s: {life['start_mb']:.0f} -> {life['end_mb']:.0f} MiB "
              f"({verdict})")
    print("PASSED" if summary["passed"] else "FAILED: " + "; ".join(summary["failures"]))


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from(args)
    except UsageError as exc:
        print(f"mmdisagg bench soak: {exc}", file=sys.stderr)
        return 2
    settings = cluster_settings(args)
    launcher = Launcher(settings)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the cluster on the way out
    try:
        url = launcher.start()
        print(f"soak: cluster up at {url}; {plan.duration_s:g} s of load, a fault every "
              f"~{plan.fault_interval_s:g} s after {plan.warmup_s:g} s", file=sys.stderr,
              flush=True)
        report, samples = soak(launcher, url, plan, FlatLimit())
    finally:
        launcher.stop()
    summary = write_results(report, samples, args.out)
    print_summary(summary)
    print(f"wrote {args.out / 'summary.json'}", file=sys.stderr)
    return 0 if summary["passed"] else 1
