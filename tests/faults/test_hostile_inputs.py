"""Hostile requests through the router of a real ``mmdisagg serve``: each gets a 4xx with a
message a client can act on, within a bounded time, and the servers stay healthy (every pool
free, a normal request answered afterwards). docs/reliability.md shows this table."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from mmdisagg.serve.launcher import free_port
from tests.faults.conftest import MAX_FRAME_PIXELS, MAX_REQUEST_BYTES, MAX_VIDEO_SECONDS
from tests.faults.harness import wait_until
from tests.faults.served import API_KEY, Served
from tests.models.fixtures import data_url, png_bytes, text_part, user, video_bytes
from tests.servers.cluster import metrics

MAX_MODEL_LEN = 4096  # the tiny checkpoint's
FETCH_TIMEOUT_S = 2
ANSWER_WITHIN_S = 30  # every refusal, slow URLs included (fetch timeout: 2 s)
PNG = png_bytes(48, 32, seed=3)


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def with_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG claiming another size in its header (checksum fixed)."""
    header = bytearray(png[16:29])
    header[0:8] = struct.pack(">II", width, height)
    return png[:16] + bytes(header) + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def jpeg(png: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = jpeg(PNG)
MP4 = video_bytes(8, 64, 48)
WEBM = video_bytes(8, 64, 48, container="webm")
HEADER_ONLY_WEBM = WEBM[:WEBM.index(bytes.fromhex("1f43b675"))]  # cut before its first Cluster


def video_url(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


class Misbehaving(BaseHTTPRequestHandler):
    """Image URLs that misbehave: too slow, without end."""

    def do_GET(self) -> None:
        with contextlib.suppress(OSError):  # the encode server hung up on us, as it should
            self.send_response(200)
            self.end_headers()
            if self.path == "/slow.png":
                time.sleep(FETCH_TIMEOUT_S * 3)
                self.wfile.write(PNG)
            elif self.path == "/endless.png":  # no Content-Length, bytes without end
                while True:
                    self.wfile.write(b"\0" * 65536)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@dataclass
class Case:
    what: str
    body: Callable[[dict], bytes | dict]  # given the paths of the test, the request body
    status: int
    words: str


def chat(*parts: dict, **fields) -> dict:
    return {"model": "tiny-model", "messages": user(*parts), "max_tokens": 4, **fields}


def raw(text: str) -> Callable[[dict], bytes]:
    return lambda paths: text.encode()


CASES = [
    Case("malformed JSON", raw('{"model": "tiny-model", "messages": ['), 400,
         "not valid JSON"),
    Case("not UTF-8", lambda paths: b'\xff\xfe{"model": 1}', 400, "not valid JSON"),
    Case("JSON nested 100,000 deep", raw("[" * 100_000 + "]" * 100_000), 400,
         "nested too deeply"),
    Case("a JSON array, not an object", raw("[1, 2]"), 400, "must be a JSON object"),
    Case("wrong type: messages a string", lambda paths: {"model": "tiny-model",
                                                         "messages": "hi"}, 400, "messages"),
    Case("wrong type: max_tokens a word", lambda paths: chat(text_part("hi"),
                                                             max_tokens="lots"),
         400, "max_tokens"),
    Case("wrong type: temperature a list", lambda paths: chat(text_part("hi"),
                                                              temperature=[1]),
         400, "temperature"),
    Case("wrong type: stop a number", lambda paths: chat(text_part("hi"), stop=5), 400, "stop"),
    Case("wrong type: a content part a number", lambda paths: {
        "model": "tiny-model", "messages": [{"role": "user", "content": [5]}]}, 400,
         "unsupported content part"),
    Case("unknown role", lambda paths: {"model": "tiny-model", "messages": [
        {"role": "wizard", "content": "hi"}]}, 400, "'role' must be one of"),
    Case("unknown field", lambda paths: chat(text_part("hi"), best_of=2), 400,
         "best_of: unknown field"),
    Case("unknown model", lambda paths: {**chat(text_part("hi")), "model": "gpt-9"}, 404,
         "does not exist"),
    Case("body over --max-request-bytes", lambda paths: b" " * (MAX_REQUEST_BYTES + 1), 413,
         "exceeds"),
    Case("10 MB of text", lambda paths: chat(text_part("cat " * 2_500_000)), 400,
         "text is 10000000 bytes"),
    Case("1,000 images", lambda paths: chat(*[image_url(data_url(PNG))] * 1000), 400,
         "1000 images in one request; the limit is 8"),
    Case("0x0 image", lambda paths: chat(image_url(data_url(with_size(PNG, 0, 0)))), 400,
         "image 1: data is not an image"),
    Case("decompression bomb (100000x100000 PNG header)",
         lambda paths: chat(image_url(data_url(with_size(PNG, 100_000, 100_000)))), 413,
         "too many pixels"),
    Case("non-image bytes", lambda paths: chat(image_url(data_url(b"MZ\x90\0 not a picture"))),
         400, "data is not an image"),
    Case("truncated PNG", lambda paths: chat(image_url(data_url(PNG[: len(PNG) // 2]))), 400,
         "PNG image data is truncated or corrupt"),
    Case("truncated JPEG", lambda paths: chat(image_url(data_url(JPEG[: len(JPEG) // 2],
                                                                  "image/jpeg"))),
         400, "JPEG image data is truncated or corrupt"),
    Case("bad base64", lambda paths: chat(image_url("data:image/png;base64,iVBOR%%%%")), 400,
         "not valid base64"),
    Case("unsupported URL scheme", lambda paths: chat(image_url("gopher://example.com/a.png")),
         400, "scheme 'gopher' is not accepted"),
    Case("unreachable http URL", lambda paths: chat(image_url(paths["unreachable"])), 400,
         "could not fetch the image"),
    Case("slow http URL", lambda paths: chat(image_url(paths["web"] + "/slow.png")), 400,
         f"took longer than {FETCH_TIMEOUT_S} s"),
    Case("endless http URL", lambda paths: chat(image_url(paths["web"] + "/endless.png")), 413,
         "image is larger than"),
    Case("file:// outside the allowed folder", lambda paths: chat(image_url(
        "file:///etc/passwd")), 400, "outside the folders this server may read"),
    Case("file:// escaping the allowed folder with ..", lambda paths: chat(image_url(
        f"file://{paths['media']}/../../../etc/passwd")), 400, "outside the folders"),
    Case("negative max_tokens", lambda paths: chat(text_part("hi"), max_tokens=-1), 400,
         "max_tokens: Input should be greater than or equal to 1"),
    Case("max_tokens beyond the model", lambda paths: chat(text_part("hi"),
                                                           max_tokens=10**12),
         400, f"takes fewer than {MAX_MODEL_LEN} tokens"),
    Case("max_tokens equal to max_model_len", lambda paths: chat(text_part("hi"),
                                                                 max_tokens=MAX_MODEL_LEN),
         400, "max_tokens: 4096 is too large"),
    Case("NaN temperature", raw('{"model": "tiny-model", "messages": [{"role": "user", '
                                '"content": "hi"}], "temperature": NaN}'), 400,
         "temperature: Input should be a finite number"),
    Case("infinite top_p", raw('{"model": "tiny-model", "messages": [{"role": "user", '
                               '"content": "hi"}], "top_p": Infinity}'), 400,
         "top_p: Input should be a finite number"),
    Case("17 stop sequences", lambda paths: chat(text_part("hi"),
                                                 stop=[f"s{i}" for i in range(17)]),
         400, "at most 16 stop sequences"),
    Case("a stop sequence of 10,000 characters", lambda paths: chat(text_part("hi"),
                                                                    stop=["x" * 10_000]),
         400, "stop sequences must be 1 to 256 characters"),
    Case("n = 2", lambda paths: chat(text_part("hi"), n=2), 400, "n: Input should be 1"),
    Case("not a video", lambda paths: chat(video_url(data_url(b"MZ\x90\0 not a film",
                                                              "video/mp4"))),
         400, "video 1: data is not a video this server can read"),
    Case("truncated video", lambda paths: chat(video_url(data_url(MP4[: len(MP4) // 2],
                                                                  "video/mp4"))),
         400, "video data is truncated or corrupt"),
    Case("video with zero frames (header only)", lambda paths: chat(video_url(data_url(
        HEADER_ONLY_WEBM, "video/webm"))), 400, "data is not a video"),
    Case("video of one frame", lambda paths: chat(video_url(data_url(
        video_bytes(1, 64, 48), "video/mp4"))), 400, "has 1 frame(s); at least 2 are needed"),
    Case("video longer than --max-video-seconds", lambda paths: chat(video_url(data_url(
        video_bytes(8, 64, 48, fps=1), "video/mp4"))), 413,
         f"8.0 s long; the limit is {MAX_VIDEO_SECONDS} s"),
    Case("video of enormous resolution", lambda paths: chat(video_url(data_url(
        video_bytes(2, 1280, 1024), "video/mp4"))), 413,
         f"1280x1024 = 1310720 pixels; the limit is {MAX_FRAME_PIXELS}"),
    Case("video with an image MIME type", lambda paths: chat(video_url(data_url(
        MP4, "image/png"))), 400, "send images as image_url parts"),
    Case("image with a video MIME type", lambda paths: chat(image_url(data_url(
        PNG, "video/mp4"))), 400, "send videos as video_url parts"),
    Case("an image sent as a video", lambda paths: chat(video_url(data_url(
        PNG, "application/octet-stream"))), 400, "not a video this server can read"),
    Case("3 videos", lambda paths: chat(*[video_url(data_url(MP4, "video/mp4"))] * 3), 400,
         "3 videos in one request; the limit is 2"),
]


def send(served: Served, body: bytes | dict) -> httpx.Response:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{served.url}/v1/chat/completions", content=payload,
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": "application/json"}, timeout=ANSWER_WITHIN_S)


@pytest.fixture(scope="module")
def paths(web, media_dir) -> dict[str, str]:
    return {"web": web, "media": str(media_dir),
            "unreachable": f"http://127.0.0.1:{free_port('127.0.0.1')}/x.png"}


@pytest.mark.parametrize("case", CASES, ids=[case.what for case in CASES])
def test_hostile_request_gets_a_readable_4xx(served: Served, paths, case: Case) -> None:
    started = time.monotonic()
    reply = send(served, case.body(paths))
    error = reply.json()["error"]
    assert (reply.status_code, case.words in error["message"]) == (case.status, True), error
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert time.monotonic() - started < ANSWER_WITHIN_S
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_official_client_sees_the_message(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="data is not an image"):
        client.chat.completions.create(model="tiny-model", messages=user(
            image_url(data_url(b"not a png"))))


def test_servers_healthy_and_clean_after_the_corpus(served: Served, media_dir) -> None:
    servers = served.servers()
    assert sorted(servers) == ["encode-0", "language-0", "router"]

    def pools_free() -> bool:
        return all(metrics(url)['mmdisagg_pool_blocks{state="used"}'] == 0
                   for name, url in servers.items() if name != "router")

    wait_until(pools_free, 30, "every pool free")
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny-model", max_tokens=4, messages=user(
        image_url(f"file://{media_dir}/ok.png"), video_url(f"file://{media_dir}/ok.mp4"),
        text_part("fine?")))
    assert reply.choices[0].finish_reason in ("length", "stop")


def test_reliability_doc_lists_every_case() -> None:
    """docs/reliability.md's table of hostile inputs is this corpus, row for row."""
    doc = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    for case in CASES:
        assert case.what in rows, f"docs/reliability.md lacks the hostile input {case.what!r}"
        assert f"| {case.status} |" in rows[case.what], (case.what, rows[case.what])
