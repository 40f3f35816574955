"""Videos: mmdisagg's own frame sampling and processing (no torchvision) equals transformers' video
processor bit for bit, and greedy tokens of EncoderHalf -> LanguageHalf equal the unsplit
model's generate() fed by that processor.

transformers' video processors need torchvision, which mmdisagg's venv does not have: the
reference runs in the peer venv (torch 2.14.1 + torchvision, created on first use by
mmdisagg/bench/peer_venv.py, a few minutes once) through tests/models/video_reference.py, and
hands its tensors back in files; generate() then runs here, on the same model as the halves.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from mmdisagg.config import ImageSettings
from mmdisagg.core import HASH_BLOCK_TOKENS
from mmdisagg.models import videos
from mmdisagg.models.base import EncoderHalf, pixel_hash
from mmdisagg.models.errors import InputError
from mmdisagg.models.image_cache import ImageCache
from mmdisagg.models.videos import QWEN2_VL, QWEN3_VL, VideoRules, frame_size, load_video
from tests.models.fixtures import (
    TinyModel,
    data_url,
    encode,
    generate_on,
    image_part,
    png_bytes,
    split_greedy,
    text_part,
    transformers_inputs,
    user,
    video_bytes,
    video_part,
)

NEW_TOKENS = 12
DEFAULTS = ImageSettings()
pytestmark = pytest.mark.timeout(900)  # whichever test runs first may create the peer venv


@dataclass(frozen=True)
class Case:
    messages: list[dict[str, Any]]
    max_video_frames: int = DEFAULTS.max_video_frames


CASES = {
    "short video": Case(user(video_part(8, 64, 48, fps=4, seed=1),
                             text_part("What happens in the video?"))),
    "video and image": Case(user(text_part("Compare"), image_part(56, 56, seed=2),
                                 text_part("with"), video_part(12, 100, 60, fps=6, seed=3),
                                 text_part("please."))),
    "webm, downscaled": Case(user(video_part(10, 320, 240, fps=5, seed=4, container="webm"),
                                  text_part("Describe it."))),
    "long video, sampled sparsely": Case(user(text_part("Summarize:"),
                                              video_part(30, 56, 84, fps=3, seed=5)),
                                         max_video_frames=6),
}


@pytest.fixture(scope="module")
def references(tiny_checkpoints: dict[str, Path], tmp_path_factory) -> dict[tuple, dict]:
    """(family, case) -> the tensors transformers' processor makes of it."""
    return transformers_inputs(
        tiny_checkpoints, {name: (case.messages, case.max_video_frames)
                           for name, case in CASES.items()},
        tmp_path_factory.mktemp("video-reference"))


def _encoder(tiny: TinyModel, case: Case) -> EncoderHalf:
    if case.max_video_frames == DEFAULTS.max_video_frames:
        return tiny.encoder
    return EncoderHalf.from_pretrained(
        tiny.path, image_settings=replace(DEFAULTS, max_video_frames=case.max_video_frames))


def visual_grids(tiny: TinyModel, reference: dict[str, torch.Tensor]) -> list[list[int]]:
    """The processor's video grids as mmdisagg holds them: whole, or (Qwen3-VL) one of t = 1
    per temporal patch, as its ``get_rope_index`` splits them."""
    grids = reference["video_grid_thw"]
    if tiny.family.startswith("qwen3_vl"):
        grids = grids.repeat_interleave(grids[:, 0], dim=0)
        grids[:, 0] = 1
    return grids.tolist()


@pytest.mark.parametrize("name", CASES)
def test_prepare_matches_transformers_video_processor(tiny: TinyModel, references,
                                                      name: str) -> None:
    reference = references[tiny.family, name]
    prepared = _encoder(tiny, CASES[name]).prepare(CASES[name].messages)
    assert prepared.token_ids.tolist() == reference["input_ids"][0].tolist()
    videos = [v for v in prepared.images if v.placeholder_id == tiny.encoder.video_token_id]
    images = [v for v in prepared.images if v.placeholder_id == tiny.encoder.image_token_id]
    assert torch.equal(torch.cat([video.pixel_values for video in videos]),
                       reference["pixel_values_videos"])
    assert [list(video.grid_thw) for video in videos] == visual_grids(tiny, reference)
    if images:
        assert torch.equal(torch.cat([image.pixel_values for image in images]),
                           reference["pixel_values"])
    if "second_per_grid_ts" in reference:  # Qwen2.5-VL: the timestamps in the positions
        tokens_per_second = tiny.reference.config.vision_config.tokens_per_second
        assert [video.time_step for video in videos] == \
            (reference["second_per_grid_ts"] * tokens_per_second).tolist()


@pytest.mark.parametrize("name", CASES)
def test_split_halves_match_generate_on_videos(tiny: TinyModel, references, name: str) -> None:
    prompt = _encoder(tiny, CASES[name]).encode(
        [_encoder(tiny, CASES[name]).prepare(CASES[name].messages)])[0]
    expected = generate_on(tiny, references[tiny.family, name], NEW_TOKENS)
    assert split_greedy(tiny, prompt, NEW_TOKENS) == expected


def test_negative_control_untimed_video_positions_change_tokens(tiny_models, references) -> None:
    """Qwen2.5-VL: a video's temporal patches spaced by one (Qwen2-VL's rule) instead of by
    their timestamps give other tokens."""
    tiny = tiny_models["qwen2_5_vl"]
    prepared = tiny.encoder.prepare(CASES["short video"].messages)
    assert prepared.images[0].time_step != 1.0
    prepared.images[0].time_step = 1.0
    prompt = tiny.encoder.encode([prepared])[0]
    expected = generate_on(tiny, references["qwen2_5_vl", "short video"], NEW_TOKENS)
    assert split_greedy(tiny, prompt, NEW_TOKENS) != expected


# -- Qwen3-VL: a video is a run of frame groups, each after its timestamp text ---------------

def test_qwen3_vl_video_positions_equal_get_rope_index(tiny_models, references) -> None:
    qwen3 = tiny_models["qwen3_vl"]
    for name in ("short video", "video and image"):
        inputs = references["qwen3_vl", name]
        ids = inputs["input_ids"]
        kinds = ((ids == qwen3.encoder.image_token_id).long()
                 + 2 * (ids == qwen3.encoder.video_token_id).long())
        positions, delta = qwen3.reference.model.get_rope_index(
            ids, kinds, inputs.get("image_grid_thw"), inputs["video_grid_thw"].clone())
        prompt = encode(qwen3, CASES[name].messages)
        assert prompt.positions.T.tolist() == positions[:, 0].tolist()
        assert prompt.mrope_delta == int(delta)


@pytest.mark.parametrize("change", ["timestamps all zero", "video deepstack zeroed"])
def test_negative_control_qwen3_vl_video_needs_timestamps_and_deepstack(
        tiny_models, references, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    qwen3 = tiny_models["qwen3_vl"]
    messages = CASES["short video"].messages
    expected = generate_on(qwen3, references["qwen3_vl", "short video"], NEW_TOKENS)
    assert split_greedy(qwen3, encode(qwen3, messages), NEW_TOKENS) == expected
    if change == "timestamps all zero":
        monkeypatch.setattr(videos, "timestamps", lambda indices, fps, step: [0.0] * (
            -(-len(indices) // step)))
        prompt = encode(qwen3, messages)
    else:
        prompt = encode(qwen3, messages)
        prompt.deepstack = torch.zeros_like(prompt.deepstack)
    assert split_greedy(qwen3, prompt, NEW_TOKENS) != expected


def test_qwen3_vl_video_spans_hashes_and_cached_prefix(tiny_models) -> None:
    """One span per frame group, keyed by its own pixels, between its timestamp text and
    <|vision_end|>; a change to one group's pixels changes the prefix cache's block hashes
    from that group's first block on; a cached prefix holding the first group skips only it."""
    encoder = tiny_models["qwen3_vl"].encoder
    prepared = encoder.prepare(CASES["long video, sampled sparsely"].messages)
    spans = prepared.image_spans()
    ids = prepared.token_ids.tolist()
    assert len(spans) == len(prepared.images) >= 3
    for span, group in zip(spans, prepared.images, strict=True):
        assert group.grid_thw[0] == 1
        assert set(ids[span.start:span.end]) == {encoder.video_token_id}
        assert (ids[span.start - 1], ids[span.end]) == (encoder.vision_start_token_id,
                                                       encoder.vision_end_token_id)
        assert span.key == pixel_hash(group.pixel_values, group.grid_thw)
    assert len({span.key for span in spans}) == len(spans)
    hashes = prepared.block_hashes()
    changed = prepared.images[2]
    changed.pixel_values = changed.pixel_values.flip(0)
    changed.content_hash = pixel_hash(changed.pixel_values, changed.grid_thw)
    first_changed = next(block for block, (a, b) in enumerate(
        zip(hashes, prepared.block_hashes(), strict=True)) if a != b)
    assert first_changed == spans[2].start // HASH_BLOCK_TOKENS

    prepared = encoder.prepare(CASES["short video"].messages)
    whole = encoder.encode([prepared])[0]
    first = prepared.image_spans()[0]
    calls: list[int] = []
    hook = encoder.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        cached = encoder.encode([prepared], cached_tokens=[first.end])[0]
    finally:
        hook.remove()
    assert sum(calls) == sum(group.pixel_values.shape[0] for group in prepared.images[1:])
    assert torch.equal(cached.embeddings[first.end:], whole.embeddings[first.end:])
    assert torch.equal(cached.deepstack[:, first.end - first.start:],
                       whole.deepstack[:, first.end - first.start:])


def test_qwen3_vl_pixel_budget_is_of_the_whole_video_and_refuses_extreme_aspects() -> None:
    """Qwen3VLVideoProcessor's defaults (16-px patches, 128..768 tokens' pixels for all frames
    together): 2 frames of 448x448 fit, 16 are shrunk; a strip too thin for one merged patch
    is scaled up first, and past 200:1 refused readably."""
    rules = VideoRules.from_checkpoint(Path("/nonexistent"), QWEN3_VL)
    assert (rules.patch_size, rules.max_pixels) == (16, 768 * 32 * 32)
    assert frame_size(448, 448, 2, rules) == (448, 448)
    assert frame_size(448, 448, 16, rules) == (192, 192)
    with pytest.raises(InputError, match="aspect ratio 8000x32 is beyond 200:1"):
        frame_size(8, 2000, 4, rules)


def _refused(url: str, settings: ImageSettings = DEFAULTS, max_tokens: int = 4096
             ) -> InputError:
    rules = VideoRules(processor=QWEN2_VL, min_pixels=3136, max_pixels=12544, patch_size=14,
                       temporal_patch_size=2, merge_size=2, image_mean=(0.5,) * 3,
                       image_std=(0.5,) * 3, rescale_factor=1 / 255, fps=2.0, min_frames=4,
                       max_frames=768, cap_pixels_per_frame=False, max_video_tokens=128000)
    with pytest.raises(InputError) as caught:
        load_video(url, settings, rules, max_tokens)
    return caught.value


MP4 = video_bytes(8, 64, 48)
WEBM = video_bytes(8, 64, 48, container="webm")
# webm's first Cluster (its frames) starts at this element id: cut there, the header is all.
NO_FRAMES_WEBM = WEBM[:WEBM.index(bytes.fromhex("1f43b675"))]


@pytest.mark.parametrize("url, settings, status, words", [
    (data_url(b"hello, not a video", "video/mp4"), DEFAULTS, 400, "not a video"),
    (data_url(MP4[:len(MP4) // 2], "video/mp4"), DEFAULTS, 400, "truncated or corrupt"),
    (data_url(NO_FRAMES_WEBM, "video/webm"), DEFAULTS, 400, "not a video"),
    (data_url(png_bytes(32, 32), "video/mp4"), DEFAULTS, 400, "not a video"),
    (data_url(MP4, "image/png"), DEFAULTS, 400, "of type image/png; send images as image_url"),
    (data_url(video_bytes(1, 64, 48), "video/mp4"), DEFAULTS, 400, "has 1 frame(s)"),
    (data_url(video_bytes(8, 64, 48), "video/mp4"), replace(DEFAULTS, max_video_seconds=1.0),
     413, "2.0 s long; the limit is 1 s"),
    (data_url(video_bytes(2, 640, 480), "video/mp4"), replace(DEFAULTS, max_image_pixels=10**5),
     413, "640x480 = 307200 pixels"),
    (data_url(MP4, "video/mp4"), replace(DEFAULTS, max_video_bytes=1000), 413,
     "video is larger than 1000 bytes"),
])
def test_bad_videos_are_refused_readably(url: str, settings: ImageSettings, status: int,
                                         words: str) -> None:
    error = _refused(url, settings)
    assert (error.status, words in error.message) == (status, True), error.message


def test_a_video_too_long_for_the_model_is_refused_before_decoding() -> None:
    error = _refused(data_url(MP4, "video/mp4"), max_tokens=8)
    assert error.status == 413 and "fewer than 8" in error.message


def test_a_long_video_is_cut_into_bounded_vision_forwards(tiny: TinyModel, references) -> None:
    """--max-encode-patches bounds every vision forward: a video is cut between its temporal
    patches, and the tokens still equal generate()'s."""
    name = "video and image"
    prepared = tiny.encoder.prepare(CASES[name].messages)
    videos = [v for v in prepared.images if v.placeholder_id == tiny.encoder.video_token_id]
    image = next(v for v in prepared.images if v.placeholder_id == tiny.encoder.image_token_id)
    _, h, w = videos[0].grid_thw
    patches = sum(video.pixel_values.shape[0] for video in videos)
    assert patches >= 2 * h * w
    calls: list[int] = []
    hook = tiny.encoder.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        prompt = tiny.encoder.encode([prepared], max_patches=h * w)[0]
    finally:
        hook.remove()
    assert max(calls) <= h * w < sum(calls) == patches + image.pixel_values.shape[0]
    assert split_greedy(tiny, prompt, NEW_TOKENS) == generate_on(
        tiny, references[tiny.family, name], NEW_TOKENS)


def test_a_repeated_video_hits_the_image_cache(tiny: TinyModel) -> None:
    cache = ImageCache(max_bytes=10**8)
    messages = CASES["short video"].messages
    first_prepared = tiny.encoder.prepare(messages)
    first = tiny.encoder.encode([first_prepared], cache)[0]
    calls: list[int] = []
    hook = tiny.encoder.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    try:
        again = tiny.encoder.encode([tiny.encoder.prepare(messages)], cache)[0]
    finally:
        hook.remove()
    assert calls == [] and cache.hits == len(first_prepared.images)  # Qwen3-VL: per frame group
    assert torch.equal(again.embeddings, first.embeddings)


class VideoHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path != "/clip.mp4":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(MP4)))
        self.end_headers()
        self.wfile.write(MP4)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("container", ["mp4", "mov", "webm"])
def test_each_accepted_container_loads(container: str) -> None:
    data = video_bytes(8, 64, 48, container=container)
    rules = VideoRules.from_checkpoint(Path("/nonexistent"))  # the processor's defaults
    video = load_video(data_url(data, f"video/{container}"), DEFAULTS, rules, 10**6)
    assert video.grid_thw[0] == 2 and video.seconds_per_grid == 1.0  # 4 of 8 frames at 4 fps


def test_videos_over_http() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), VideoHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        rules = VideoRules.from_checkpoint(Path("/nonexistent"))  # the processor's defaults
        patient = replace(DEFAULTS, image_fetch_timeout=30)
        assert load_video(f"{base}/clip.mp4", patient, rules, 10**6).grid_thw[0] == 2
        assert "fetching the video failed: HTTP 404" in _refused(f"{base}/gone.mp4",
                                                                 patient).message
    finally:
        server.shutdown()
        server.server_close()
