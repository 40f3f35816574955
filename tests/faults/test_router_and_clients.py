"""The router killed and started again while the servers stay up; clients that go away before
their first token (streamed or not). Requests left behind are aborted on both servers."""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlparse

import pytest

from tests.faults.harness import FaultCluster, ask, image, wait_until
from tests.models.fixtures import text_part, user


def aborted(cluster: FaultCluster, name: str) -> float:
    role = name.split("-")[0]
    return cluster.sample(name, f'mmdisagg_requests_total{{outcome="aborted",role="{role}"}}')


def test_router_restarted_while_servers_stay_up(fault_cluster):
    cluster, _ = fault_cluster
    before = aborted(cluster, "language-0")

    async def scenario():
        client = cluster.async_client()
        requests = [asyncio.create_task(ask(client, user(text_part(f"Long story {i}")), 4000,
                                            stream=i % 2 == 0)) for i in range(3)]
        await asyncio.to_thread(wait_until, lambda: cluster.queue("language-0", "running") == 3,
                                60, "three requests decoding")
        cluster.kill("router")
        outcomes = await asyncio.gather(*requests)
        await client.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert set(outcomes) <= {"connection-error", "stream-error"}, outcomes
    wait_until(lambda: aborted(cluster, "language-0") == before + 3, 30,
               "the language server aborts what the dead router left")
    cluster.restart("router")
    cluster.wait_router_sees_all()  # a fresh view of every server, from health checks alone
    assert asyncio.run(ask(cluster.async_client(), user(image(64, 64), text_part("Back?")))) \
        == "ok"


def post_and_leave(cluster: FaultCluster, body: dict, leave_when) -> None:
    """POST ``body`` to the chat API on a raw socket; close the socket once ``leave_when()``."""
    url = urlparse(cluster.url)
    payload = json.dumps(body).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        wait_until(leave_when, 60, "the moment to leave")


ENCODERS = ("encode-0", "encode-1")


def leave_and_expect_aborts(cluster: FaultCluster, body: dict, leave_when) -> None:
    wait_until(lambda: not any(cluster.queue(n, "encoding") for n in ENCODERS), 60,
               "earlier vision forwards over")
    before = {name: aborted(cluster, name) for name in (*ENCODERS, "language-0")}
    post_and_leave(cluster, body, leave_when)
    wait_until(lambda: sum(aborted(cluster, n) - before[n] for n in ENCODERS) == 1, 30,
               "the encode server aborts the room")
    wait_until(lambda: aborted(cluster, "language-0") == before["language-0"] + 1, 30,
               "the language server aborts the room")
    wait_until(lambda: not any(cluster.queue(n, "waiting") for n in ENCODERS), 30,
               "no request left waiting on an encode server")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_client_gone_during_vision_work(fault_cluster, stream):
    """The client leaves while the encode server runs the vision forward: the room is aborted
    on the encode server (which drops the job) and on the language server."""
    cluster, _ = fault_cluster
    body = {"model": "tiny-model", "stream": stream, "max_tokens": 8,
            "messages": user(image(2048, 2048), text_part("Big?"))}
    leave_and_expect_aborts(cluster, body, lambda: any(cluster.queue(name, "encoding") >= 1
                                                       for name in ENCODERS))


def test_client_gone_while_its_images_are_prepared(fault_cluster):
    """The client leaves while the encode server still decodes its images (seconds for three
    large ones), so the abort reaches it before the request is in its queues."""
    cluster, _ = fault_cluster
    body = {"model": "tiny-model", "max_tokens": 8, "messages": user(
        *(image(2048, 2048, seed) for seed in range(3)), text_part("Three?"))}
    leave_and_expect_aborts(cluster, body, lambda: cluster.queue("language-0", "transfer")
                            + cluster.queue("language-0", "prealloc") >= 1)
