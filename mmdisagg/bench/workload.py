"""Synthetic chat requests: K generated images (and V videos) each and a text prompt, the same
for a seed.

Images are drawn locally with PIL (gradients, shapes, noise), each from its own seed, so no two
are identical and an encoder's image cache never hits — unless ``repeat_images`` asks for a
share of them to reuse an earlier image of the same size. A video is such drawings, one per
frame, encoded as mp4 with PyAV at 2 frames per second, the rate Qwen's video processors sample
at, so every frame reaches the model. The prompt asks for text that has no
natural end, for servers that do not take ``ignore_eos``.
"""

from __future__ import annotations

import base64
import io
import random
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

WORDS = ("red", "boat", "lake", "pine", "hill", "gull", "chart", "sales", "cat", "rain", "glass",
         "door", "map", "menu", "sign", "street", "number", "river", "cloud", "bridge", "tower",
         "light", "green", "window", "table", "garden", "train", "station", "morning", "blue")
STOP_FREE = "Describe everything you see in great detail and keep going without stopping."
JPEG_QUALITY = 90
WARMUP_SEED_OFFSET = 1_000_003  # far from the seeds runs use (seed, seed + 1, ...)
VIDEO_FPS = 2


def parse_size(text: str) -> tuple[int, int]:
    """``"448x448"`` -> (448, 448)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or not all(int(side) > 0 for side in match.groups()):
        raise ValueError(f"{text!r} is not an image size like 448x448")
    return int(match.group(1)), int(match.group(2))


def parse_range(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1-3"`` -> (1, 3)."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"{text!r} is not a count like 2 or a range like 1-3") from None
    if bounds[0] < 0 or bounds[1] < bounds[0]:
        raise ValueError(f"{text!r}: need 0 <= low <= high")
    return bounds


@dataclass(frozen=True)
class Workload:
    """What each request of a stream looks like."""

    num_requests: int = 64
    images: tuple[int, int] = (1, 1)  # images per request: fixed (k, k) or a range
    image_sizes: tuple[tuple[int, int], ...] = ((448, 448),)
    repeat_images: float = 0.0  # share of images that repeat an earlier one
    videos: tuple[int, int] = (0, 0)  # videos per request: fixed (k, k) or a range
    video_frames: int = 16
    video_size: tuple[int, int] = (448, 448)
    prompt_words: int = 32
    max_tokens: int = 32
    group: str = "main"  # a label for the requests of this stream in results
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError("the number of requests must be at least 1")
        if not 0.0 <= self.repeat_images <= 1.0:
            raise ValueError("--repeat-images is a share: 0 to 1")
        if self.max_tokens < 1 or self.prompt_words < 0:
            raise ValueError("need max_tokens >= 1 and prompt_words >= 0")
        if self.images[1] > 0 and not self.image_sizes:
            raise ValueError("requests with images need at least one image size")
        if self.videos[1] > 0 and self.video_frames < 2:
            raise ValueError("--video-frames must be at least 2")


@dataclass(frozen=True)
class ChatRequest:
    index: int
    group: str
    messages: list[dict[str, Any]]
    max_tokens: int
    num_images: int
    num_videos: int = 0


def draw_picture(width: int, height: int, seed: int) -> Image.Image:
    """Varied content: a gradient, a few shapes and noise, all from ``seed``."""
    rng = random.Random(seed)
    corners = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(Image.new("RGB", (width, height), corners[0]),
                            Image.new("RGB", (width, height), corners[1]), gradient)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, x0 + rng.randint(8, max(9, width // 3)),
               y0 + rng.randint(8, max(9, height // 3)))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    # NOTE: not Image.effect_noise, whose generator cannot be seeded
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.05, 0.2))


def draw_image(width: int, height: int, seed: int) -> bytes:
    """A JPEG of a drawn picture."""
    buffer = io.BytesIO()
    draw_picture(width, height, seed).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def draw_video(frames: int, width: int, height: int, seed: int) -> bytes:
    """An mp4 (MPEG-4 part 2, index first) of ``frames`` drawn pictures at VIDEO_FPS."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mp4"
        with av.open(str(path), "w", options={"movflags": "faststart"}) as output:
            stream = output.add_stream("mpeg4", rate=VIDEO_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.bit_rate = 2_000_000
            for number in range(frames):
                pixels = np.asarray(draw_picture(width, height, seed + number))
                output.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            output.mux(stream.encode())
        return path.read_bytes()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def build_requests(workload: Workload) -> list[ChatRequest]:
    """The request stream of ``workload``: the same every time for the same workload."""
    rng = random.Random(workload.seed)
    drawn: dict[tuple[int, int], list[str]] = {}  # size -> images sent so far
    requests = []
    for index in range(workload.num_requests):
        parts: list[dict[str, Any]] = []
        count = rng.randint(*workload.images)
        for _ in range(count):
            size = rng.choice(workload.image_sizes)
            earlier = drawn.setdefault(size, [])
            if earlier and rng.random() < workload.repeat_images:
                url = rng.choice(earlier)
            else:
                url = data_url(draw_image(*size, seed=rng.getrandbits(32)))
                earlier.append(url)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        # NOTE: no draw without videos, so image-only streams stay what they were
        videos = rng.randint(*workload.videos) if workload.videos[1] else 0
        for _ in range(videos):
            video = draw_video(workload.video_frames, *workload.video_size,
                               seed=rng.getrandbits(32))
            parts.append({"type": "video_url", "video_url": {"url": data_url(video,
                                                                            "video/mp4")}})
        words = " ".join(rng.choice(WORDS) for _ in range(workload.prompt_words))
        parts.append({"type": "text", "text": f"{words} {STOP_FREE}".strip()})
        requests.append(ChatRequest(index, workload.group, [{"role": "user", "content": parts}],
                                    workload.max_tokens, count, videos))
    return requests


def warmup_workload(workload: Workload, count: int) -> Workload:
    """Requests shaped like ``workload``'s with other images, so warming up a server does
    not fill its image cache with the images the measured requests carry."""
    return replace(workload, num_requests=count, seed=workload.seed + WARMUP_SEED_OFFSET,
                   group="warm-up")
