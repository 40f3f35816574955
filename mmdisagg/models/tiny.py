"""``mmdisagg make-tiny-model``: a random-weight Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, built
offline.

Everything a real checkpoint folder has, made locally in seconds: a byte-level BPE tokenizer
trained on a built-in paragraph (with Qwen's special tokens and a Qwen-style chat template),
the family's PIL image processor and video processor config with small pixel limits, a config,
and random weights. The same seed writes the same files. ``initializer_range`` is large (0.2) so
that greedy output stays varied and position bugs change it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLMoeConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import logging as transformers_logging

from mmdisagg.models.qwen3_vl import EXPERTS

FAMILY_CONFIGS = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig,
                  "qwen3_vl": Qwen3VLConfig, "qwen3_vl_moe": Qwen3VLMoeConfig}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen's chat format: a default system turn, images as vision placeholders, and tools the way
# Qwen2.5 checkpoints render them (listed in the system turn; calls in <tool_call> tags; tool
# results in <tool_response> tags inside one user turn).
# NOTE: transformers renders templates with trim_blocks: a newline right after a block tag is
# dropped, so newlines here come before tags or inside {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% macro render(content) %}{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% elif part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}{% endmacro %}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ render(messages[0].content) }}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\\n\\n' }}# Tools\n\nThese functions are available, described in JSON inside "
    "<tools></tools> tags:\n<tools>{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}"
    "{% endfor %}{{ '\\n' }}</tools>\n\nTo call one, answer with a JSON object of its name "
    "and arguments inside <tool_call></tool_call> tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0].role != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and loop.first and tools %}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or loop.previtem.role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n' }}<tool_response>\n{{ render(message.content) }}\n</tool_response>"
    "{% if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ message.role }}\n{{ render(message.content) }}"
    "{% for call in message.tool_calls or [] %}"
    "{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = """\
A photograph shows a small red boat tied to a wooden pier on a calm grey lake. Behind it,
pine trees climb a hill under a pale sky, and two gulls stand on the railing.
Describe the image in detail. What colour is the car? How many people are in the picture?
The chart compares sales in 2021, 2022 and 2023: revenue grew by 15% each year, while costs
stayed near $4.2 million. Read the numbers carefully: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
The cat sits on the windowsill, watching rain run down the glass; a dog sleeps by the door.
Please answer briefly. Yes, no, maybe! Is this a diagram, a map, a menu or a street sign?
Text in the image reads: "OPEN 9:00-17:00, Monday to Friday". Translate it into French.
Les enfants jouent au parc. Der Hund läuft schnell. 猫がいます。 Café, naïve, jalapeño.
"""
# Ids up to here are the tokenizer's byte alphabet and merges; the special tokens follow.
BPE_VOCAB_SIZE = 1024
# Qwen2-VL and Qwen2.5-VL see 14-pixel patches, Qwen3-VL 16-pixel ones (normalized to [-1, 1]
# rather than by CLIP's mean and std); every family merges 2x2 patches into one token. Images
# are limited to 4..64 tokens.
PATCH_SIZES = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16}
MIN_TOKENS, MAX_TOKENS = 4, 64
MIN_PIXELS = 28 * 28 * MIN_TOKENS
# Video frames are smaller still. Qwen2-VL, Qwen2.5-VL: 16 tokens per temporal patch at most.
# Qwen3-VL's budget is of the whole video (as in its released config): 16 frames of 16 tokens.
VIDEO_PROCESSOR = {
    "video_processor_type": "Qwen2VLVideoProcessor",
    "size": {"shortest_edge": MIN_PIXELS, "longest_edge": 28 * 28 * 16},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "do_convert_rgb": True, "resample": 3, "do_sample_frames": True, "fps": 2.0,
    "min_frames": 4, "max_frames": 768, "cap_pixels_per_frame": False,
}
QWEN3_VIDEO_PROCESSOR = VIDEO_PROCESSOR | {
    "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
    "size": {"shortest_edge": 32 * 32 * MIN_TOKENS, "longest_edge": 32 * 32 * 16 * 16},
    "patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "max_video_tokens": 768,
}


@dataclass(frozen=True)
class Size:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int


SIZES = {
    "tiny": Size(128, 2, 4, 2, 256, 64, 2, 4),
    "small": Size(512, 4, 8, 4, 1024, 256, 4, 8),
    "medium": Size(1024, 8, 16, 4, 2816, 768, 8, 12),  # for memory measurements
}


def make_tiny_model(path: str | Path, family: str = "qwen2_vl", size: str = "tiny",
                    seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``family`` (qwen2_vl, qwen2_5_vl) and ``size`` (tiny,
    small, medium) to ``path``; return the path. Same arguments, same files."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    path = Path(path)
    tokenizer = build_tokenizer()
    config = build_config(family, SIZES[size], tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    special = special_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=special["<|endoftext|>"], pad_token_id=special["<|endoftext|>"],
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]])
    progress_bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if progress_bars:
            transformers_logging.enable_progress_bar()
    if family == "qwen3_vl_moe":
        hub_experts_layout(path / "model.safetensors")
    tokenizer.save_pretrained(path)
    build_image_processor(family).save_pretrained(path)
    # NOTE: written by hand: transformers' video processor class needs torchvision to exist
    video_processor = (QWEN3_VIDEO_PROCESSOR if family.startswith("qwen3_vl")
                       else VIDEO_PROCESSOR)
    (path / "video_preprocessor_config.json").write_text(json.dumps(video_processor, indent=2))
    return path


def hub_experts_layout(file: Path) -> None:
    """Qwen3-VL-MoE as released stores each layer's experts as ``[experts, in, out]``;
    ``save_pretrained`` writes the module's ``[experts, out, in]``."""
    tensors = load_file(file)
    for name in [name for name in tensors if name.endswith(EXPERTS)]:
        tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


def build_image_processor(family: str) -> Qwen2VLImageProcessorPil:
    patch = PATCH_SIZES[family]
    token_pixels = (2 * patch) ** 2
    if family.startswith("qwen3_vl"):
        return Qwen2VLImageProcessorPil(
            min_pixels=MIN_TOKENS * token_pixels, max_pixels=MAX_TOKENS * token_pixels,
            patch_size=patch, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Qwen2VLImageProcessorPil(min_pixels=MIN_TOKENS * token_pixels,
                                    max_pixels=MAX_TOKENS * token_pixels)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes, any token sequence decodes) with Qwen's specials."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    bpe.add_special_tokens([AddedToken(token, special=True, normalized=False)
                            for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}


def build_config(family: str, size: Size, tokenizer: PreTrainedTokenizerFast) -> Qwen2VLConfig:
    special = special_token_ids(tokenizer)
    head_dim = size.text_hidden // size.text_heads
    rotary_pairs = head_dim // 2  # split over t/h/w as Qwen does: 1/4, 3/8, 3/8
    mrope_section = [rotary_pairs // 4, rotary_pairs * 3 // 8, rotary_pairs * 3 // 8]
    text = {
        "vocab_size": len(tokenizer), "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate, "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads, "num_key_value_heads": size.text_kv_heads,
        "max_position_embeddings": 4096, "initializer_range": 0.2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": mrope_section},
        "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
        "pad_token_id": special["<|endoftext|>"],
    }
    if family == "qwen2_vl":
        vision = {"depth": size.vision_depth, "embed_dim": size.vision_hidden,
                  "num_heads": size.vision_heads, "mlp_ratio": 2,
                  "hidden_size": size.text_hidden, "initializer_range": 0.2}
    elif family.startswith("qwen3_vl"):
        # Interleaved M-RoPE: h and w each take 5/16 of the rotary pairs, t the rest. The last
        # (up to three) vision layers feed deepstack features to as many decoder layers.
        spatial = rotary_pairs * 5 // 16
        text["rope_parameters"]["mrope_section"] = [rotary_pairs - 2 * spatial, spatial, spatial]
        text["rope_parameters"]["mrope_interleaved"] = True
        text["head_dim"] = head_dim
        vision = {"depth": size.vision_depth, "hidden_size": size.vision_hidden,
                  "intermediate_size": 2 * size.vision_hidden, "num_heads": size.vision_heads,
                  "out_hidden_size": size.text_hidden, "patch_size": PATCH_SIZES[family],
                  "num_position_embeddings": 256,
                  "deepstack_visual_indexes": list(range(size.vision_depth))[-3:],
                  "initializer_range": 0.2}
        if family == "qwen3_vl_moe":  # every decoder layer: 4 experts, 2 per token
            text.update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                        moe_intermediate_size=size.text_intermediate // 4, mlp_only_layers=[])
    elif family == "qwen2_5_vl":
        # window_size 56 px = 2x2 merged tokens, so images of 112 px and up use several windows
        vision = {"depth": size.vision_depth, "hidden_size": size.vision_hidden,
                  "intermediate_size": 2 * size.vision_hidden, "num_heads": size.vision_heads,
                  "out_hidden_size": size.text_hidden, "window_size": 56,
                  "fullatt_block_indexes": [size.vision_depth - 1], "initializer_range": 0.2}
    else:
        raise ValueError(f"unknown family {family!r} (choose from {', '.join(FAMILY_CONFIGS)})")
    config = FAMILY_CONFIGS[family](
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"])
    config.initializer_range = 0.2
    return config


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder to write the checkpoint to")
    parser.add_argument("--family", choices=tuple(FAMILY_CONFIGS), default="qwen2_vl")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(make_tiny_model(args.dir, args.family, args.size, args.seed))
    return 0
