"""Greedy tokens of EncoderHalf -> LanguageHalf equal the unsplit model's generate(), exactly."""

from __future__ import annotations

import pytest
import torch

from mmdisagg.core import SamplingParams
from mmdisagg.language.request import Req
from mmdisagg.models.base import EncoderHalf, LanguageHalf
from tests.models.fixtures import (
    TinyModel,
    assert_same_tokens,
    encode,
    generate_greedy,
    image_part,
    paged_engine,
    reference_inputs,
    run_engine,
    split_greedy,
    text_part,
    user,
)

NEW_TOKENS = 12

PROMPTS = {
    "one image": user(image_part(112, 84, seed=1), text_part("Describe the image.")),
    "two images of different sizes": user(
        text_part("Compare"), image_part(56, 56, seed=2), text_part("with"),
        image_part(140, 112, seed=3), text_part("please.")),
    "image at the start": [{"role": "system", "content": [image_part(84, 112, seed=4)]},
                           {"role": "user", "content": "What is this?"}],
    "image in the middle": user(text_part("Here is a picture:"), image_part(112, 112, seed=5),
                                text_part("What colour is the boat?")),
    "text only": [{"role": "user", "content": "Read the numbers carefully: 1 2 3"}],
}


@pytest.mark.parametrize("name", PROMPTS)
def test_split_halves_match_generate(tiny: TinyModel, name: str) -> None:
    messages = PROMPTS[name]
    expected = generate_greedy(tiny, messages, NEW_TOKENS)
    assert split_greedy(tiny, encode(tiny, messages), NEW_TOKENS) == expected.tokens


@pytest.mark.parametrize("name", PROMPTS)
def test_prepare_matches_the_reference_processor(tiny: TinyModel, name: str) -> None:
    reference = reference_inputs(tiny, PROMPTS[name])
    prepared = tiny.encoder.prepare(PROMPTS[name])
    assert prepared.token_ids.tolist() == reference["input_ids"][0].tolist()
    assert prepared.total_tokens == reference["input_ids"].shape[1]
    if prepared.images:
        assert torch.equal(torch.cat([image.pixel_values for image in prepared.images]),
                           reference["pixel_values"])


def test_text_only_positions_are_one_dimensional(tiny: TinyModel) -> None:
    prompt = encode(tiny, PROMPTS["text only"])
    steps = torch.arange(prompt.total_tokens)
    assert torch.equal(prompt.positions, steps[:, None].expand(-1, 3))
    assert prompt.mrope_delta == 0


def test_encoded_prompt_layout(tiny: TinyModel) -> None:
    prompt = encode(tiny, PROMPTS["two images of different sizes"])
    length = prompt.total_tokens
    assert prompt.embeddings.shape == (length, tiny.encoder.hidden_size)
    assert prompt.embeddings.dtype == tiny.encoder.dtype == torch.float32
    assert prompt.token_ids.shape == (length,)
    assert prompt.positions.shape == (length, 3)
    assert prompt.mrope_delta == int(prompt.positions.max()) + 1 - length < 0


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_matches_one_prefill(tiny: TinyModel, chunk: int) -> None:
    prompt = encode(tiny, PROMPTS["image in the middle"])
    assert split_greedy(tiny, prompt, NEW_TOKENS, chunk) == split_greedy(tiny, prompt, NEW_TOKENS)


def test_negative_control_zero_mrope_delta_changes_tokens(tiny: TinyModel) -> None:
    messages = PROMPTS["image in the middle"]
    prompt = encode(tiny, messages)
    assert prompt.mrope_delta != 0
    prompt.mrope_delta = 0
    assert split_greedy(tiny, prompt, NEW_TOKENS) != generate_greedy(tiny, messages,
                                                                 NEW_TOKENS).tokens


def test_negative_control_one_dimensional_positions_change_tokens(tiny: TinyModel) -> None:
    messages = PROMPTS["image in the middle"]
    prompt = encode(tiny, messages)
    prompt.positions = torch.arange(prompt.total_tokens)[:, None].expand(-1, 3).contiguous()
    prompt.mrope_delta = 0
    assert split_greedy(tiny, prompt, NEW_TOKENS) != generate_greedy(tiny, messages,
                                                                 NEW_TOKENS).tokens


def test_decode_batch_of_different_lengths_matches_generate(tiny: TinyModel) -> None:
    names = ("one image", "two images of different sizes", "text only")
    prompts = [encode(tiny, PROMPTS[name]) for name in names]
    assert len({prompt.total_tokens for prompt in prompts}) == 3
    reqs = [Req(name, SamplingParams(max_tokens=NEW_TOKENS), prompt)
            for name, prompt in zip(names, prompts, strict=True)]
    generated = run_engine(paged_engine(tiny.language), reqs)
    for name in names:
        assert_same_tokens(generated[name], generate_greedy(tiny, PROMPTS[name], NEW_TOKENS))


def test_lower_precision_runs(tiny: TinyModel) -> None:
    encoder = EncoderHalf.from_pretrained(tiny.path, dtype="bfloat16")
    language = LanguageHalf.from_pretrained(tiny.path, dtype=torch.float16)
    prompt = encoder.encode([encoder.prepare(PROMPTS["one image"])])[0]
    assert prompt.embeddings.dtype == torch.bfloat16
    engine = paged_engine(language)
    assert engine.runner.cache.keys.dtype == torch.float16
    tokens = run_engine(engine, [Req("r", SamplingParams(max_tokens=3, ignore_eos=True),
                                     prompt)])["r"]
    assert len(tokens) == 3
