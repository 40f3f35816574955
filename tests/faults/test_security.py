"""What a real ``mmdisagg serve`` enforces: every port it opens (HTTP, bootstrap, ZeroMQ
control, tcp data) listens on --host alone; the servers' internal APIs refuse callers without
the shared token and the router's API callers without the key; neither secret ever shows in
a log line or a command line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest

from tests.faults.served import API_KEY, TOKEN, Served


def listening(served: Served) -> list[tuple[str, str, int]]:
    """(server, address, port) of every listening TCP socket of serve and its servers."""
    roles = {process.pid: name for name, process in _by_name(served).items()}
    return [(roles[process.pid], conn.laddr.ip, conn.laddr.port)
            for process in served.processes()
            for conn in process.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN]


def _by_name(served: Served) -> dict[str, psutil.Process]:
    found = {"serve": served.processes()[0]}
    for process in served.processes()[1:]:
        line = process.cmdline()
        role = line[line.index("mmdisagg.cli") + 1]
        found[role if role == "router" else f"{role}-0"] = process
    return found


def assert_only_on(served: Served, host: str) -> None:
    sockets = listening(served)
    assert {address for _, address, _ in sockets} == {host}, sockets
    # router: API; encode: API, bootstrap, control; language: API, control, tcp data
    assert Counter(name for name, _, _ in sockets) == {"router": 1, "encode-0": 3,
                                                       "language-0": 3}, sockets


def test_every_port_listens_on_loopback_only(served: Served) -> None:
    assert_only_on(served, "127.0.0.1")


def test_every_port_follows_host(tiny_checkpoints, tmp_path: Path) -> None:
    other = Served(tiny_checkpoints["qwen2_vl"], tmp_path / "serve.log",
                   "--transfer-backend", "tcp", host="127.0.0.2")
    try:
        assert_only_on(other, "127.0.0.2")
    finally:
        other.stop()


@pytest.mark.parametrize("header", [None, "Bearer guess", f"Bearer {API_KEY}"],
                         ids=["no token", "wrong token", "the API key instead"])
def test_internal_apis_refuse_callers_without_the_token(served: Served, header) -> None:
    servers = served.servers()
    headers = {"Authorization": header} if header else {}
    calls = [(servers["encode-0"], "/encode", {"room": 1, "prompt": {"messages": []}}),
             (servers["encode-0"], "/abort", {"room": 1}),
             (servers["language-0"], "/generate", {"room": 1, "encoder": "x", "params": {}}),
             (servers["language-0"], "/abort", {"room": 1})]
    for url, path, body in calls:
        reply = httpx.post(url + path, json=body, headers=headers)
        assert reply.status_code == 401, (path, reply.text)
        assert "token" in reply.json()["error"]["message"]
    bootstrap = httpx.get(servers["encode-0"] + "/info").json()["bootstrap"]
    reply = httpx.post(f"http://{bootstrap}/register", json={}, headers=headers)
    assert reply.status_code == 401, reply.text


def test_router_api_needs_the_key(served: Served) -> None:
    for header in ({}, {"Authorization": "Bearer guess"}, {"Authorization": f"Bearer {TOKEN}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            reply = httpx.request(method, served.url + path, headers=header, json={})
            assert reply.status_code == 401, (path, header, reply.text)
            assert reply.json()["error"]["message"] == "missing or wrong API key"
    models = httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.json()["data"][0]["id"] == "tiny-model"


def test_no_secret_in_logs_or_command_lines(served: Served) -> None:
    """Runs after the others of this package used the cluster (good, bad and refused calls,
    at debug log level)."""
    reply = httpx.post(served.url + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {API_KEY}"}, json={
        "model": "tiny-model", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200
    log = served.log.read_text()
    assert "DEBUG" in log and "registered receiver" in log  # the log is there, and verbose
    for secret in (TOKEN, API_KEY):
        assert secret not in log
        for process in served.processes():
            assert secret not in " ".join(process.cmdline()), process.cmdline()
