"""The OpenAI API end to end, through router, encode server, shm transfer and language server:
greedy answers equal the unsplit model's generate(); bad input gets the right status."""

from __future__ import annotations

import httpx
import openai
import psutil
import pytest
from cluster import Cluster, metrics, wait_pools_free

from tests.models.fixtures import (
    FAMILIES,
    data_url,
    generate_greedy,
    generate_on,
    image_part,
    png_bytes,
    text_part,
    transformers_inputs,
    user,
    video_part,
)

MAX_TOKENS = 16
CASES = {
    "image": user(image_part(56, 56, seed=1), text_part("Describe the picture.")),
    "text_only": user(text_part("Tell me a story about a cat and a boat.")),
    "two_images_in_the_middle": user(text_part("Compare"), image_part(56, 84, seed=2),
                                     text_part("with"), image_part(84, 56, seed=3),
                                     text_part("please.")),
}


@pytest.fixture(scope="module", params=FAMILIES)
def cluster(request, tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints[request.param], api_key="sesame", torch_threads=1)
    cluster.family = request.param
    yield cluster
    cluster.close()


def complete(client, messages, stream: bool, **kwargs) -> tuple[list[int], str, object]:
    """(token ids, text, usage) of one greedy request."""
    extra = {"return_token_ids": True}
    if not stream:
        reply = client.chat.completions.create(
            model="tiny-model", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            extra_body=extra, **kwargs)
        return reply.choices[0].token_ids, reply.choices[0].message.content, reply.usage
    tokens, text, usage = [], "", None
    for chunk in client.chat.completions.create(
            model="tiny-model", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=extra, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            tokens += (choice.model_extra or {}).get("token_ids") or []
            text += choice.delta.content or ""
    return tokens, text, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_answer_equals_unsplit_generate(cluster, tiny_models, case, stream):
    client = cluster.client()
    messages = CASES[case]
    expected = generate_greedy(tiny_models[cluster.family], messages, MAX_TOKENS)
    tokens, text, usage = complete(client, messages, stream)
    assert tokens == expected.tokens
    tokenizer = tiny_models[cluster.family].language.tokenizer
    assert text == tokenizer.decode(expected.tokens, skip_special_tokens=True)
    assert usage.completion_tokens == len(tokens) and usage.prompt_tokens > 10


VIDEO_CASES = {
    "video and image": user(text_part("Compare"), video_part(8, 64, 48, fps=4, seed=7),
                            text_part("with"), image_part(56, 56, seed=8), text_part("now.")),
}


@pytest.fixture(scope="module")
def video_references(tiny_checkpoints, tmp_path_factory):
    return transformers_inputs(tiny_checkpoints, {name: (messages, 64) for name, messages
                                                  in VIDEO_CASES.items()},
                               tmp_path_factory.mktemp("video-reference"))


@pytest.mark.timeout(900)  # the first run creates the peer venv
@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_video_answer_equals_generate_fed_by_transformers_processor(
        cluster, tiny_models, video_references, case):
    expected = generate_on(tiny_models[cluster.family], video_references[cluster.family, case],
                           MAX_TOKENS)
    for stream in (False, True):
        assert complete(cluster.client(), VIDEO_CASES[case], stream)[0] == expected


def test_models_health_and_metrics(cluster):
    assert [m.id for m in cluster.client().models.list()] == ["tiny-model"]
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    served = metrics(cluster.url)
    assert served['mmdisagg_requests_total{outcome="ok",role="router"}'] >= 1
    for server in cluster.servers:
        samples = metrics(server.url)
        assert 'mmdisagg_pool_blocks{state="free"}' in samples
        assert "mmdisagg_transfer_bytes_total" in samples
    language = metrics(cluster.child("language-0").url)
    total = language["mmdisagg_kv_blocks_total"]
    assert total > 0 and language['mmdisagg_kv_blocks{state="used"}'] == 0
    assert language['mmdisagg_kv_blocks{state="free"}'] + language[
        'mmdisagg_kv_blocks{state="cached"}'] == total  # cached: prefix-cache blocks, unused
    info = httpx.get(f"{cluster.child('language-0').url}/info").json()
    assert info["kv_blocks"] == total and info["kv_block_size"] == 16


def test_repeated_image_hits_the_cache_and_answers_the_same(cluster, tiny_models):
    client = cluster.client()
    image = image_part(84, 84, seed=9)
    encoder = cluster.child("encode-0").url
    before = metrics(encoder)
    first = complete(client, user(image, text_part("What is it?")), stream=False)[0]
    # Other text before the image: the language server's prefix cache cannot hold it.
    again = [{"role": "system", "content": "Be brief."}, *user(image, text_part("What is it?"))]
    second = complete(client, again, stream=False)[0]
    after = metrics(encoder)
    assert second == generate_greedy(tiny_models[cluster.family], again, MAX_TOKENS).tokens
    assert first
    for hits in ('mmdisagg_image_cache_total{result="hit"}',  # no vision forward
                 'mmdisagg_prepared_image_cache_total{result="hit"}'):  # no decoding
        assert after[hits] == before.get(hits, 0) + 1, hits


def bad_requests(cluster):
    url = f"{cluster.url}/v1/chat/completions"
    auth = {"Authorization": "Bearer sesame"}
    yield "malformed JSON", httpx.post(url, content=b"{not json", headers=auth), 400, "JSON"
    yield "missing messages", httpx.post(url, json={"model": "tiny-model"}, headers=auth), 400, \
        "messages"
    client = cluster.client()

    def status_of(**kwargs):
        try:
            client.chat.completions.create(model=kwargs.pop("model", "tiny-model"), **kwargs)
        except openai.APIStatusError as exc:
            return exc
        raise AssertionError(f"no error for {kwargs}")

    yield "bad image data", status_of(messages=user(
        {"type": "image_url", "image_url": {"url": data_url(b"not a png at all")}})), 400, \
        "not an image"
    yield "unreachable image URL", status_of(messages=user(
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}})), 400, \
        "could not fetch"
    yield "too long for max_model_len", status_of(
        messages=user(text_part("cat " * 5000))), 400, "this model takes fewer than"
    yield "negative max_tokens", status_of(messages=user(text_part("hi")), max_tokens=-5), \
        400, "max_tokens"
    yield "unknown model", status_of(model="gpt-9", messages=user(text_part("hi"))), 404, \
        "does not exist"
    yield "unknown field", status_of(messages=user(text_part("hi")),
                                     extra_body={"best_of": 3}), 400, "best_of"
    yield "wrong API key", wrong_key_error(cluster, "guess"), 401, "API key"


def wrong_key_error(cluster, key):
    try:
        openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=key, max_retries=0).models.list()
    except openai.APIStatusError as exc:
        return exc
    raise AssertionError("no error for a wrong key")


def test_bad_requests_get_status_and_message_and_leave_the_servers_clean(cluster):
    if cluster.family != FAMILIES[0]:
        pytest.skip("family-independent")
    for what, reply, status, words in bad_requests(cluster):
        body = reply.json() if isinstance(reply, httpx.Response) else reply.body
        message = body["error"]["message"] if isinstance(reply, httpx.Response) else \
            reply.message
        assert reply.status_code == status, (what, body)
        assert words in message, (what, message)
    assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    assert complete(cluster.client(), user(text_part("still there?")), stream=False)[0]


def test_the_router_keeps_its_connection_to_the_language_server(cluster):
    """A finished stream is read to its end, so its connection goes back to the router's pool:
    8 requests, streamed and not, leave no closed connection to the language server behind
    (each would sit in TIME_WAIT for a minute; at a high request rate they exhaust ports)."""
    if cluster.family != FAMILIES[0]:
        pytest.skip("family-independent")
    port = int(cluster.child("language-0").url.rsplit(":", 1)[1])

    def closed() -> int:
        """Connections to or from its port that one side closed (in TIME_WAIT)."""
        return sum(1 for c in psutil.net_connections("tcp4") if c.status == psutil.CONN_TIME_WAIT
                   and port in (c.laddr.port, c.raddr.port if c.raddr else None))

    before = closed()
    for number in range(8):
        complete(cluster.client(), user(text_part(f"Count {number}")), stream=number % 2 == 0)
    assert closed() - before <= 1


def test_same_png_as_file_is_refused_by_default(cluster, tmp_path):
    if cluster.family != FAMILIES[0]:
        pytest.skip("family-independent")
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(32, 32))
    with pytest.raises(openai.BadRequestError, match="file://"):
        cluster.client().chat.completions.create(model="tiny-model", messages=user(
            {"type": "image_url", "image_url": {"url": f"file://{image}"}}))


def test_colocated_baseline_gives_the_same_answers(tiny_checkpoints, tiny_models):
    """``serve --colocated``: one process, both halves, no transfer; same API, same tokens."""
    import subprocess
    import sys
    import time

    from mmdisagg.serve.launcher import free_port
    port = free_port("127.0.0.1")
    process = subprocess.Popen([sys.executable, "-m", "mmdisagg.cli", "serve", "--colocated",
                                "--port", str(port), "--model-path",
                                str(tiny_checkpoints["qwen2_vl"]), "--served-model-name",
                                "tiny-model", "--torch-threads", "1"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0)
        for case in ("image", "text_only"):
            expected = generate_greedy(tiny_models["qwen2_vl"], CASES[case], MAX_TOKENS)
            for stream in (False, True):
                assert complete(client, CASES[case], stream)[0] == expected.tokens
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
