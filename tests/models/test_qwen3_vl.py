"""Qwen3-VL: the Hub layout, deepstack features from the encoder half to the decoder, and
what goes wrong without them. (The families' shared tests, test_equality.py and others, run
for Qwen3-VL too.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mmdisagg.core import EncodedPrompt, mask_runs, runs_mask
from tests.models.fixtures import (
    TinyModel,
    encode,
    generate_greedy,
    image_part,
    reference_inputs,
    split_greedy,
    text_part,
    user,
)

ONE_IMAGE = user(image_part(112, 84, seed=1), text_part("Describe the image."))
TWO_IMAGES = user(text_part("Compare"), image_part(64, 64, seed=2), text_part("with"),
                  image_part(160, 96, seed=3), text_part("please."))


@pytest.fixture
def qwen3(tiny_models: dict[str, TinyModel]) -> TinyModel:
    return tiny_models["qwen3_vl"]


def test_checkpoint_has_the_released_layout(qwen3: TinyModel) -> None:
    with safe_open(qwen3.path / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in names if name.startswith(
        "model.")} == {"model.visual", "model.language_model"}
    assert names - {n for n in names if n.startswith("model.")} == {"lm_head.weight"}
    assert "model.visual.deepstack_merger_list.1.linear_fc2.weight" in names
    assert "model.language_model.layers.0.self_attn.q_norm.weight" in names
    config = json.loads((qwen3.path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    processor = json.loads((qwen3.path / "preprocessor_config.json").read_text())
    assert processor["patch_size"] == 16 and processor["image_mean"] == [0.5] * 3
    assert qwen3.encoder.deepstack_layers == qwen3.language.deepstack_layers == 2


def test_deepstack_features_equal_the_vision_towers(qwen3: TinyModel) -> None:
    inputs = reference_inputs(qwen3, TWO_IMAGES)
    with torch.no_grad():
        output = qwen3.reference.model.get_image_features(inputs["pixel_values"],
                                                          inputs["image_grid_thw"])
    expected = torch.stack([torch.cat(layer) for layer in output.deepstack_features])
    prompt = encode(qwen3, TWO_IMAGES)
    assert prompt.deepstack.shape == (2, int(prompt.visual_mask.sum()), prompt.embeddings.shape[1])
    assert torch.equal(prompt.visual_mask, inputs["input_ids"][0] == qwen3.reference.config
                       .image_token_id)
    torch.testing.assert_close(prompt.deepstack, expected, rtol=0, atol=1e-5)


def test_text_only_prompt_has_no_deepstack_rows(qwen3: TinyModel) -> None:
    prompt = encode(qwen3, [{"role": "user", "content": "The cat sits on the windowsill."}])
    assert prompt.deepstack.shape[1] == 0 and not prompt.visual_mask.any()
    assert prompt.visual_runs() == []


@pytest.mark.parametrize("messages", [ONE_IMAGE, TWO_IMAGES], ids=["one image", "two images"])
def test_prefill_logits_equal_the_unsplit_model_and_need_deepstack(
        qwen3: TinyModel, messages: list) -> None:
    """A stronger check than tokens: the last logits match the unsplit forward to float error,
    and leaving out the deepstack features (or adding them one layer late) moves them by far
    more than that."""
    with torch.no_grad():
        expected = qwen3.reference(**reference_inputs(qwen3, messages)).logits[0, -1]
    prompt = encode(qwen3, messages)
    language = qwen3.language

    def last_logits(deepstack: torch.Tensor | None) -> torch.Tensor:
        return language.prefill(language.new_cache(), prompt.embeddings, prompt.positions,
                                deepstack, prompt.visual_mask)

    torch.testing.assert_close(last_logits(prompt.deepstack), expected, rtol=0, atol=1e-4)
    assert (last_logits(None) - expected).abs().max() > 0.05
    one_layer_late = torch.cat([torch.zeros_like(prompt.deepstack[:1]), prompt.deepstack[:1]])
    assert (last_logits(one_layer_late) - expected).abs().max() > 0.05


def test_negative_control_zeroed_deepstack_changes_tokens(qwen3: TinyModel) -> None:
    expected = generate_greedy(qwen3, ONE_IMAGE, 32).tokens
    prompt = encode(qwen3, ONE_IMAGE)
    assert split_greedy(qwen3, prompt, 32) == expected
    prompt.deepstack = torch.zeros_like(prompt.deepstack)
    assert split_greedy(qwen3, prompt, 32) != expected


def test_positions_equal_get_rope_index(qwen3: TinyModel) -> None:
    for messages in (ONE_IMAGE, TWO_IMAGES):
        inputs = reference_inputs(qwen3, messages)
        positions, delta = qwen3.reference.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])
        prompt = encode(qwen3, messages)
        assert prompt.positions.T.tolist() == positions[:, 0].tolist()
        assert prompt.mrope_delta == int(delta)


@pytest.mark.parametrize("cut", [0, 1, 5, 17, 18, 30, 10_000])
def test_split_and_join_keep_each_visual_tokens_rows(qwen3: TinyModel, cut: int) -> None:
    prompt = encode(qwen3, TWO_IMAGES)
    head, tail = prompt.split(cut)
    for piece in (head, tail):
        assert piece.deepstack.shape[1] == int(piece.visual_mask.sum())
    joined = EncodedPrompt.join([head, tail])
    assert torch.equal(joined.deepstack, prompt.deepstack)
    assert torch.equal(joined.visual_mask, prompt.visual_mask)
    assert torch.equal(joined.embeddings, prompt.embeddings)


def test_mask_runs_round_trip() -> None:
    mask = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert mask_runs(mask) == [(0, 2), (4, 1), (6, 3)]
    assert torch.equal(runs_mask(mask_runs(mask), len(mask)), mask)
    assert mask_runs(torch.zeros(4, dtype=torch.bool)) == []
