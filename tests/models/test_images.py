"""Every kind of bad image is one typed error with a message a client can read; nothing hangs."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from mmdisagg.config import ImageSettings
from mmdisagg.models.base import EncoderHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.images import decode_image, fetch_image
from tests.models.fixtures import TinyModel, data_url, png_bytes, text_part, user

PNG = png_bytes(64, 48, seed=7)


def load_image(url: str, settings: ImageSettings) -> Image.Image:
    """What the encoder half does with an image URL: fetch, check, decode."""
    return decode_image(fetch_image(url, settings), settings)


def with_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its header claiming another size (and a valid header checksum)."""
    header = bytearray(png[16:29])
    header[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(header)))
    return png[:16] + bytes(header) + crc + png[33:]


def encoded(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


SLOW_S = 20.0  # how long the slow images take: far beyond the 0.5 s limit, even under load


class ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        with contextlib.suppress(OSError):  # the client gave up on a slow reply, as it should
            self._serve()

    def _serve(self) -> None:
        if self.path == "/image.png":
            self._reply(PNG)
        elif self.path == "/slow.png":
            time.sleep(SLOW_S)
            self._reply(PNG)
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            for _ in range(int(SLOW_S / 0.1)):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/huge.png":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
        else:
            self.send_error(404)

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("media")
    (folder / "ok.png").write_bytes(PNG)
    return folder


FAST = ImageSettings(image_fetch_timeout=0.5, max_image_bytes=100_000, max_image_pixels=500_000)


def refused(url: str, settings: ImageSettings = FAST) -> InputError:
    with pytest.raises(InputError) as caught:
        load_image(url, settings)
    assert caught.value.message == str(caught.value)
    return caught.value


@pytest.mark.parametrize("url, status, message", [
    (data_url(b"hello, this is text"), 400, "not an image"),
    (data_url(PNG[:len(PNG) // 2]), 400, "truncated or corrupt"),
    (data_url(encoded(Image.new("RGB", (32, 32)), "TIFF")), 400, "unsupported image format TIFF"),
    (data_url(with_size(PNG, 0, 0)), 400, "not an image"),
    (data_url(encoded(Image.new("RGB", (800, 700)), "PNG")), 413, "800x700 = 560000 pixels"),
    (data_url(with_size(PNG, 100_000, 100_000)), 413, "pixels"),  # a decompression bomb
    ("data:image/png;base64,@@not base64@@", 400, "not valid base64"),
    ("data:image/png," + "x" * 10, 400, "must be base64"),
    ("data:image/png;base64," + "A" * 200_000, 413, "larger than 100000 bytes"),
    ("ftp://example.com/cat.png", 400, "scheme 'ftp' is not accepted"),
    ("just a string", 400, "'just a string' (no scheme) is not accepted"),
])
def test_bad_image_data(url: str, status: int, message: str) -> None:
    error = refused(url)
    assert error.status == status
    assert message in error.message


def test_fetch_over_http(http_base: str) -> None:
    patient = replace(FAST, image_fetch_timeout=30)  # under load a local fetch may take > 0.5 s
    assert load_image(f"{http_base}/image.png", patient).size == (64, 48)


@pytest.mark.parametrize("path, status, message", [
    ("/missing.png", 400, "HTTP 404"),
    ("/huge.png", 413, "larger than"),
    ("/slow.png", 400, "longer than 0.5 s"),
    ("/trickle.png", 400, "longer than 0.5 s"),
])
def test_bad_http_images_fail_fast(http_base: str, path: str, status: int, message: str) -> None:
    started = time.monotonic()
    error = refused(http_base + path)
    assert (error.status, message in error.message) == (status, True), error.message
    assert time.monotonic() - started < SLOW_S / 2  # gave up, did not wait for the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_host() -> None:
    assert "could not fetch" in refused(f"http://127.0.0.1:{free_port()}/image.png").message


PUBLIC = replace(FAST, deny_private_image_urls=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_private_hosts_refused_when_asked(http_base: str, host: str) -> None:
    url = http_base.replace("127.0.0.1", host) + "/image.png"
    assert load_image(url, FAST).size == (64, 48)  # the default: local development
    assert "not a public address" in refused(url, PUBLIC).message


def test_private_peer_refused_though_the_host_first_resolved_public(
        http_base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the check's lookup says public, the connection's lands on loopback."""
    real = socket.getaddrinfo
    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80))]])

    def rebinding(host, *args, **kwargs):
        if host == "images.example":
            return next(answers, None) or real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = http_base.replace("127.0.0.1", "images.example") + "/image.png"
    assert "not a public address" in refused(url, PUBLIC).message


def test_local_files_only_inside_allowed_folders(media_dir: Path, tmp_path: Path) -> None:
    allowed = replace(FAST, allowed_local_media_dirs=(str(media_dir),))
    assert load_image(f"file://{media_dir}/ok.png", allowed).size == (64, 48)
    assert "disabled" in refused(f"file://{media_dir}/ok.png").message
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    assert "outside" in refused(f"file://{outside}", allowed).message
    (media_dir / "link.png").symlink_to(outside)
    assert "outside" in refused(f"file://{media_dir}/link.png", allowed).message
    assert "outside" in refused(f"file://{media_dir}/../{outside.name}", allowed).message
    assert "not a readable file" in refused(f"file://{media_dir}/absent.png", allowed).message
    os.mkfifo(media_dir / "pipe.png")
    assert "not a readable file" in refused(f"file://{media_dir}/pipe.png", allowed).message


def test_prepare_names_the_bad_image(tiny: TinyModel) -> None:
    messages = user(text_part("two pictures"), {"type": "image_url", "image_url": {
        "url": data_url(PNG)}}, {"type": "image_url", "image_url": {"url": data_url(b"junk")}})
    with pytest.raises(InputError, match=r"^image 2: data is not an image"):
        tiny.encoder.prepare(messages)


def test_too_many_images(tiny: TinyModel) -> None:
    encoder = EncoderHalf.from_pretrained(tiny.path, image_settings=ImageSettings(
        max_images_per_request=2))
    image = {"type": "image_url", "image_url": {"url": data_url(PNG)}}
    encoder.prepare(user(image, image))
    with pytest.raises(InputError, match="3 images in one request; the limit is 2"):
        encoder.prepare(user(image, image, image))


def test_extreme_aspect_ratio(tiny: TinyModel) -> None:
    sliver = data_url(encoded(Image.new("RGB", (600, 2)), "PNG"))
    with pytest.raises(InputError, match=r"^image 1: .*aspect ratio"):
        tiny.encoder.prepare(user({"type": "image_url", "image_url": {"url": sliver}}))
