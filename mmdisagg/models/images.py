"""Fetch and decode the images of ``image_url`` parts, refusing what a server should not take.

Every refusal is an ``InputError`` whose message a client can act on; nothing here hangs
longer than the fetch timeout or decodes an image before its size has been checked.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from mmdisagg.config import ImageSettings
from mmdisagg.models.errors import InputError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
TOO_LARGE = 413


def load_image(url: str, settings: ImageSettings) -> Image.Image:
    """The image at ``url``, fetched, checked and decoded to RGB."""
    return decode_image(fetch_image_bytes(url, settings), settings)


def fetch_image_bytes(url: str, settings: ImageSettings) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in settings.allowed_url_schemes:
        what = f"scheme {scheme!r}" if scheme else f"{url[:32]!r} (no scheme)"
        raise InputError(f"image URL {what} is not accepted "
                         f"(this server takes: {', '.join(settings.allowed_url_schemes)})")
    if scheme == "data":
        return _read_data_url(url, settings)
    if scheme == "file":
        return _read_local_file(url, settings)
    return _download(url, settings)


def decode_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """Decode to RGB after checking format and size from the header alone."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InputError("image has too many pixels", TOO_LARGE) from None
    except Exception:  # NOTE: PIL raises many types on hostile input; all mean "not an image"
        raise InputError("data is not an image this server can read "
                         f"({', '.join(SUPPORTED_FORMATS)})") from None
    if image.format not in SUPPORTED_FORMATS:
        raise InputError(f"unsupported image format {image.format} "
                         f"(use {', '.join(SUPPORTED_FORMATS)})")
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"image is empty ({width}x{height} pixels)")
    if width * height > settings.max_image_pixels:
        raise InputError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{settings.max_image_pixels}", TOO_LARGE)
    try:
        image.load()
        return image.convert("RGB")
    except Exception:  # NOTE: truncated or corrupt data surfaces as OSError, SyntaxError, ...
        raise InputError(f"{image.format} image data is truncated or corrupt") from None


def _read_data_url(url: str, settings: ImageSettings) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InputError("data: image URLs must be base64 (data:image/png;base64,...)")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise InputError(_too_many_bytes(settings), TOO_LARGE)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data: image URL is not valid base64") from None


def _read_local_file(url: str, settings: ImageSettings) -> bytes:
    if not settings.allowed_local_media_dirs:
        raise InputError("file:// image URLs are disabled on this server")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InputError("file:// image URLs must name a local path (file:///path)")
    path = Path(unquote(parsed.path)).resolve()
    if not any(path.is_relative_to(Path(folder).resolve())
               for folder in settings.allowed_local_media_dirs):
        raise InputError("file:// image path is outside the folders this server may read")
    if not path.is_file():  # NOTE: also refuses FIFOs and devices, which could block forever
        raise InputError("file:// image path is not a readable file")
    with path.open("rb") as file:
        data = file.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise InputError(_too_many_bytes(settings), TOO_LARGE)
    return data


def _download(url: str, settings: ImageSettings) -> bytes:
    timeout = settings.image_fetch_timeout
    deadline = time.monotonic() + timeout
    hooks = {"request": [_public_host], "response": [_public_peer]} \
        if settings.deny_private_image_urls else {}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, event_hooks=hooks) as client, \
                client.stream("GET", url) as response:
            if response.status_code != httpx.codes.OK:
                raise InputError(f"fetching the image failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > settings.max_image_bytes:
                raise InputError(_too_many_bytes(settings), TOO_LARGE)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > settings.max_image_bytes:
                    raise InputError(_too_many_bytes(settings), TOO_LARGE)
                if time.monotonic() > deadline:
                    raise InputError(_too_slow(timeout))
            return bytes(data)
    except httpx.TimeoutException:
        raise InputError(_too_slow(timeout)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise InputError(f"could not fetch the image ({type(exc).__name__})") from None


def _public_host(request: httpx.Request) -> None:
    """Before each request (a redirect too): every address the host resolves to is public."""
    host = request.url.host
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, request.url.port or 80,
                                                               type=socket.SOCK_STREAM)}
    except OSError:
        raise InputError("could not fetch the image (its host does not resolve)") from None
    if not all(_is_public(address) for address in addresses):
        raise InputError(f"image URL host {host!r} is not a public address; this server does "
                         "not fetch from private networks")


def _public_peer(response: httpx.Response) -> None:
    """After connecting: the address actually reached is public (the host may resolve
    differently the second time: DNS rebinding)."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer is None or not _is_public(peer[0]):
        raise InputError(f"image URL host {response.request.url.host!r} is not a public "
                         "address; this server does not fetch from private networks")


def _is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


def _too_slow(timeout: float) -> str:
    return f"fetching the image took longer than {timeout:g} s"


def _too_many_bytes(settings: ImageSettings) -> str:
    return f"image is larger than {settings.max_image_bytes} bytes"
