"""Tiny checkpoints (built once per session), their halves, the unsplit reference model, and
test images. Imported by the conftest of every test folder that needs a model."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

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
