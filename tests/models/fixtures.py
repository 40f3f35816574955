"""Tiny checkpoints (built once per session), their halves, the unsplit reference model, and
test images. Imported by the conftest of every test folder that needs a model."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import base64
import io
import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mmdisagg.bench.peer_venv import DEFAULT_PATH, ensure_peer_venv
from mmdisagg.config import EngineSettings
from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.engine import Engine
from mmdisagg.language.request import Req
from mmdisagg.models.base import EncoderHalf, LanguageHalf
from mmdisagg.models.kv_cache import PagedKVCache
from mmdisagg.models.tiny import make_tiny_model

torch.set_num_threads(1)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class TinyModel:
    family: str
    path: Path
    encoder: EncoderHalf
    language: LanguageHalf
    reference: Any  # the unsplit AutoModelForImageTextToText


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: make_tiny_model(tmp_path_factory.mktemp(family), family)
            for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoints: dict[str, Path]) -> dict[str, TinyModel]:
    return {family: TinyModel(family, path, EncoderHalf.from_pretrained(path),
                              LanguageHalf.from_pretrained(path),
                              AutoModelForImageTextToText.from_pretrained(path).eval())
            for family, path in tiny_checkpoints.items()}


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_models: dict[str, TinyModel]) -> TinyModel:
    """Each test using this runs once per family."""
    return tiny_models[request.param]


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(width: int, height: int, seed: int = 0) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(width, height, seed))}}


def video_bytes(frames: int, width: int, height: int, fps: int = 4, seed: int = 0,
                container: str = "mp4") -> bytes:
    """A small video of random frames, encoded locally with PyAV (mp4/mov: MPEG-4 part 2 with
    the index first, as web videos are; webm: VP8)."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"video.{container}"
        options = {} if container == "webm" else {"movflags": "faststart"}
        with av.open(str(path), "w", options=options) as output:
            stream = output.add_stream("libvpx" if container == "webm" else "mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for _ in range(frames):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                output.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            output.mux(stream.encode())
        return path.read_bytes()


def video_part(frames: int, width: int, height: int, fps: int = 4, seed: int = 0,
               container: str = "mp4") -> dict[str, Any]:
    mime = "video/webm" if container == "webm" else f"video/{container}"
    return {"type": "video_url", "video_url": {
        "url": data_url(video_bytes(frames, width, height, fps, seed, container), mime)}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def reference_inputs(tiny: TinyModel, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What the Hugging Face processor would hand to ``generate()``, built independently of
    EncoderHalf: placeholders expanded in the text, then tokenized; images run through the
    image processor in one call; ``mm_token_type_ids`` marking image tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    processor = AutoImageProcessor.from_pretrained(tiny.path)
    images, template_messages = [], []
    for message in messages:
        if isinstance(message["content"], str):
            template_messages.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "image_url":
                encoded = part["image_url"]["url"].split(",", 1)[1]
                images.append(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        template_messages.append({"role": message["role"], "content": parts})
    text = tokenizer.apply_chat_template(template_messages, tokenize=False,
                                         add_generation_prompt=True)
    inputs: dict[str, torch.Tensor] = {}
    if images:
        inputs.update(processor(images=images, return_tensors="pt"))
        merge = processor.merge_size**2
        pieces = text.split("<|image_pad|>")
        counts = [int(grid.prod()) // merge for grid in inputs["image_grid_thw"]]
        text = pieces[0] + "".join("<|image_pad|>" * count + piece
                                   for count, piece in zip(counts, pieces[1:], strict=True))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  mm_token_type_ids=(input_ids == image_token_id).long())
    return inputs


@dataclass
class Greedy:
    tokens: list[int]
    margins: list[float]  # top-1 minus top-2 logit at each step


def generate_greedy(tiny: TinyModel, messages: list[dict[str, Any]], max_new_tokens: int
                    ) -> Greedy:
    """The unsplit model's greedy tokens: the ground truth."""
    inputs = reference_inputs(tiny, messages)
    with torch.no_grad():
        output = tiny.reference.generate(**inputs, max_new_tokens=max_new_tokens,
                                         do_sample=False, output_scores=True,
                                         return_dict_in_generate=True)
    margins = [float(top[0] - top[1]) for top in
               (scores[0].topk(2).values for scores in output.scores)]
    return Greedy(output.sequences[0, inputs["input_ids"].shape[1]:].tolist(), margins)


# Batching changes the shapes of the matrix products, and CPU GEMM kernels then sum in another
# order: logits move by about 1e-5. Where the reference's top two logits are closer than this,
# either token is a correct greedy choice.
NEAR_TIE = 1e-3


def assert_same_tokens(actual: list[int], expected: Greedy) -> None:
    """Token-for-token equality up to the first near-tie in the reference (after it, a batched
    run may legitimately continue differently); all of it when there is none."""
    ties = [step for step, margin in enumerate(expected.margins) if margin < NEAR_TIE]
    checked = ties[0] if ties else len(expected.tokens)
    assert checked >= len(expected.tokens) // 2, f"near-tie at step {checked}: a weak check"
    if ties:
        assert actual[:checked] == expected.tokens[:checked]
    else:
        assert actual == expected.tokens


def encode(tiny: TinyModel, messages: list[dict[str, Any]]) -> EncodedPrompt:
    return tiny.encoder.encode([tiny.encoder.prepare(messages)])[0]


def paged_engine(language: LanguageHalf, kv_tokens: int = 4096, block_size: int = 16,
                 max_prefill_tokens: int = 2048, max_running: int = 64) -> Engine:
    """An engine over a KV cache of ``kv_tokens`` tokens."""
    cache = PagedKVCache(language.kv_layout, -(-kv_tokens // block_size), block_size,
                         language.device)
    return Engine(language, cache, EngineSettings(max_prefill_tokens=max_prefill_tokens,
                                                  kv_block_size=block_size), max_running)


def run_engine(engine: Engine, reqs: list[Req]) -> dict[str, list[int]]:
    """Add ``reqs``, step until the engine is empty; each request's tokens."""
    for req in reqs:
        engine.add(req)
    while engine.has_work():
        engine.step()
    engine.blocks.check()
    assert engine.blocks.stats().used_blocks == 0
    return {req.request_id: req.output_ids for req in reqs}


def split_greedy(tiny: TinyModel, prompt: EncodedPrompt, max_new_tokens: int,
                 prefill_chunk: int = 2048) -> list[int]:
    """Greedy tokens through the LanguageHalf alone, in an engine of its own that prefills
    ``prefill_chunk`` tokens per step; stops at EOS like generate()."""
    engine = paged_engine(tiny.language, max_prefill_tokens=prefill_chunk)
    req = Req("r", SamplingParams(max_tokens=max_new_tokens), prompt)
    return run_engine(engine, [req])["r"]


def _media(messages: list[dict[str, Any]], kind: str) -> list[bytes]:
    """The bytes of every ``kind`` part (image_url, video_url) given as data: URLs."""
    return [base64.b64decode(part[kind]["url"].split(",", 1)[1])
            for message in messages if not isinstance(message["content"], str)
            for part in message["content"] if part["type"] == kind]


def _template_text(path: Path, messages: list[dict[str, Any]]) -> str:
    placeholders = {"image_url": {"type": "image"}, "video_url": {"type": "video"}}
    template_messages = [message if isinstance(message["content"], str) else {
        "role": message["role"],
        "content": [placeholders.get(part["type"], part) for part in message["content"]]}
        for message in messages]
    return AutoTokenizer.from_pretrained(path).apply_chat_template(
        template_messages, tokenize=False, add_generation_prompt=True)


def _all_frames(data: bytes) -> tuple[np.ndarray, float]:
    """Every frame, decoded independently of mmdisagg, and the frame rate."""
    with av.open(io.BytesIO(data)) as container:
        fps = float(container.streams.video[0].average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames), fps


def transformers_inputs(checkpoints: dict[str, Path],
                        cases: dict[str, tuple[list[dict[str, Any]], int]],
                        folder: Path, families: tuple[str, ...] = FAMILIES
                        ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(family, case) -> what transformers' own processor (its video processor included) makes
    of the case's messages, frames sampled at most ``max_video_frames`` (the case's int), for
    each of ``families``.

    transformers' video processors need torchvision, which this venv lacks: the processor runs
    in the peer venv (torch 2.14.1 + torchvision, created on first use by
    mmdisagg/bench/peer_venv.py, a few minutes once) through tests/models/video_reference.py,
    one run for all cases, and hands its tensors back in files."""
    python = ensure_peer_venv(DEFAULT_PATH).parent / "python"
    jobs = []
    for family in families:
        for number, (messages, max_frames) in enumerate(cases.values()):
            tag = f"{family}-{number}"
            images = []
            for index, png in enumerate(_media(messages, "image_url")):
                images.append(str(folder / f"{tag}-image{index}.png"))
                Path(images[-1]).write_bytes(png)
            videos = []
            for index, data in enumerate(_media(messages, "video_url")):
                frames, fps = _all_frames(data)
                videos.append({"frames": str(folder / f"{tag}-video{index}.npy"), "fps": fps,
                               "max_frames": max_frames})
                np.save(videos[-1]["frames"], frames)
            jobs.append({"name": tag, "family": family, "checkpoint": str(checkpoints[family]),
                         "text": _template_text(checkpoints[family], messages),
                         "images": images, "videos": videos})
    (folder / "cases.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("video_reference.py")
    result = subprocess.run([str(python), str(script), str(folder / "cases.json"), str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {(family, name): load_file(folder / f"{family}-{number}.safetensors")
            for family in families for number, name in enumerate(cases)}


def generate_on(tiny: TinyModel, inputs: dict[str, torch.Tensor], max_new_tokens: int
                ) -> list[int]:
    """The unsplit model's greedy tokens on a processor's tensors (``mm_token_type_ids``
    marking image and video tokens)."""
    config = tiny.reference.config
    ids = inputs["input_ids"]
    kinds = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    with torch.no_grad():
        output = tiny.reference.generate(**{**inputs, "mm_token_type_ids": kinds},
                                         max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, ids.shape[1]:].tolist()
