"""Fetch the bytes of ``image_url`` and ``video_url`` parts and decode images, refusing what a
server should not take.

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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
from PIL import Image

from mmdisagg.config import ImageSettings
from mmdisagg.models.errors import InputError

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
TOO_LARGE = 413


def fetch_image(url: str, settings: ImageSettings) -> bytes:
    """The encoded bytes of the image at ``url``, within the size limit."""
    return fetch_media(url, settings, Media("image", settings.max_image_bytes))


@dataclass(frozen=True)
class Media:
    """What a URL is expected to hold: ``kind`` ("image" or "video", also the word refusals
    use) and the most bytes accepted."""

    kind: str
    max_bytes: int


def fetch_media(url: str, settings: ImageSettings, media: Media) -> bytes:
    """The bytes at ``url`` (data:, file:// or http(s)), within the limits of ``settings``."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in settings.allowed_url_schemes:
        what = f"scheme {scheme!r}" if scheme else f"{url[:32]!r} (no scheme)"
        raise InputError(f"{media.kind} URL {what} is not accepted "
                         f"(this server takes: {', '.join(settings.allowed_url_schemes)})")
    if scheme == "data":
        return _read_data_url(url, media)
    if scheme == "file":
        return _read_local_file(url, settings, media)
    return _download(url, settings, media)


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


# NOTE: the other kind's MIME type in a data: URL is a client mix-up worth naming; anything
# else (application/octet-stream, a missing type) is left to the decoder to judge.
OTHER_KIND = {"image": "video/", "video": "image/"}


def _read_data_url(url: str, media: Media) -> bytes:
    header, comma, payload = url.partition(",")
    example = "data:image/png;base64,..." if media.kind == "image" else "data:video/mp4;base64,..."
    if not comma or not header.lower().endswith(";base64"):
        raise InputError(f"data: {media.kind} URLs must be base64 ({example})")
    mime = header[len("data:"):-len(";base64")].strip().lower()
    if mime.startswith(OTHER_KIND[media.kind]):
        raise InputError(f"a {media.kind}_url part holds a data: URL of type {mime}; send "
                         f"{OTHER_KIND[media.kind].rstrip('/')}s as "
                         f"{OTHER_KIND[media.kind].rstrip('/')}_url parts")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > media.max_bytes:
        raise InputError(_too_many_bytes(media), TOO_LARGE)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"data: {media.kind} URL is not valid base64") from None


def _read_local_file(url: str, settings: ImageSettings, media: Media) -> bytes:
    if not settings.allowed_local_media_dirs:
        raise InputError(f"file:// {media.kind} URLs are disabled on this server")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InputError(f"file:// {media.kind} URLs must name a local path (file:///path)")
    path = Path(unquote(parsed.path)).resolve()
    if not any(path.is_relative_to(Path(folder).resolve())
               for folder in settings.allowed_local_media_dirs):
        raise InputError(f"file:// {media.kind} path is outside the folders this server may "
                         "read")
    if not path.is_file():  # NOTE: also refuses FIFOs and devices, which could block forever
        raise InputError(f"file:// {media.kind} path is not a readable file")
    with path.open("rb") as file:
        data = file.read(media.max_bytes + 1)
    if len(data) > media.max_bytes:
        raise InputError(_too_many_bytes(media), TOO_LARGE)
    return data


def _download(url: str, settings: ImageSettings, media: Media) -> bytes:
    timeout = settings.image_fetch_timeout
    deadline = time.monotonic() + timeout
    hooks = {"request": [_public_host], "response": [_public_peer]} \
        if settings.deny_private_image_urls else {}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True, event_hooks=hooks) as client, \
                client.stream("GET", url) as response:
            if response.status_code != httpx.codes.OK:
                raise InputError(f"fetching the {media.kind} failed: HTTP "
                                 f"{response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > media.max_bytes:
                raise InputError(_too_many_bytes(media), TOO_LARGE)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > media.max_bytes:
                    raise InputError(_too_many_bytes(media), TOO_LARGE)
                if time.monotonic() > deadline:
                    raise InputError(_too_slow(media, timeout))
            return bytes(data)
    except httpx.TimeoutException:
        raise InputError(_too_slow(media, timeout)) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise InputError(f"could not fetch the {media.kind} ({type(exc).__name__})") from None


def _public_host(request: httpx.Request) -> None:
    """Before each request (a redirect too): every address the host resolves to is public."""
    host = request.url.host
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, request.url.port or 80,
                                                               type=socket.SOCK_STREAM)}
    except OSError:
        raise InputError("could not fetch the URL (its host does not resolve)") from None
    if not all(_is_public(address) for address in addresses):
        raise InputError(f"URL host {host!r} is not a public address; this server does "
                         "not fetch from private networks")


def _public_peer(response: httpx.Response) -> None:
    """After connecting: the address actually reached is public (the host may resolve
    differently the second time: DNS rebinding)."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer is None or not _is_public(peer[0]):
        raise InputError(f"URL host {response.request.url.host!r} is not a public "
                         "address; this server does not fetch from private networks")


def _is_public(address: str) -> bool:
    return ipaddress.ip_address(address.split("%", 1)[0]).is_global


def _too_slow(media: Media, timeout: float) -> str:
    return f"fetching the {media.kind} took longer than {timeout:g} s"


def _too_many_bytes(media: Media) -> str:
    return f"{media.kind} is larger than {media.max_bytes} bytes"
