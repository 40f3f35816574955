"""Decode the videos of ``video_url`` parts with PyAV and turn them into vision-tower input
exactly as transformers' Qwen2-VL and Qwen3-VL video processors do, without torchvision.

transformers' video processors need torchvision, which mmdisagg does not install (its CPU
build of torch has no matching torchvision wheel, and a GPU host should pick its own torch).
The processor's steps are small and all torch: sample frame indices (``sample_frames`` with
an fps; each processor has its own rule), resize (``smart_resize`` sizes, torchvision's bicubic
resize, which on CPU is ``interpolate`` on uint8 frames), rescale + normalize (fused the way
transformers fuses them) and cut into patches. They are repeated here op for op, so the pixel
values are bit-equal to the processor's: tests/models/test_videos.py checks that against
transformers itself, run in a venv that has torchvision.

Every refusal is an ``InputError`` a client can act on. A video's length, frame size and token
count are checked from its header before any frame is decoded; only the sampled frames are
kept, each resized as soon as it is decoded, so memory is bounded by the resized frames.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from mmdisagg.config import ImageSettings
from mmdisagg.models.errors import InputError
from mmdisagg.models.images import TOO_LARGE, Media, fetch_media

# PyAV's container format names -> what a client calls them.
CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "mp4/mov", "matroska,webm": "webm"}
ACCEPTED = "mp4, webm, mov"
# qwen-vl-utils' sampling rate, used when the checkpoint's video processor names none.
DEFAULT_FPS = 2.0
BICUBIC = 3  # PIL's resample number, the only one Qwen's video processors use
QWEN2_VL, QWEN3_VL = "Qwen2VLVideoProcessor", "Qwen3VLVideoProcessor"
# Each video processor class's defaults, for keys a checkpoint's config leaves out.
PROCESSOR_DEFAULTS = {
    QWEN2_VL: {
        "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255, "resample": BICUBIC, "min_frames": 4, "max_frames": 768,
        "fps": None, "cap_pixels_per_frame": None, "max_video_tokens": 128000,
    },
    QWEN3_VL: {  # NOTE: its size bounds the pixels of the whole video, not of one frame
        "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "rescale_factor": 1 / 255, "resample": BICUBIC, "min_frames": 4, "max_frames": 768,
        "fps": 2, "cap_pixels_per_frame": None, "max_video_tokens": 768,
    },
}


@dataclass(frozen=True)
class VideoRules:
    """The checkpoint's video processor configuration (``video_preprocessor_config.json``,
    else ``preprocessor_config.json``, as transformers' ``AutoVideoProcessor`` reads it), and
    which processor's rules apply (``processor``: its ``video_processor_type``)."""

    processor: str
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    fps: float
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @classmethod
    def from_checkpoint(cls, path: str | Path, processor: str = QWEN2_VL) -> VideoRules:
        """``processor``: the family's video processor, unless the config names another."""
        folder = Path(path)
        config: dict = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            if (folder / name).is_file():
                config = json.loads((folder / name).read_text())
                break
        processor = config.get("video_processor_type", processor)
        if processor not in PROCESSOR_DEFAULTS:
            raise ValueError(f"{path}: video processor {processor} is not supported (supported: "
                             f"{', '.join(PROCESSOR_DEFAULTS)})")
        config = PROCESSOR_DEFAULTS[processor] | config
        size = dict(config["size"])
        size["shortest_edge"] = config.get("min_pixels") or size["shortest_edge"]
        size["longest_edge"] = config.get("max_pixels") or size["longest_edge"]
        if config["resample"] != BICUBIC:
            raise ValueError(f"{path}: video resample {config['resample']} is not supported "
                             "(Qwen's video processors resize bicubic)")
        return cls(processor=processor, min_pixels=size["shortest_edge"],
                   max_pixels=size["longest_edge"],
                   patch_size=config["patch_size"],
                   temporal_patch_size=config["temporal_patch_size"],
                   merge_size=config["merge_size"], image_mean=tuple(config["image_mean"]),
                   image_std=tuple(config["image_std"]), rescale_factor=config["rescale_factor"],
                   fps=config["fps"] or DEFAULT_FPS, min_frames=config["min_frames"],
                   max_frames=config["max_frames"],
                   cap_pixels_per_frame=bool(config["cap_pixels_per_frame"]),
                   max_video_tokens=config["max_video_tokens"])


@dataclass(frozen=True)
class VideoHeader:
    """What a video says about itself before any frame is decoded."""

    total_frames: int
    fps: float  # of the source
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.total_frames / self.fps


@dataclass(eq=False)
class LoadedVideo:
    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]
    seconds_per_grid: float  # seconds one temporal patch spans (Qwen2.5-VL's second_per_grid_ts)
    timestamps: list[float]  # each temporal patch's time in seconds (Qwen3-VL's prompt text)


def load_video(url: str, settings: ImageSettings, rules: VideoRules,
               max_tokens: int) -> LoadedVideo:
    """Fetch, check, sample, decode and process the video at ``url``; one whose placeholder
    tokens would be ``max_tokens`` or more is refused before decoding."""
    data = fetch_media(url, settings, Media("video", settings.max_video_bytes))
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:  # NOTE: FFmpeg raises many types on hostile input; all mean "not a video"
        raise InputError(f"data is not a video this server can read ({ACCEPTED})") from None
    with container:
        if container.format.name not in CONTAINERS:
            raise InputError(f"data is not a video this server can read ({ACCEPTED}); it is "
                             f"{container.format.long_name or container.format.name}")
        if not container.streams.video:
            raise InputError("the video has no video stream")
        stream = container.streams.video[0]
        header = _check_header(container, stream, settings, rules)
        indices = sample_frames(header, rules, settings.max_video_frames)
        height, width = frame_size(header.height, header.width, len(indices), rules)
        grid = (-(-len(indices) // rules.temporal_patch_size), height // rules.patch_size,
                width // rules.patch_size)
        tokens = grid[0] * grid[1] * grid[2] // rules.merge_size**2
        if tokens >= max_tokens:
            raise InputError(f"the video is {tokens} tokens ({len(indices)} frames of "
                             f"{width}x{height}); this model takes fewer than {max_tokens}",
                             TOO_LARGE)
        frames = _decode(container, stream, header, indices, (height, width))
    sampled_fps = len(indices) / header.total_frames * header.fps
    return LoadedVideo(pixel_values=patches(frames, rules), grid_thw=grid,
                       seconds_per_grid=rules.temporal_patch_size / sampled_fps,
                       timestamps=timestamps(indices, header.fps, rules.temporal_patch_size))


def _check_header(container: av.container.InputContainer, stream: av.video.VideoStream,
                  settings: ImageSettings, rules: VideoRules) -> VideoHeader:
    fps = float(stream.average_rate or 0)
    width, height = stream.codec_context.width, stream.codec_context.height
    if fps <= 0:
        raise InputError("the video declares no frame rate")
    if width <= 0 or height <= 0:
        raise InputError(f"the video's frames are empty ({width}x{height} pixels)")
    if width * height > settings.max_image_pixels:
        raise InputError(f"the video's frames are {width}x{height} = {width * height} pixels; "
                         f"the limit is {settings.max_image_pixels}", TOO_LARGE)
    total = stream.frames or _count_frames(container, stream, fps, settings)
    header = VideoHeader(total, fps, width, height)
    if header.seconds > settings.max_video_seconds:
        raise InputError(f"the video is {header.seconds:.1f} s long; the limit is "
                         f"{settings.max_video_seconds:g} s", TOO_LARGE)
    if total < rules.temporal_patch_size:
        raise InputError(f"the video has {total} frame(s); at least "
                         f"{rules.temporal_patch_size} are needed")
    return header


def _count_frames(container: av.container.InputContainer, stream: av.video.VideoStream,
                  fps: float, settings: ImageSettings) -> int:
    """Frames of a container that does not say (webm): its packets, counted without decoding,
    and no further than the longest video accepted."""
    most = math.ceil(settings.max_video_seconds * fps) + 1
    count = 0
    try:
        for packet in container.demux(stream):
            count += packet.size > 0
            if count > most:
                break
        container.seek(0)
    except av.FFmpegError:
        raise InputError("the video data is truncated or corrupt") from None
    return count


def sample_frames(header: VideoHeader, rules: VideoRules, max_frames: int) -> torch.Tensor:
    """Indices of the frames to keep: the processor's ``sample_frames`` with ``fps``
    (``rules.fps`` frames per second, at least ``min_frames``, at most ``max_frames``).
    Qwen2-VL's takes a multiple of the temporal patch, evenly stepped from the first frame;
    Qwen3-VL's any count, spread from the first frame to the last (its patches repeat the last
    frame)."""
    step = rules.temporal_patch_size
    total = header.total_frames
    if rules.processor == QWEN3_VL:
        count = int(total / header.fps * rules.fps)
        count = min(max(count, rules.min_frames), min(rules.max_frames, max_frames), total)
        return torch.from_numpy(np.linspace(0, total - 1, count).round().astype(np.int64))
    most = math.floor(min(min(rules.max_frames, max_frames), total) / step) * step
    wanted = total / header.fps * rules.fps
    count = math.floor(min(max(wanted, rules.min_frames), most, total) / step) * step
    return torch.arange(0, total, total / count).int()


def timestamps(indices: torch.Tensor, fps: float, step: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's times, the last
    patch padded with the last frame (``Qwen3VLProcessor._calculate_timestamps``)."""
    frames = indices.tolist()
    frames += frames[-1:] * (-len(frames) % step)
    times = [frame / fps for frame in frames]
    return [(times[start] + times[start + step - 1]) / 2 for start in range(0, len(times), step)]


def frame_size(height: int, width: int, num_frames: int, rules: VideoRules) -> tuple[int, int]:
    """Resized (height, width): the processor's ``resize``, pixel cap included. Qwen2-VL's
    bounds the pixels of one frame; Qwen3-VL's those of all frames (padded to whole temporal
    patches), and first scales up frames narrower than one merged patch."""
    if rules.processor == QWEN3_VL:
        return _qwen3_frame_size(height, width, num_frames, rules)
    factor = rules.patch_size * rules.merge_size
    max_pixels = rules.max_pixels
    if rules.cap_pixels_per_frame:
        total_pixels = int(rules.max_video_tokens * factor * factor * 0.9)
        max_pixels = max(min(max_pixels, total_pixels * rules.temporal_patch_size // num_frames),
                         int(rules.min_pixels * 1.05))
    return _smart_resize(height, width, 1, 1, factor, rules.min_pixels, max_pixels)


def _qwen3_frame_size(height: int, width: int, num_frames: int, rules: VideoRules
                      ) -> tuple[int, int]:
    factor = rules.patch_size * rules.merge_size
    max_pixels = rules.max_pixels
    if rules.cap_pixels_per_frame:
        per_frame = max(min(rules.max_video_tokens * factor * factor,
                            rules.max_pixels // num_frames), int(rules.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    step = rules.temporal_patch_size
    return _smart_resize(height, width, num_frames, round(num_frames / step) * step, factor,
                         rules.min_pixels, max_pixels)


def _smart_resize(height: int, width: int, num_frames: int, budget_frames: int, factor: int,
                  min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The nearest multiples of ``factor`` whose ``budget_frames`` frames' pixels lie in
    [min_pixels, max_pixels], keeping the aspect ratio (``smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"the video's aspect ratio {width}x{height} is beyond 200:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if budget_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif budget_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _decode(container: av.container.InputContainer, stream: av.video.VideoStream,
            header: VideoHeader, indices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[frames, 3, height, width]`` uint8: the frames at ``indices``, each resized as it is
    decoded (torchvision's bicubic resize of uint8 frames on CPU, frame by frame: the kernel
    treats each frame on its own, so this equals resizing them all at once)."""
    wanted = indices.tolist()  # increasing: the sampling step is at least one frame
    keep = set(wanted)
    frames: list[torch.Tensor] = []
    try:
        for number, frame in enumerate(container.decode(stream)):
            if number > wanted[-1]:
                break
            if number not in keep:
                continue
            if (frame.width, frame.height) != (header.width, header.height):
                raise InputError(f"the video changes frame size mid-stream ({header.width}x"
                                 f"{header.height}, then {frame.width}x{frame.height})")
            pixels = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
            frames.append(resize(pixels[None].contiguous(), size))
    except av.FFmpegError:
        raise InputError("the video data is truncated or corrupt") from None
    if len(frames) < len(wanted):
        raise InputError(f"the video data is truncated or corrupt (it promises "
                         f"{header.total_frames} frames; {len(frames)} of the {len(wanted)} "
                         "sampled could be decoded)")
    return torch.cat(frames)


def resize(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``resize`` of uint8 ``[n, 3, h, w]`` frames to ``size``, bicubic with
    antialiasing: on CPU it hands uint8 straight to ``interpolate``."""
    if tuple(frames.shape[-2:]) == size:
        return frames
    return F.interpolate(frames, size=list(size), mode="bicubic", align_corners=False,
                         antialias=True)


def patches(frames: torch.Tensor, rules: VideoRules) -> torch.Tensor:
    """Resized uint8 ``[t, 3, h, w]`` frames -> normalized float32 patches, laid out as the
    vision tower reads them: rescale and normalize fused (mean and std scaled by
    1/rescale_factor), then Qwen2VLVideoProcessor.patchify (which repeats the last frame up to
    a whole temporal patch)."""
    mean = torch.tensor(rules.image_mean) * (1.0 / rules.rescale_factor)
    std = torch.tensor(rules.image_std) * (1.0 / rules.rescale_factor)
    video = frames[None].to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    patch, merge, step = rules.patch_size, rules.merge_size, rules.temporal_patch_size
    if pad := -video.shape[1] % step:
        video = torch.cat((video, video[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    _, num_frames, channels, height, width = video.shape
    grid_t, grid_h, grid_w = num_frames // step, height // patch, width // patch
    video = video.view(1, grid_t, step, channels, grid_h // merge, merge, patch,
                       grid_w // merge, merge, patch)
    return video.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(
        grid_t * grid_h * grid_w, channels * step * patch * patch)
