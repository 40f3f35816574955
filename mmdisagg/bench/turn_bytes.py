"""``mmdisagg bench turn-bytes``: what each turn of the multi-turn chat scenarios sends to the
language server, with the prefix cache.

``bench compare`` sees latencies only. This starts ``mmdisagg serve`` (one encode and one
language server, prefix cache on) on the benchmark checkpoint, runs the ``chat`` and
``chat-system`` conversations one turn at a time, and reads the language server's counters
around each turn: embedding bytes received (``mmdisagg_transfer_bytes_total``) and prompt
tokens the prefix cache held (``mmdisagg_prefix_cache_hit_tokens_total``), exact per turn.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
from pathlib import Path

from openai import OpenAI

from mmdisagg.bench.compare import bench_checkpoint
from mmdisagg.bench.scenarios import scenarios
from mmdisagg.bench.systems import HOST
from mmdisagg.bench.timing import print_table
from mmdisagg.bench.workload import ChatRequest, build_requests
from mmdisagg.config import ServeSettings, load
from mmdisagg.serve.launcher import Launcher, free_port
from mmdisagg.serve.probe import metrics

SCENARIOS = ("chat", "chat-system")
COUNTERS = {"bytes": "mmdisagg_transfer_bytes_total",
            "hit": "mmdisagg_prefix_cache_hit_tokens_total"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", type=Path,
                        help="checkpoint to serve (default: bench compare's)")
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/mmdisagg"))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the conversations per scenario (8)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")


def measure_turn(client: OpenAI, language_url: str, request: ChatRequest) -> dict:
    before = metrics(language_url)
    reply = client.chat.completions.create(
        model="bench", messages=request.messages, max_tokens=request.max_tokens, temperature=0,
        extra_body={"ignore_eos": True})
    after = metrics(language_url)
    row = {name: int(after[key] - before.get(key, 0.0)) for name, key in COUNTERS.items()}
    return {"turn": request.turn, "prompt": reply.usage.prompt_tokens,
            "answer": reply.choices[0].message.content, **row}


def run(args: argparse.Namespace) -> int:
    checkpoint = args.model_path or bench_checkpoint(args.cache_dir)
    settings = load(ServeSettings, {
        "model_path": str(checkpoint), "host": HOST, "port": free_port(HOST),
        "auth_token": secrets.token_hex(16), "served_model_name": "bench", "torch_threads": 1,
        "log_level": "warning"}, environ={})
    launcher = Launcher(settings)
    rows = []
    try:
        client = OpenAI(base_url=f"{launcher.start()}/v1", api_key="unused", max_retries=0,
                        timeout=args.timeout)
        language = next(c for c in launcher.children if c.name == "language-0").url
        for scenario in scenarios(args.scale):
            if scenario.name not in SCENARIOS:
                continue
            for request in build_requests(scenario.streams[0][0]):
                first = None
                while request is not None:
                    turn = measure_turn(client, language, request)
                    first = first or turn
                    rows.append({"scenario": scenario.name, "conversation": request.index,
                                 "turn": turn["turn"], "prompt tokens": turn["prompt"],
                                 "cached tokens": turn["hit"], "bytes": turn["bytes"],
                                 "bytes / turn 1's": f"{turn['bytes'] / first['bytes']:.1%}"})
                    request = request.follow_up(turn["answer"])
    finally:
        launcher.stop()
    first_bytes = {(r["scenario"], r["conversation"]): r["bytes"] for r in rows if r["turn"] == 1}
    print_table(rows, ["scenario", "conversation", "turn", "prompt tokens", "cached tokens",
                       "bytes", "bytes / turn 1's"])
    for name in SCENARIOS:
        ratios = [r["bytes"] / first_bytes[name, r["conversation"]] for r in rows
                  if r["scenario"] == name and r["turn"] > 1]
        if ratios:
            print(f"{name}: later turns move {statistics.median(ratios):.1%} of turn 1's bytes "
                  f"(median of {len(ratios)}; max {max(ratios):.1%})", file=sys.stderr)
    return 0
