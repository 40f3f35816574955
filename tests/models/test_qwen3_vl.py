"""Qwen3-VL: the Hub layout, deepstack features from the encoder half to the decoder, and
what goes wrong without them. (The families' shared tests, test_equality.py and others, run
for Qwen3-VL too.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from mmdisagg.core import EncodedPrompt, SamplingParams, mask_runs, runs_mask
from mmdisagg.language.request import Req
from mmdisagg.language.runner import ModelRunner
from mmdisagg.models.base import EncoderHalf, LanguageHalf
from mmdisagg.models.kv_cache import PagedKVCache
from mmdisagg.models.tiny import make_tiny_model
from tests.models.fixtures import (
    TinyModel,
    assert_same_tokens,
    encode,
    generate_greedy,
    generate_on,
    image_part,
    paged_engine,
    reference_inputs,
    run_engine,
    split_greedy,
    text_part,
    transformers_inputs,
    user,
    video_part,
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
    video = json.loads((qwen3.path / "video_preprocessor_config.json").read_text())
    assert (video["video_processor_type"], video["patch_size"], video["image_mean"]) == (
        "Qwen3VLVideoProcessor", 16, [0.5] * 3)
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


def last_logits(language: LanguageHalf, prompt: EncodedPrompt) -> torch.Tensor:
    """One prefill of the whole prompt through the runner's batch, as the engine builds it."""
    blocks = -(-prompt.total_tokens // 16)
    cache = PagedKVCache(language.kv_layout, blocks, 16, language.device)
    req = Req("r", SamplingParams(max_tokens=1), prompt)
    req.block_table = list(range(blocks))
    batch = ModelRunner(language, cache)._batch([], [(req, prompt.total_tokens)])
    return language.logits(language.forward(batch, cache))[0]


@pytest.mark.parametrize("messages", [ONE_IMAGE, TWO_IMAGES], ids=["one image", "two images"])
def test_prefill_logits_equal_the_unsplit_model_and_need_deepstack(
        qwen3: TinyModel, messages: list) -> None:
    """A stronger check than tokens: the last logits match the unsplit forward to float error,
    and leaving out the deepstack features (or adding them one layer late) moves them by far
    more than that."""
    with torch.no_grad():
        expected = qwen3.reference(**reference_inputs(qwen3, messages)).logits[0, -1]
    prompt = encode(qwen3, messages)
    torch.testing.assert_close(last_logits(qwen3.language, prompt), expected, rtol=0, atol=1e-4)
    deepstack = prompt.deepstack
    prompt.deepstack = None
    assert (last_logits(qwen3.language, prompt) - expected).abs().max() > 0.05
    prompt.deepstack = torch.cat([torch.zeros_like(deepstack[:1]), deepstack[:1]])  # late
    assert (last_logits(qwen3.language, prompt) - expected).abs().max() > 0.05


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


@pytest.mark.parametrize("chunk", [1, 7, 16, 33])
def test_deepstack_rows_of_any_chunking_cover_each_visual_token_once(qwen3: TinyModel,
                                                                    chunk: int) -> None:
    prompt = encode(qwen3, TWO_IMAGES)
    rows, features = [], []
    for start in range(0, prompt.total_tokens + 5, chunk):  # past the end: output tokens
        found = prompt.deepstack_rows(start, start + chunk)
        if found is not None:
            rows.append(found[0] + start)
            features.append(found[1])
    assert torch.equal(torch.cat(rows), prompt.visual_mask.nonzero().flatten())
    assert torch.equal(torch.cat(features, dim=1), prompt.deepstack)


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_prefill_with_deepstack_matches_generate(qwen3: TinyModel, chunk: int) -> None:
    """Prefill chunks cut through the images: each chunk adds only its own tokens' rows."""
    expected = generate_greedy(qwen3, TWO_IMAGES, 12).tokens
    assert split_greedy(qwen3, encode(qwen3, TWO_IMAGES), 12, prefill_chunk=chunk) == expected


def test_mask_runs_round_trip() -> None:
    mask = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    assert mask_runs(mask) == [(0, 2), (4, 1), (6, 3)]
    assert torch.equal(runs_mask(mask_runs(mask), len(mask)), mask)
    assert mask_runs(torch.zeros(4, dtype=torch.bool)) == []


def test_small_size_adds_deepstack_to_3_of_its_4_layers(tmp_path) -> None:
    """As in the released models, fewer deepstack layers than decoder layers (the tiny size
    feeds both of its 2)."""
    path = make_tiny_model(tmp_path / "small", "qwen3_vl", "small")
    small = TinyModel("qwen3_vl", path, EncoderHalf.from_pretrained(path),
                      LanguageHalf.from_pretrained(path),
                      AutoModelForImageTextToText.from_pretrained(path).eval())
    assert (small.language.deepstack_layers, len(small.language.text_model.layers)) == (3, 4)
    messages = user(text_part("Here:"), image_part(112, 96, seed=3), text_part("What is it?"))
    assert split_greedy(small, encode(small, messages), 10) == generate_greedy(
        small, messages, 10).tokens


# -- qwen3_vl_moe: the same halves, MoE decoder layers ------------------------------------

@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    path = make_tiny_model(tmp_path_factory.mktemp("qwen3_vl_moe"), "qwen3_vl_moe")
    return TinyModel("qwen3_vl_moe", path, EncoderHalf.from_pretrained(path),
                     LanguageHalf.from_pretrained(path),
                     AutoModelForImageTextToText.from_pretrained(path).eval())


def test_moe_checkpoint_stores_experts_as_released_and_each_half_loads_its_own(
        moe: TinyModel) -> None:
    with safe_open(moe.path / "model.safetensors", framework="pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}  # noqa: SIM118
    hidden, experts = 128, 4
    assert shapes["model.language_model.layers.0.mlp.experts.gate_up_proj"] == [
        experts, hidden, 2 * 64]  # [experts, in, out]
    assert shapes["model.language_model.layers.0.mlp.experts.down_proj"] == [experts, 64, hidden]
    vision = {name for name in shapes if name.startswith("model.visual.")}
    assert set(moe.encoder.loaded_weights) == vision | {
        "model.language_model.embed_tokens.weight"}
    assert set(moe.language.loaded_weights) == set(shapes) - vision
    held = moe.language.text_model.layers[0].mlp.experts.gate_up_proj
    assert tuple(held.shape) == (experts, 2 * 64, hidden)  # as the module holds them


@pytest.mark.parametrize("messages", [ONE_IMAGE, TWO_IMAGES,
                                      [{"role": "user", "content": "The cat sits."}]],
                         ids=["one image", "two images", "text only"])
def test_moe_split_halves_match_generate(moe: TinyModel, messages: list) -> None:
    assert split_greedy(moe, encode(moe, messages), 12) == generate_greedy(
        moe, messages, 12).tokens


def test_moe_batch_through_the_engine_matches_generate(moe: TinyModel) -> None:
    cases = {"one image": ONE_IMAGE, "two images": TWO_IMAGES}
    reqs = [Req(name, SamplingParams(max_tokens=12), encode(moe, messages))
            for name, messages in cases.items()]
    generated = run_engine(paged_engine(moe.language, max_prefill_tokens=16), reqs)
    for name, messages in cases.items():
        assert_same_tokens(generated[name], generate_greedy(moe, messages, 12))


@pytest.mark.timeout(900)  # the first run may create the peer venv
def test_moe_video_matches_generate_fed_by_transformers_processor(moe: TinyModel,
                                                                 tmp_path) -> None:
    messages = user(text_part("Here:"), video_part(8, 64, 48, fps=4, seed=9),
                    text_part("What happens?"))
    reference = transformers_inputs({"qwen3_vl_moe": moe.path}, {"video": (messages, 64)},
                                    tmp_path, families=("qwen3_vl_moe",))["qwen3_vl_moe", "video"]
    assert moe.encoder.prepare(messages).token_ids.tolist() == reference["input_ids"][0].tolist()
    assert split_greedy(moe, encode(moe, messages), 12) == generate_on(moe, reference, 12)
