"""Encode server, language server and router each on a host of its own (network namespaces
on a private bridge), talking only over those links: exact greedy answers over the tcp and
mooncake data planes, and the shm plane refused because the peers are not on one host."""

from __future__ import annotations

import json
import sys

import pytest
from netns import Hosts, why_unavailable

from tests.models.fixtures import generate_greedy, image_part, text_part, user
from tests.transfer.backends import requires_mooncake

pytestmark = pytest.mark.skipif(why_unavailable() is not None,
                                reason=str(why_unavailable()))

TOKEN = "multi-host-secret"
MESSAGES = user(image_part(84, 56, seed=4), text_part("What is this?"))
MAX_TOKENS = 12


def start_cluster(hosts: Hosts, model: str, backend: str) -> str:
    common = ["--model-path", model, "--served-model-name", "tiny-model", "--torch-threads", "1",
              "--auth-token", TOKEN, "--transfer-backend", backend, "--heartbeat-timeout", "3"]
    enc, lang, router = (hosts.addresses[h] for h in ("encode", "language", "router"))
    cli = [sys.executable, "-m", "mmdisagg.cli"]
    hosts.start("encode", *cli, "encode", "--host", enc, "--port", "8001",
                "--bootstrap-port", "8998", *common)
    hosts.start("language", *cli, "language", "--host", lang, "--port", "8002", *common)
    hosts.wait_healthy("encode", f"http://{enc}:8001")
    hosts.wait_healthy("language", f"http://{lang}:8002")
    hosts.start("router", *cli, "router", "--host", router, "--port", "8000", "--encode",
                f"http://{enc}:8001", "--language", f"http://{lang}:8002", "--auth-token", TOKEN)
    hosts.wait_healthy("router", f"http://{router}:8000")
    return f"http://{router}:8000/v1"


CLIENT = """
import json, openai
client = openai.OpenAI(base_url={url!r}, api_key="none", max_retries=0, timeout=120)
try:
    reply = client.chat.completions.create(model="tiny-model", messages={messages!r},
        max_tokens={max_tokens}, temperature=0, extra_body={{"return_token_ids": True}})
    print(json.dumps({{"tokens": reply.choices[0].token_ids}}))
except openai.APIStatusError as exc:
    print(json.dumps({{"status": exc.status_code, "message": exc.message}}))
"""


def ask(hosts: Hosts, url: str) -> dict:
    """From the router's host: the client reaches nothing but the router."""
    return hosts.python("router", CLIENT.format(url=url, messages=MESSAGES,
                                                max_tokens=MAX_TOKENS))


@pytest.fixture
def hosts():
    hosts = Hosts(["encode", "language", "router"])
    yield hosts
    hosts.close()


@pytest.mark.parametrize("backend", ["tcp", pytest.param("mooncake", marks=requires_mooncake)])
def test_exact_answers_across_hosts(hosts, tiny_checkpoints, tiny_models, backend):
    url = start_cluster(hosts, str(tiny_checkpoints["qwen2_vl"]), backend)
    expected = generate_greedy(tiny_models["qwen2_vl"], MESSAGES, MAX_TOKENS)
    for _ in range(2):
        assert ask(hosts, url) == {"tokens": expected.tokens}


def test_shared_memory_is_refused_between_hosts(hosts, tiny_checkpoints):
    url = start_cluster(hosts, str(tiny_checkpoints["qwen2_vl"]), "shm")
    answer = ask(hosts, url)
    assert answer["status"] == 503, json.dumps(answer)
    assert "needs both servers on one host" in answer["message"]
