"""Clusters to break on purpose: signal, restart and watch servers through their /metrics, and
ask through the openai client with every outcome recorded, so a hang fails a test instead of
stalling it."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time
from collections.abc import Callable

import numpy as np
import openai
from PIL import Image

from tests.conftest import SPAWNED
from tests.models.fixtures import text_part, user
from tests.servers.cluster import Cluster, metrics, wait_pools_free

ANSWER_DEADLINE_S = 90


def wait_until(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail the test (never hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or predicate}")
        time.sleep(0.05)


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """``wait_until`` inside an event loop: the loop's other tasks run meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        await asyncio.sleep(0.05)


class FaultCluster(Cluster):
    """A Cluster whose servers a test may kill, stop and start again."""

    def sample(self, name: str, key: str) -> float:
        child = self.child(name)
        return metrics(child.url).get(key, 0.0)

    def queue(self, name: str, queue: str) -> float:
        return self.sample(name, f'mmdisagg_queue_length{{queue="{queue}"}}')

    def used_blocks(self, name: str) -> float:
        return self.sample(name, 'mmdisagg_pool_blocks{state="used"}')

    def rooms(self, name: str, outcome: str) -> float:
        return self.sample(name, f'mmdisagg_transfer_rooms_total{{outcome="{outcome}"}}')

    def healthy_in_router(self, role: str) -> float:
        return metrics(self.url).get(f'mmdisagg_router_servers{{role="{role}",state="healthy"}}',
                                     0.0)

    def signal(self, name: str, signum: int) -> None:
        os.kill(self.child(name).process.pid, signum)

    def kill(self, name: str) -> None:
        process = self.child(name).process
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def restart(self, name: str) -> None:
        """Start a dead server again with the same command line, port and environment, and
        wait until it answers."""
        child = self.child(name)
        try:
            self.launcher.restart(child)
        finally:
            SPAWNED.add(child.process.pid)

    def wait_router_sees_all(self, timeout: float = 30) -> None:
        """The router's health checks found every server (after a restart)."""
        encoders, languages = self.settings.encoders, self.settings.language_servers
        wait_until(lambda: (self.healthy_in_router("encode"),
                            self.healthy_in_router("language")) == (encoders, languages),
                   timeout, "the router sees every server healthy")

    def assert_serving_and_clean(self) -> None:
        """The invariant after every fault: each pool back to fully free, and a new request
        (text and image) answered."""
        used = wait_pools_free(self, timeout=60)
        assert not any(used.values()), f"blocks still used after the fault: {used}"
        client = self.client()
        for messages in (user(text_part("still serving?")),
                         user(image(96, 80), text_part("and this?"))):
            reply = client.chat.completions.create(model="tiny-model", messages=messages,
                                                   max_tokens=4, temperature=0)
            assert reply.choices[0].finish_reason in ("length", "stop")
        used = wait_pools_free(self, timeout=60)
        assert not any(used.values()), f"blocks still used after serving again: {used}"


def image(width: int, height: int, seed: int = 0) -> dict:
    """An image_url part with a smooth, compressible picture (a large one stays a small
    request) whose content depends on ``seed``."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                       np.full_like(x, seed % 256)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


async def ask(client: openai.AsyncOpenAI, messages: list[dict], max_tokens: int = 8,
              stream: bool = False, deadline: float = ANSWER_DEADLINE_S,
              chunks: list[object] | None = None) -> str | int:
    """'ok', the HTTP status of a clean failure, 'stream-error' (an error event in a stream)
    or 'connection-error'; a request that hangs fails the test. A stream's chunks are appended
    to ``chunks`` as they arrive, each with its arrival time (for a test that waits on them)."""
    async def run() -> str | int:
        try:
            if not stream:
                reply = await client.chat.completions.create(
                    model="tiny-model", messages=messages, max_tokens=max_tokens, temperature=0,
                    extra_body={"ignore_eos": True})
                assert reply.choices[0].finish_reason == "length"
                return "ok"
            finish = None
            async for chunk in await client.chat.completions.create(
                    model="tiny-model", messages=messages, max_tokens=max_tokens,
                    temperature=0, stream=True, extra_body={"ignore_eos": True}):
                if chunks is not None:
                    chunks.append((time.monotonic(), chunk))
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
            assert finish == "length"
            return "ok"
        except openai.APIStatusError as exc:
            return exc.status_code
        except openai.APIConnectionError:
            return "connection-error"
        except openai.APIError:  # an error event inside a stream
            return "stream-error"

    return await asyncio.wait_for(run(), deadline)
