"""Qwen3-VL (dense), split into an encoder half and a language half.

Chat format, image processing, checkpoint loading and the batched decoder pass are Qwen2-VL's
(``qwen2_vl``); three things differ, and only they live here:

* **deepstack**: besides each image token's input embedding, the vision tower emits one feature
  per layer in ``deepstack_visual_indexes``; the decoder adds the k-th to the image tokens'
  hidden states after its k-th layer. The encoder half returns them as
  ``EncodedPrompt.deepstack`` (the pool and every data plane carry them, for visual tokens
  only; ``ModelRunner`` hands each forward pass those of its tokens), the language half adds
  them (``after_layer``).
* each attention head normalizes its queries and keys (Qwen3's ``q_norm``/``k_norm``);
* M-RoPE is interleaved (t, h, w frequencies alternate): transformers' rotary module does it.

Image positions follow the same rule as Qwen2-VL's (``models/positions.py``). Videos: Qwen3-VL
writes each temporal patch ("frame group") as ``<t seconds><|vision_start|>`` + its tokens +
``<|vision_end|>`` and positions it as an image of t = 1 (``get_rope_index`` splits a video's
grid that way; the timestamps are ordinary text). ``_prepare_video`` therefore makes one
``PreparedImage`` of grid ``(1, h, w)`` per frame group: positions, the vision forward (which
attends within one temporal patch at a time anyway), the image cache, the prefix cache's spans
and the transfer see a run of small images.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe

from mmdisagg.models.base import ForwardBatch, PreparedImage, pixel_hash
from mmdisagg.models.qwen2_vl import (
    Checkpoint,
    Expansion,
    Family,
    QwenVLEncoderHalf,
    QwenVLLanguageHalf,
)
from mmdisagg.models.videos import QWEN3_VL

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def experts_as_held(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The Hub stores each MoE layer's experts as ``[experts, in, out]``, transformers'
    module holds ``[experts, out, in]`` (and saves it so): take either, as transformers does."""
    return tensor if tensor.shape == shape else tensor.transpose(1, 2)


FAMILIES = {
    "qwen3_vl": Family(modeling_qwen3_vl.Qwen3VLVisionModel, modeling_qwen3_vl.Qwen3VLTextModel),
    "qwen3_vl_moe": Family(modeling_qwen3_vl_moe.Qwen3VLMoeVisionModel,
                           modeling_qwen3_vl_moe.Qwen3VLMoeTextModel,
                           dict.fromkeys(EXPERTS, experts_as_held)),
}


def deepstack_layers(checkpoint: Checkpoint) -> int:
    return len(checkpoint.config.vision_config.deepstack_visual_indexes)


class Qwen3VLEncoderHalf(QwenVLEncoderHalf):
    FAMILIES = FAMILIES
    VIDEO_PROCESSOR = QWEN3_VL

    def __init__(self, *, checkpoint: Checkpoint, **parts) -> None:
        super().__init__(checkpoint=checkpoint, **parts)
        self.deepstack_layers = deepstack_layers(checkpoint)
        self.vision_start_token_id = checkpoint.config.vision_start_token_id
        self.vision_end_token_id = checkpoint.config.vision_end_token_id

    def _prepare_video(self, number: int, url: str) -> Expansion:
        """``<t seconds><|vision_start|>`` frame group ``<|vision_end|>``, for each temporal
        patch (``Qwen3VLProcessor.replace_video_token``)."""
        video = self._load_video(number, url)
        _, h, w = video.grid_thw
        patches = h * w
        expansion: Expansion = []
        for index, seconds in enumerate(video.timestamps):
            pixels = video.pixel_values[index * patches:(index + 1) * patches]
            timestamp = self.tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False)
            expansion += [
                [*timestamp, self.vision_start_token_id],
                PreparedImage(pixel_values=pixels, grid_thw=(1, h, w),
                              content_hash=pixel_hash(pixels, (1, h, w)),
                              num_tokens=patches // self.merge_size**2,
                              placeholder_id=self.video_token_id),
                [self.vision_end_token_id]]
        return expansion

    def _vision_forward(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        output = self.vision_tower(pixel_values, grid_thw=grids)
        return torch.stack([output.pooler_output, *output.deepstack_features], dim=1)


class Qwen3VLLanguageHalf(QwenVLLanguageHalf):
    FAMILIES = FAMILIES

    def __init__(self, *, checkpoint: Checkpoint, **parts) -> None:
        super().__init__(checkpoint=checkpoint, **parts)
        self.deepstack_layers = deepstack_layers(checkpoint)

    def after_layer(self, layer: int, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Deepstack: after each of the first layers, the visual tokens' features for it."""
        if batch.deepstack is None or layer >= batch.deepstack.shape[0]:
            return hidden
        return hidden.index_add(0, batch.visual_rows, batch.deepstack[layer])

    def _mlp(self, mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The MoE block of ``qwen3_vl_moe`` takes ``[batch, tokens, hidden]``; the dense MLP
        either."""
        return mlp(hidden[None])[0]

    def _project(self, attention: nn.Module, hidden: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (1, hidden.shape[0], -1, self.head_dim)
        return (attention.q_norm(attention.q_proj(hidden).view(shape)).transpose(1, 2),
                attention.k_norm(attention.k_proj(hidden).view(shape)).transpose(1, 2),
                attention.v_proj(hidden).view(shape).transpose(1, 2))


ENCODER_HALF = Qwen3VLEncoderHalf
LANGUAGE_HALF = Qwen3VLLanguageHalf
