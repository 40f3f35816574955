"""An encode server holds at most --max-queued-encodes requests: one more gets a readable 503,
directly and through the router, and nothing is left behind."""

from __future__ import annotations

import threading

import httpx
import msgspec
import openai
import pytest
from cluster import TOKEN, Cluster, metrics, wait_pools_free

from mmdisagg.messages import AbortRequest, EncodeRequest
from tests.faults.harness import wait_until
from tests.models.fixtures import image_part, text_part, user

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def held(url: str) -> float:
    samples = metrics(url)
    return sum(samples.get(f'mmdisagg_queue_length{{queue="{q}"}}', 0)
               for q in ("waiting", "admitted", "encoding", "sending"))


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], torch_threads=1, max_queued_encodes=1)
    yield cluster
    cluster.close()


def test_a_full_encode_queue_answers_503(cluster):
    encoder = cluster.child("encode-0").url
    messages = user(image_part(56, 56), text_part("Nobody receives this"))
    # A room no language server ever asks for: it waits in the encoder for its first window.
    stuck: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: stuck.setdefault("reply", httpx.post(
        f"{encoder}/encode", headers=HEADERS, timeout=120,
        content=msgspec.json.encode(EncodeRequest(1001, messages, "held-one")))))
    first.start()
    try:
        wait_until(lambda: held(encoder) == 1, 60, "the first request waits in the encoder")
        one_more = EncodeRequest(1002, messages, "one-too-many")
        refused = httpx.post(f"{encoder}/encode", headers=HEADERS, timeout=30,
                             content=msgspec.json.encode(one_more))
        assert refused.status_code == 503, refused.text
        assert "--max-queued-encodes 1" in refused.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as through_router:
            cluster.client().chat.completions.create(model="tiny-model", messages=messages,
                                                     max_tokens=2)
        assert through_router.value.status_code == 503
        assert "encode server busy" in through_router.value.message
    finally:
        httpx.post(f"{encoder}/abort", headers=HEADERS, timeout=30,
                   content=msgspec.json.encode(AbortRequest(1001)))
        first.join(timeout=60)
    assert stuck["reply"].status_code == 499, stuck["reply"].text
    samples = metrics(encoder)
    assert samples['mmdisagg_requests_total{outcome="overloaded",role="encode"}'] == 2
    assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    reply = cluster.client().chat.completions.create(model="tiny-model", messages=messages,
                                                     max_tokens=2)
    assert reply.choices[0].finish_reason == "length"
