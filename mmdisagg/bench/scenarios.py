"""What ``bench compare`` runs: the systems under test and the scenarios behind the goals of
SPEC §6 / issue 6. Every system of a scenario gets the same request stream (same seed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmdisagg.bench.load import Load
from mmdisagg.bench.systems import System
from mmdisagg.bench.workload import Workload

SYSTEMS = {s.name: s for s in (
    System("disagg-1+1", "mmdisagg serve: 1 encode + 1 language server"),
    System("disagg-2+1", "mmdisagg serve: 2 encode + 1 language servers", ("--encoders", "2")),
    System("colocated", "mmdisagg serve --colocated: both halves in one process",
           ("--colocated",)),
    System("transformers-serve", "transformers serve --continuous-batching (the peer)",
           peer=True),
    System("disagg-1+1-windows-1", "1 + 1, windows of 1 block (128 tokens): resume-heavy",
           ("--default-blocks", "1", "--window-blocks", "1")),
    System("disagg-1+1-windows-16", "1 + 1, a first window of 16 blocks (2048 tokens)",
           ("--default-blocks", "16")),
    System("disagg-1+1-no-prefix-cache", "1 + 1 with --no-prefix-cache",
           ("--no-prefix-cache",)),
    System("disagg-1+1-prefill-after-arrival", "1 + 1 with --no-prefill-while-arriving: "
           "prefill starts once the whole prompt landed", ("--no-prefill-while-arriving",)),
)}
PREFIX = ("disagg-1+1", "disagg-1+1-no-prefix-cache")
ARRIVAL = ("disagg-1+1", "disagg-1+1-prefill-after-arrival")
MAIN = ("disagg-1+1", "disagg-2+1", "colocated", "transformers-serve")
RATES = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    systems: tuple[str, ...]
    streams: tuple[tuple[Workload, Load], ...]
    focus: str  # the request group the scenario's numbers and goal read
    offered_rate: float = math.nan  # for the throughput-vs-rate sweep

    @property
    def in_rate_sweep(self) -> bool:
        return not math.isnan(self.offered_rate)


def scenarios(scale: float = 1.0, max_seconds: float = 300.0) -> list[Scenario]:
    """Request counts multiplied by ``scale`` (at least ``floor`` each)."""
    def n(count: int, floor: int = 2) -> int:
        return max(floor, round(count * scale))

    def image_requests(count: int, group: str, seed: int, size: tuple[int, int] = (448, 448),
                       max_tokens: int = 32) -> Workload:
        return Workload(num_requests=n(count), images=(1, 1), image_sizes=(size,),
                        max_tokens=max_tokens, group=group, seed=seed)

    closed = {c: Load(concurrency=c, max_seconds=max_seconds) for c in (1, 4, 16)}
    found = [
        Scenario("latency", "concurrency 1, one 448x448 image, 32 output tokens", MAIN,
                 ((image_requests(20, "latency", 100), closed[1]),), "latency"),
        Scenario("throughput", "concurrency 16, one 448x448 image, 32 output tokens", MAIN,
                 ((image_requests(64, "throughput", 200), closed[16]),), "throughput"),
        # NOTE: enough text requests (at least 8 x 256 tokens) to still be generating when
        # the burst arrives and while it is served.
        Scenario("burst", "4 ongoing text generations (256 tokens each) while a burst of "
                 "requests with a 1024x768 image arrives at once after 1 s", MAIN,
                 ((Workload(num_requests=n(16, floor=8), images=(0, 0), max_tokens=256,
                            group="text", seed=300), closed[4]),
                  (image_requests(8, "images", 400, (1024, 768), max_tokens=8),
                   Load(start_delay_s=1.0, max_seconds=max_seconds))), "text"),
        Scenario("resume", "concurrency 4, one 1024x768 image (~1100-token prompts), 16 output "
                 "tokens: 1-block windows vs one large window",
                 ("disagg-1+1-windows-1", "disagg-1+1-windows-16"),
                 ((image_requests(24, "resume", 500, (1024, 768), 16), closed[4]),), "resume"),
        Scenario("video", "concurrency 1, one 16-frame 448x448 video (8 temporal patches, "
                 "~2,100-token prompts), 32 output tokens", ("disagg-1+1", "colocated"),
                 ((Workload(num_requests=n(10), images=(0, 0), videos=(1, 1), video_frames=16,
                            max_tokens=32, group="video", seed=700), closed[1]),), "video"),
    ]
    for name, system_words, about in (
            ("chat", 0, "two-turn chats, one 448x448 image"),
            ("chat-system", 1500, "two-turn chats, one 448x448 image, a shared "
                                  "1500-word system prompt")):
        chats = Workload(num_requests=n(8), images=(1, 1), image_sizes=((448, 448),),
                         max_tokens=32, seed=700, turns=2, system_prompt_words=system_words)
        found.append(Scenario(name, f"{about}, one conversation at a time", PREFIX,
                              ((chats, closed[1]),), "turn 2"))
    found.append(Scenario("cold", "concurrency 1, one 448x448 image, single turn: what the "
                          "prefix cache costs when nothing hits", PREFIX,
                          ((image_requests(20, "cold", 800), closed[1]),), "cold"))
    # NOTE: 8 x 484 image tokens and the question: ~4,030 of the checkpoint's 4,096 tokens
    found.append(Scenario("many-images", "concurrency 1, eight 616x616 images (~4,030-token "
                          "prompts, a vision forward each), 8 output tokens: prefill as the prompt "
                          "arrives vs once it all landed", ARRIVAL,
                          ((Workload(num_requests=n(8), images=(8, 8),
                                     image_sizes=((616, 616),), prompt_words=30, max_tokens=8,
                                     group="many-images", seed=900), closed[1]),),
                          "many-images"))
    for step, rate in enumerate(RATES):
        found.append(Scenario(
            f"rate {rate:g}/s", f"open loop, Poisson at {rate:g} requests/s, one 448x448 image",
            ("disagg-1+1", "colocated", "transformers-serve"),
            ((image_requests(16, "rate", 600 + 100 * step),
              Load(request_rate=rate, max_seconds=max_seconds)),), "rate", offered_rate=rate))
    return found
