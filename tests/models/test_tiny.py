"""make-tiny-model: deterministic, fast, and loadable by the stock transformers classes offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    Qwen2VLImageProcessorPil,
)

from mmdisagg.cli import main
from mmdisagg.models.tiny import SIZES, build_config, build_tokenizer, make_tiny_model


def files(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "a"), "--family", "qwen2_5_vl",
                 "--seed", "3"]) == 0
    make_tiny_model(tmp_path / "b", "qwen2_5_vl", seed=3)
    make_tiny_model(tmp_path / "c", "qwen2_5_vl", seed=4)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    differing = {name for name, data in files(tmp_path / "c").items()
                 if files(tmp_path / "a")[name] != data}
    assert differing == {"model.safetensors"}


def test_loads_with_the_stock_auto_classes_offline(tiny_checkpoints: dict[str, Path]) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for family, path in tiny_checkpoints.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        assert model.config.model_type == family
        assert model.config.text_config.initializer_range == pytest.approx(0.2)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert isinstance(AutoImageProcessor.from_pretrained(path), Qwen2VLImageProcessorPil)
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>",
                      "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
            assert tokenizer.convert_tokens_to_ids(token) < model.config.text_config.vocab_size
        assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_byte_level_tokenizer_round_trips_any_text() -> None:
    tokenizer = build_tokenizer()
    text = "Zebra ✓ 🦓 naïve <|im_end|> tab\tand\nnewline"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids


def test_chat_template_is_qwen_style() -> None:
    prompt = build_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                      "<|im_start|>assistant\n")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("size, hidden, layers", [("small", 512, 4), ("medium", 1024, 8)])
def test_larger_sizes(family: str, size: str, hidden: int, layers: int) -> None:
    config = build_config(family, SIZES[size], build_tokenizer())
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == \
        (hidden, layers)
    head_pairs = hidden // config.text_config.num_attention_heads // 2
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_pairs


def test_small_model_builds_quickly(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "qwen2_vl", "small")
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 10_000_000
    assert model.dtype == torch.float32
