"""Real clusters for end-to-end tests: the same Launcher ``mmdisagg serve`` runs, on free
ports, with metrics read back from every server."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from openai import AsyncOpenAI, OpenAI

from mmdisagg.config import ServeSettings, load
from mmdisagg.serve import probe
from mmdisagg.serve.launcher import Child, Launcher, free_port
from mmdisagg.serve.probe import metrics
from tests.conftest import SPAWNED, segments_of

__all__ = ["Cluster", "metrics", "wait_pools_free"]

TOKEN = "test-token"


class Cluster:
    def __init__(self, model_path: Path, api_key: str = "", **knobs) -> None:
        settings = load(ServeSettings, {"model_path": str(model_path), "port": free_port(
            "127.0.0.1"), "api_key": api_key, "auth_token": TOKEN, "startup_timeout": 180,
            "served_model_name": "tiny-model", **knobs}, environ={})
        self.settings = settings
        self.launcher = Launcher(replace(settings))
        try:
            self.url = self.launcher.start()
        finally:
            SPAWNED.update(c.process.pid for c in self.launcher.children)
        self.api_key = api_key or "unused"
        self.model = settings.model.name

    @property
    def servers(self) -> list[Child]:
        return [c for c in self.launcher.children if c.name != "router"]

    def child(self, name: str) -> Child:
        return next(c for c in self.launcher.children if c.name == name)

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                      timeout=120, **kwargs)

    def async_client(self, **kwargs) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                           timeout=300, **kwargs)

    async def token_ids(self, requests: list[list[dict]], max_tokens: int,
                        concurrency: int | None = None) -> list[list[int]]:
        """Each chat's greedy answer as token ids, ``concurrency`` (default: all) at a time."""
        client = self.async_client()
        limit = asyncio.Semaphore(concurrency or len(requests))

        async def ask(messages: list[dict]) -> list[int]:
            async with limit:
                reply = await client.chat.completions.create(
                    model="tiny-model", messages=messages, max_tokens=max_tokens,
                    temperature=0, extra_body={"return_token_ids": True})
                return reply.choices[0].token_ids

        try:
            return await asyncio.gather(*(ask(messages) for messages in requests))
        finally:
            await client.close()

    def close(self) -> None:
        """Stop every process; none may leave its shared-memory pool behind."""
        self.launcher.stop()
        left = segments_of({c.process.pid for c in self.launcher.children})
        assert not left, f"stopped servers left shared memory behind: {sorted(left)}"


def wait_pools_free(cluster: Cluster, timeout: float = 30) -> dict[str, float]:
    """Every live server's pool back to fully free (bounded wait); returns used blocks each."""
    return probe.wait_pools_free(cluster.servers, timeout)
