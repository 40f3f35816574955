"""A request id travels from the client (``X-Request-Id``) or the router through both servers:
it comes back in the response and names the request in each server's log lines about it."""

from __future__ import annotations

import httpx

from tests.faults.harness import wait_until
from tests.faults.served import API_KEY, Served
from tests.models.fixtures import data_url, image_part, png_bytes, text_part, user


def ask(served: Served, messages: list[dict], request_id: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return httpx.post(f"{served.url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "tiny-model", "messages": messages, "max_tokens": 2})


def logged(served: Served, role: str, words: str) -> bool:
    """A line of ``role``'s (encode, language) in serve's debug log contains ``words``."""
    return any(f" {role} " in line and words in line
               for line in served.log.read_text(errors="replace").splitlines())


def test_client_request_id_reaches_both_servers_and_comes_back(served: Served):
    reply = ask(served, user(image_part(40, 40), text_part("Traced?")), "trace-4711")
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Request-Id"] == "trace-4711"
    assert reply.json()["id"] == "chatcmpl-trace-4711"
    for role in ("encode", "language"):
        wait_until(lambda role=role: logged(served, role, "request trace-4711 room"), 30,
                   f"the {role} server logs the request id")


def test_refused_request_is_logged_under_its_id(served: Served):
    broken = {"type": "image_url", "image_url": {"url": data_url(png_bytes(40, 40)[:60])}}
    reply = ask(served, user(broken, text_part("Broken?")), "trace-broken")
    assert reply.status_code == 400, reply.text
    assert reply.headers["X-Request-Id"] == "trace-broken"
    wait_until(lambda: logged(served, "encode", "request trace-broken room"), 30,
               "the encode server logs the refusal under the request id")


def test_unusable_or_missing_request_id_gets_a_fresh_one(served: Served):
    for given in ("has spaces in it", "x" * 129, None):
        reply = ask(served, user(text_part("Hello")), given)
        assert reply.status_code == 200, reply.text
        made = reply.headers["X-Request-Id"]
        assert made != given and len(made) == 32
        assert reply.json()["id"] == f"chatcmpl-{made}"
