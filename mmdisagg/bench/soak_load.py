"""The mixed load of a soak: closed-loop clients sending text, image and video requests of
various sizes, streamed or whole, a few of which leave on purpose (before their first token or
in the middle of the stream). Every request ends in exactly one recorded outcome within a
deadline, so a request that hangs is counted as lost instead of stalling the run."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import openai
from openai import AsyncOpenAI

from mmdisagg.bench.workload import WORDS, data_url, draw_image, draw_video

IMAGE_SIZES = ((64, 48), (160, 120), (224, 224), (448, 336))
MAX_TOKENS = (1, 8, 32, 128)
LEAVE_SHARE = 0.06  # of requests, for each way of leaving
LEAVE_WITHIN_S = (0.01, 0.4)  # how soon a client leaving before its first token gives up
REPEAT_IMAGE_SHARE = 0.3  # images drawn again from a small set: image-cache hits
VIDEO_FRAMES, VIDEO_SIZE = 4, (64, 48)
MESSAGE_CHARS = 300
ERROR_BACKOFF_S = 0.5  # a client waits this long after an error (no busy loop on a dead router)
# NOTE: the outcomes a request can have; "left" is a client leaving on purpose
OUTCOMES = ("ok", "error", "lost", "left")


@dataclass(frozen=True)
class Shape:
    """What one request looks like."""

    images: int
    prompt_words: int
    max_tokens: int
    stream: bool
    leave: str = ""  # "", "before-first-token" or "mid-stream"
    videos: int = 0

    @property
    def label(self) -> str:
        kind = f"{self.images}-image" if self.images else "text"
        kind += "+video" if self.videos else ""
        return f"{kind}/{'stream' if self.stream else 'whole'}" + (
            f"/leave-{self.leave}" if self.leave else "")


@dataclass(frozen=True)
class Outcome:
    """What became of one request; times in seconds since the soak began."""

    shape: str
    start: float
    end: float
    result: str  # one of OUTCOMES
    detail: str = ""  # the kind of error (http_503, connection, ...) or of leaving
    message: str = ""  # what the error said


def draw_shape(rng: random.Random, video_share: float) -> Shape:
    leave = rng.random()
    if leave < 2 * LEAVE_SHARE:
        way = "before-first-token" if leave < LEAVE_SHARE else "mid-stream"
        return Shape(rng.choice((0, 1)), rng.randint(4, 64), 128, True, way)
    return Shape(images=rng.choice((0, 0, 1, 1, 2)), prompt_words=rng.choice((4, 32, 200)),
                 max_tokens=rng.choice(MAX_TOKENS), stream=rng.random() < 0.5,
                 videos=int(rng.random() < video_share))


class ImageSource:
    """Fresh images mostly (so encoders do vision work), some repeated (cache hits)."""

    def __init__(self, rng: random.Random, repeated: int = 8) -> None:
        self.rng = rng
        self.repeated = [self._draw() for _ in range(repeated)]

    def _draw(self) -> dict:
        url = data_url(draw_image(*self.rng.choice(IMAGE_SIZES), seed=self.rng.getrandbits(32)))
        return {"type": "image_url", "image_url": {"url": url}}

    def next(self) -> dict:
        if self.rng.random() < REPEAT_IMAGE_SHARE:
            return self.rng.choice(self.repeated)
        return self._draw()

    def video(self) -> dict:
        video = draw_video(VIDEO_FRAMES, *VIDEO_SIZE, seed=self.rng.getrandbits(32))
        return {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}}


def messages_for(shape: Shape, images: ImageSource, rng: random.Random) -> list[dict]:
    words = " ".join(rng.choice(WORDS) for _ in range(shape.prompt_words))
    parts = [images.next() for _ in range(shape.images)]
    parts += [images.video() for _ in range(shape.videos)] + [{"type": "text", "text": words}]
    return [{"role": "user", "content": parts}]


class Client:
    """One OpenAI-client view of the router for every soak request."""

    def __init__(self, client: AsyncOpenAI, model: str, deadline_s: float,
                 clock: Callable[[], float]) -> None:
        self.client = client
        self.model = model
        self.deadline_s = deadline_s
        self.clock = clock

    async def send(self, shape: Shape, messages: list[dict], rng: random.Random) -> Outcome:
        start = self.clock()
        first_token = asyncio.Event()
        task = asyncio.create_task(self._complete(shape, messages, first_token))
        limit = rng.uniform(*LEAVE_WITHIN_S) if shape.leave == "before-first-token" \
            else self.deadline_s
        done, _ = await asyncio.wait({task}, timeout=limit)
        message = ""
        if done:
            result, detail, message = task.result()
        else:
            task.cancel()  # closes the connection: the router sees the client gone
            await asyncio.gather(task, return_exceptions=True)
            if shape.leave == "before-first-token":
                result, detail = "left", ("mid-stream" if first_token.is_set()
                                          else "before-first-token")
            else:
                result, detail = "lost", f"no answer within {self.deadline_s:g} s"
        return Outcome(shape.label, start, self.clock(), result, detail, message)

    async def _complete(self, shape: Shape, messages: list[dict],
                        first_token: asyncio.Event) -> tuple[str, str, str]:
        """(result, kind of error, its message)."""
        request = dict(model=self.model, messages=messages, max_tokens=shape.max_tokens,
                       temperature=0, extra_body={"ignore_eos": True})
        try:
            if not shape.stream:
                reply = await self.client.chat.completions.create(**request)
                finished = bool(reply.choices) and reply.choices[0].finish_reason is not None
                return ("ok", "", "") if finished else ("error", "no_finish_reason", "")
            finish = None
            stream = await self.client.chat.completions.create(**request, stream=True)
            async for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        first_token.set()
                        if shape.leave == "mid-stream":
                            await stream.close()
                            return "left", "mid-stream", ""
                    finish = choice.finish_reason or finish
            return ("ok", "", "") if finish else ("error", "stream_ended_unfinished", "")
        except openai.APIStatusError as exc:
            return "error", f"http_{exc.status_code}", exc.message[:MESSAGE_CHARS]
        except (openai.APIConnectionError, httpx.HTTPError) as exc:
            return "error", "connection", repr(exc)[:MESSAGE_CHARS]
        except openai.APIError as exc:  # an error event inside a stream
            return "error", "stream_error", exc.message[:MESSAGE_CHARS]


class Tally:
    """Running counts for progress lines."""

    def __init__(self) -> None:
        self.results: Counter[str] = Counter()
        self.in_flight = 0

    def line(self) -> str:
        done = sum(self.results.values())
        counts = ", ".join(f"{self.results[r]} {r}" for r in OUTCOMES)
        return f"{done} requests ({counts}), {self.in_flight} in flight"


async def drive(client: Client, concurrency: int, until: Callable[[], bool], seed: int,
                tally: Tally, video_share: float) -> list[Outcome]:
    """``concurrency`` clients, each sending one request after another until ``until()``;
    every request's outcome."""
    outcomes: list[Outcome] = []

    async def worker(number: int) -> None:
        rng = random.Random(f"{seed}-{number}")
        images = ImageSource(rng)
        while not until():
            shape = draw_shape(rng, video_share)
            messages = messages_for(shape, images, rng)
            tally.in_flight += 1
            outcome = await client.send(shape, messages, rng)
            tally.in_flight -= 1
            tally.results[outcome.result] += 1
            outcomes.append(outcome)
            if outcome.result == "error":
                await asyncio.sleep(ERROR_BACKOFF_S)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return outcomes

