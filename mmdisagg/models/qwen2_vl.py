"""Qwen2-VL and Qwen2.5-VL, split into an encoder half and a language half.

The two families differ only in their vision tower; chat format, M-RoPE and decoder are the
same, so one pair of classes serves both. The vision tower and decoder weights live in the
transformers modules (built on the meta device, then given only the tensors each half needs);
the decoder's forward pass is ours, so that sequences of different lengths run through the
layers in one batch against the paged KV cache: one attention call per layer for the decode
rows and one for the prefill chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from mmdisagg.config import ImageSettings
from mmdisagg.core import EncodedPrompt
from mmdisagg.models.base import (
    EncoderHalf,
    ForwardBatch,
    ImageFeatureCache,
    LanguageHalf,
    PagedRows,
    PrefillRows,
    PreparedImage,
    PreparedPrompt,
    pixel_hash,
)
from mmdisagg.models.errors import InputError
from mmdisagg.models.image_cache import ImageCache
from mmdisagg.models.images import decode_image, fetch_image
from mmdisagg.models.kv_cache import KVLayout, PagedKVCache
from mmdisagg.models.positions import mrope_positions
from mmdisagg.models.prompts import ChatPrompt, ImageRef, parse_messages
from mmdisagg.models.videos import QWEN2_VL, LoadedVideo, VideoRules, load_video
from mmdisagg.models.weights import CheckpointWeights


@dataclass(frozen=True)
class Family:
    vision_tower: type[nn.Module]
    text_model: type[nn.Module]
    # tensor name suffix -> (checkpoint tensor, module shape) -> module tensor, where the Hub
    # layout differs
    converters: Mapping[str, Callable[[torch.Tensor, torch.Size], torch.Tensor]] = field(
        default_factory=dict)


FAMILIES = {
    "qwen2_vl": Family(modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel,
                       modeling_qwen2_vl.Qwen2VLTextModel),
    "qwen2_5_vl": Family(modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel,
                         modeling_qwen2_5_vl.Qwen2_5_VLTextModel),
}

# Tensor name prefixes: the Hub layout (also what save_pretrained writes), then the in-memory one.
VISION_PREFIXES = ("visual.", "model.visual.")
TEXT_PREFIXES = ("model.", "model.language_model.")
EMBEDDING_PREFIXES = tuple(prefix + "embed_tokens." for prefix in TEXT_PREFIXES)
LM_HEAD_PREFIXES = ("lm_head.",)


@dataclass
class Checkpoint:
    """A checkpoint folder opened for loading one half on one device in one dtype."""

    path: Path
    config: PretrainedConfig
    family: Family
    weights: CheckpointWeights
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def open(cls, path: str | Path, dtype: torch.dtype | str | None,
             device: str | torch.device, families: Mapping[str, Family]) -> Checkpoint:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if getattr(config.text_config, "use_sliding_window", False):
            raise ValueError(f"{path}: sliding-window attention is not supported")
        return cls(Path(path), config, families[config.model_type], CheckpointWeights(path),
                   _resolve_dtype(dtype, config), torch.device(device))

    def load_module(self, build: Callable[[], nn.Module], prefixes: Sequence[str],
                    needed_by: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """Build a module without allocating its weights, then read just its tensors."""
        with torch.device("meta"):
            module = build()
        loaded = self.weights.load_into(module, prefixes, needed_by=needed_by, dtype=self.dtype,
                                        converters=self.family.converters,
                                        device=self.device)
        if isinstance(module, PreTrainedModel):
            _compute_buffers(module, self.device)
        return module.eval(), loaded

    def tokenizer(self) -> Any:
        """The tokenizer, given the processor's chat template when only that file has one."""
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        template_file = self.path / "chat_template.json"
        if tokenizer.chat_template is None and template_file.is_file():
            tokenizer.chat_template = json.loads(template_file.read_text())["chat_template"]
        return tokenizer

    def max_model_len(self, requested: int | None) -> int:
        return requested or self.config.text_config.max_position_embeddings


def _resolve_dtype(dtype: torch.dtype | str | None, config: PretrainedConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = config.dtype or torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"not a floating-point torch dtype: {dtype!r}")
    return resolved


def _compute_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: compute them
    the way transformers does after loading."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)


# NOTE: normalization may shrink text before tokenizing (NFC composes up to 3 bytes into 1);
# with this slack, text refused by its size alone could never have fit.
TEXT_SLACK = 4


def longest_token_bytes(tokenizer: Any) -> int:
    """UTF-8 bytes of the longest text one token stands for (special tokens included), so
    that n tokens never hold more than n times this."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    return max(len(text.encode()) for text in texts)


# What a placeholder token of the chat template becomes: token ids and images, in order.
Expansion = list[list[int] | PreparedImage]


class QwenVLEncoderHalf(EncoderHalf):
    FAMILIES = FAMILIES
    VIDEO_PROCESSOR = QWEN2_VL  # whose rules videos follow unless the checkpoint names another

    def __init__(self, *, checkpoint: Checkpoint, vision_tower: nn.Module,
                 embed_tokens: nn.Embedding, loaded_weights: dict[str, torch.Tensor],
                 image_settings: ImageSettings, max_model_len: int) -> None:
        config = checkpoint.config
        self.hidden_size = config.text_config.hidden_size
        self.dtype = checkpoint.dtype
        self.device = checkpoint.device
        self.tokenizer = checkpoint.tokenizer()
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{checkpoint.path}: no chat template (in the tokenizer files, "
                             "chat_template.jinja or chat_template.json)")
        self.image_processor = AutoImageProcessor.from_pretrained(
            checkpoint.path, local_files_only=True, backend="pil")
        self.vision_tower = vision_tower
        self.embed_tokens = embed_tokens
        self.video_rules = VideoRules.from_checkpoint(checkpoint.path, self.VIDEO_PROCESSOR)
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        # Qwen2.5-VL spaces a video's temporal patches by their timestamps; Qwen2-VL by one.
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", None)
        self.merge_size = config.vision_config.spatial_merge_size
        self.image_settings = image_settings
        cache_bytes = image_settings.prepared_image_cache_bytes
        # NOTE: shared by the threads that prepare requests; entries are never modified
        self.prepared_images: ImageCache[PreparedImage] | None = (
            ImageCache(cache_bytes) if cache_bytes else None)
        self.max_model_len = max_model_len
        self.max_text_bytes = max_model_len * longest_token_bytes(self.tokenizer) * TEXT_SLACK
        self._loaded_weights = loaded_weights

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu", image_settings: ImageSettings | None = None,
             max_model_len: int | None = None) -> QwenVLEncoderHalf:
        checkpoint = Checkpoint.open(path, dtype, device, cls.FAMILIES)
        config = checkpoint.config
        vision_tower, vision_weights = checkpoint.load_module(
            lambda: checkpoint.family.vision_tower._from_config(config.vision_config),
            VISION_PREFIXES, "encoder half (vision tower)")
        embed_tokens, embedding_weights = checkpoint.load_module(
            lambda: nn.Embedding(config.text_config.vocab_size, config.text_config.hidden_size),
            EMBEDDING_PREFIXES, "encoder half (token embeddings)")
        return cls(checkpoint=checkpoint, vision_tower=vision_tower, embed_tokens=embed_tokens,
                   loaded_weights=vision_weights | embedding_weights,
                   image_settings=image_settings or ImageSettings(),
                   max_model_len=checkpoint.max_model_len(max_model_len))

    @property
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        return self._loaded_weights

    def prepare(self, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> PreparedPrompt:
        chat = parse_messages(messages, tools)
        if chat.text_bytes > self.max_text_bytes:  # seconds of tokenizing, spared
            raise InputError(f"the prompt's text is {chat.text_bytes} bytes; this model takes "
                             f"fewer than {self.max_model_len} tokens (prompt and output "
                             f"together), which cannot hold more than {self.max_text_bytes}")
        limit = self.image_settings.max_images_per_request
        if len(chat.images) > limit:
            raise InputError(f"{len(chat.images)} images in one request; the limit is {limit}")
        limit = self.image_settings.max_videos_per_request
        if len(chat.video_urls) > limit:
            raise InputError(f"{len(chat.video_urls)} videos in one request; the limit is {limit}")
        text = self._render(chat)
        template_ids = self.tokenizer.encode(text, add_special_tokens=False)
        placed = template_ids.count(self.video_token_id)
        if chat.video_urls and not placed:
            raise InputError("this model's chat template has no place for videos")
        if placed != len(chat.video_urls):
            raise InputError("message text may not contain the video placeholder token")
        if template_ids.count(self.image_token_id) != len(chat.images):
            raise InputError("message text may not contain the image placeholder token")
        pending = {
            self.image_token_id: iter([[self._prepare_image(number, image)]
                                       for number, image in enumerate(chat.images, start=1)]),
            self.video_token_id: iter([self._prepare_video(number, url)
                                       for number, url in enumerate(chat.video_urls, start=1)]),
        }
        token_ids: list[int] = []
        image_starts: list[int] = []
        visuals: list[PreparedImage] = []
        for token_id in template_ids:
            if token_id not in pending:
                token_ids.append(token_id)
                continue
            for piece in next(pending[token_id]):
                if isinstance(piece, PreparedImage):
                    visuals.append(piece)
                    image_starts.append(len(token_ids))
                    token_ids.extend([piece.placeholder_id] * piece.num_tokens)
                else:
                    token_ids.extend(piece)
        return self._prompt(token_ids, visuals, image_starts)

    def prepare_text(self, prompt: str | Sequence[int]) -> PreparedPrompt:
        if isinstance(prompt, str):
            if len(prompt.encode()) > self.max_text_bytes:
                raise InputError(f"the prompt is {len(prompt.encode())} bytes; this model takes "
                                 f"fewer than {self.max_model_len} tokens")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(not 0 <= token < vocab for token in token_ids):
                raise InputError(f"prompt token ids must be in [0, {vocab})")
        if not token_ids:
            raise InputError("the prompt is empty")
        if self.image_token_id in token_ids or self.video_token_id in token_ids:
            raise InputError("a text prompt may not contain an image or video placeholder token")
        return self._prompt(token_ids, [], [])

    def _render(self, chat: ChatPrompt) -> str:
        """The chat template's text; tools the template would silently leave out are refused."""
        text = self.tokenizer.apply_chat_template(chat.messages, tools=chat.tools,
                                                  tokenize=False, add_generation_prompt=True)
        if chat.tools and text == self.tokenizer.apply_chat_template(
                chat.messages, tokenize=False, add_generation_prompt=True):
            raise InputError("this checkpoint's chat template does not render tools")
        return text

    def _prompt(self, token_ids: list[int], visuals: list[PreparedImage],
                image_starts: list[int]) -> PreparedPrompt:
        if len(token_ids) >= self.max_model_len:
            raise InputError(f"the prompt is {len(token_ids)} tokens; this model takes fewer than "
                             f"{self.max_model_len} (prompt and output together)")
        return PreparedPrompt(torch.tensor(token_ids, dtype=torch.long), visuals, image_starts)

    def _prepare_image(self, number: int, ref: ImageRef) -> PreparedImage:
        smallest = self.image_processor.size.shortest_edge  # the processor's minimum pixels
        budget = ({"size": {"shortest_edge": smallest, "longest_edge": smallest}}
                  if ref.detail == "low" else {})
        try:
            data = fetch_image(ref.url, self.image_settings)
            key = f"{ref.detail == 'low'}/{hashlib.blake2b(data, digest_size=16).hexdigest()}"
            known = self.prepared_images.get(key) if self.prepared_images is not None else None
            if known is not None:
                return known
            image = decode_image(data, self.image_settings)
            features = self.image_processor(images=[image], return_tensors="pt", **budget)
        except InputError as exc:
            raise InputError(f"image {number}: {exc.message}", exc.status) from None
        except ValueError as exc:  # e.g. an aspect ratio the processor cannot resize
            raise InputError(f"image {number}: {exc}") from None
        grid = tuple(int(size) for size in features["image_grid_thw"][0])
        prepared = PreparedImage(pixel_values=features["pixel_values"], grid_thw=grid,
                                 content_hash=pixel_hash(features["pixel_values"], grid),
                                 num_tokens=grid[0] * grid[1] * grid[2] // self.merge_size**2,
                                 placeholder_id=self.image_token_id)
        if self.prepared_images is not None:
            self.prepared_images.put(key, prepared)
        return prepared

    def _load_video(self, number: int, url: str) -> LoadedVideo:
        try:
            return load_video(url, self.image_settings, self.video_rules, self.max_model_len)
        except InputError as exc:
            raise InputError(f"video {number}: {exc.message}", exc.status) from None

    def _prepare_video(self, number: int, url: str) -> Expansion:
        """What the video's placeholder token becomes: here one run of video tokens."""
        video = self._load_video(number, url)
        time_step = 1.0
        if self.tokens_per_second is not None:  # NOTE: float32, as generate() computes it
            time_step = float(torch.tensor(video.seconds_per_grid, dtype=torch.float32)
                              * self.tokens_per_second)
        t, h, w = video.grid_thw
        return [PreparedImage(pixel_values=video.pixel_values, grid_thw=video.grid_thw,
                              content_hash=pixel_hash(video.pixel_values, video.grid_thw,
                                                      time_step),
                              num_tokens=t * h * w // self.merge_size**2,
                              placeholder_id=self.video_token_id, time_step=time_step)]

    @torch.no_grad()
    def image_features(self, images: Sequence[PreparedImage], cache: ImageFeatureCache | None,
                       max_patches: int) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, PreparedImage] = {}
        for image in images:
            key = image.content_hash
            if key in found or key in missing:
                continue
            cached = cache.get(key) if cache is not None else None
            if cached is None:
                missing[key] = image
            else:
                found[key] = cached
        self.images_encoded += len(missing)
        pieces: dict[str, list[torch.Tensor]] = {key: [] for key in missing}
        for forward in _forwards(missing, max_patches):
            pixel_values = torch.cat([piece.pixel_values for piece in forward])
            grids = torch.tensor([piece.grid_thw for piece in forward], device=self.device)
            merged = self._vision_forward(pixel_values.to(self.device, self.dtype), grids)
            sizes = [piece.pixel_values.shape[0] // self.merge_size**2 for piece in forward]
            for piece, rows in zip(forward, merged.split(sizes), strict=True):
                pieces[piece.key].append(rows)
        for key, rows in pieces.items():
            found[key] = torch.cat(rows) if len(rows) > 1 else rows[0].clone()
            if cache is not None:
                cache.put(key, found[key])
        return found

    def _vision_forward(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """Image tokens' features, ``[tokens, 1 + deepstack_layers, hidden]``: the input
        embedding, then (a subclass's) deepstack rows."""
        return self.vision_tower(pixel_values, grid_thw=grids).pooler_output[:, None]

    @torch.no_grad()
    def merge(self, prompt: PreparedPrompt, encoded: Sequence[PreparedImage],
              features: Mapping[str, torch.Tensor], into: EncodedPrompt | None = None
              ) -> EncodedPrompt:
        if into is None:
            token_ids = prompt.token_ids.to(self.device)
            positions, mrope_delta = mrope_positions(prompt.token_ids, prompt.images,
                                                     self.merge_size)
            into = EncodedPrompt(self.embed_tokens(token_ids), token_ids,
                                 positions.to(self.device), mrope_delta)
            visual_rows = (token_ids == self.image_token_id) | (token_ids == self.video_token_id)
            into.embeddings[visual_rows] = 0
            if self.deepstack_layers:
                into.visual_mask = visual_rows
                into.deepstack = into.embeddings.new_zeros(
                    self.deepstack_layers, int(visual_rows.sum()), self.hidden_size)
        visual = 0  # the image's first row among the prompt's visual tokens (deepstack rows)
        for image, start in zip(prompt.images, prompt.image_starts, strict=True):
            if image in encoded:
                rows = features[image.content_hash]
                count = image.num_tokens
                into.embeddings[start:start + count] = rows[:, 0]
                if self.deepstack_layers:
                    into.deepstack[:, visual:visual + count] = rows[:, 1:].transpose(0, 1)
            visual += image.num_tokens
        return into


@dataclass(frozen=True)
class Piece:
    """Whole temporal patches of one image or video: what one vision forward may take of it."""

    key: str
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]


def _forwards(images: Mapping[str, PreparedImage], max_patches: int) -> list[list[Piece]]:
    """``images`` packed into vision forwards of at most ``max_patches`` patches (0: one).

    NOTE: the vision tower attends within one temporal patch at a time (Qwen2-VL's and
    Qwen2.5-VL's ``cu_seqlens`` restart at every one; rotary positions are spatial), so a video
    cut between temporal patches gives the same features as whole."""
    pieces = []
    for key, image in images.items():
        t, h, w = image.grid_thw
        step = t if not max_patches else max(1, min(t, max_patches // (h * w)))
        pieces += [Piece(key, image.pixel_values[start * h * w:(start + n) * h * w], (n, h, w))
                   for start in range(0, t, step) for n in [min(step, t - start)]]
    forwards: list[list[Piece]] = []
    patches = 0
    for piece in pieces:
        size = piece.pixel_values.shape[0]
        if not forwards or (max_patches and patches + size > max_patches):
            forwards.append([])
            patches = 0
        forwards[-1].append(piece)
        patches += size
    return forwards


class QwenVLLanguageHalf(LanguageHalf):
    FAMILIES = FAMILIES

    def __init__(self, *, checkpoint: Checkpoint, text_model: nn.Module, lm_head: nn.Linear,
                 loaded_weights: dict[str, torch.Tensor], max_model_len: int) -> None:
        text_config = checkpoint.config.text_config
        self.hidden_size = text_config.hidden_size
        self.dtype = checkpoint.dtype
        self.device = checkpoint.device
        self.tokenizer = checkpoint.tokenizer()
        self.eos_token_ids = _eos_token_ids(checkpoint)
        self.vocab_size = lm_head.out_features
        self.max_model_len = max_model_len
        self.text_model = text_model
        self.lm_head = lm_head
        self.num_kv_heads = text_config.num_key_value_heads
        self.head_dim = (getattr(text_config, "head_dim", None)
                         or text_config.hidden_size // text_config.num_attention_heads)
        self._loaded_weights = loaded_weights

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu",
             max_model_len: int | None = None) -> QwenVLLanguageHalf:
        checkpoint = Checkpoint.open(path, dtype, device, cls.FAMILIES)
        text_config = checkpoint.config.text_config
        text_model, text_weights = checkpoint.load_module(
            lambda: checkpoint.family.text_model._from_config(text_config), TEXT_PREFIXES,
            "language half (decoder)")
        if checkpoint.config.tie_word_embeddings:
            lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False,
                                device="meta")
            lm_head.weight = text_model.embed_tokens.weight
            head_weights: dict[str, torch.Tensor] = {}
        else:
            lm_head, head_weights = checkpoint.load_module(
                lambda: nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False),
                LM_HEAD_PREFIXES, "language half (LM head)")
        return cls(checkpoint=checkpoint, text_model=text_model, lm_head=lm_head,
                   loaded_weights=text_weights | head_weights,
                   max_model_len=checkpoint.max_model_len(max_model_len))

    @property
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        return self._loaded_weights

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(len(self.text_model.layers), self.num_kv_heads, self.head_dim, self.dtype)

    @torch.no_grad()
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(token_ids.to(self.device))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        hidden = batch.embeddings.to(self.device, self.dtype)
        position_embeddings = self.text_model.rotary_emb(hidden, batch.positions.T[:, None, :])
        for index, layer in enumerate(self.text_model.layers):
            attention = self._attention(index, layer.self_attn, layer.input_layernorm(hidden),
                                        position_embeddings, batch, cache)
            hidden = hidden + attention
            hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
            hidden = self.after_layer(index, hidden, batch)
        return self.text_model.norm(hidden[batch.last_rows])

    def _mlp(self, mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """A layer's MLP over ``[n, hidden]``."""
        return mlp(hidden)

    def _project(self, attention: nn.Module, hidden: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values ``[1, heads, n, head_dim]`` of all tokens at once."""
        shape = (1, hidden.shape[0], -1, self.head_dim)
        return (attention.q_proj(hidden).view(shape).transpose(1, 2),
                attention.k_proj(hidden).view(shape).transpose(1, 2),
                attention.v_proj(hidden).view(shape).transpose(1, 2))

    def _attention(self, layer: int, attention: nn.Module, hidden: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
                   cache: PagedKVCache) -> torch.Tensor:
        """Projections and rotary embedding over all tokens at once; new keys and values into
        their slots with one index op each; then one attention call for the decode rows (on CPU
        over the decode workspace) and one for the prefill chunks (through block tables)."""
        count = hidden.shape[0]
        queries, keys, values = self._project(attention, hidden)
        queries, keys = modeling_qwen2_vl.apply_rotary_pos_emb(queries, keys, *position_embeddings)
        key_slots, value_slots = cache.slots(layer)
        key_slots.index_copy_(0, batch.slots, keys[0].transpose(0, 1))
        value_slots.index_copy_(0, batch.slots, values[0].transpose(0, 1))
        queries = queries[0].transpose(0, 1)  # [n, heads, head_dim]
        decoded = batch.num_decode
        outputs = []
        if batch.decode is not None:
            outputs.append(self._decode_attention(
                queries[:decoded], keys[0, :, :decoded].transpose(0, 1),
                values[0, :, :decoded].transpose(0, 1), layer, cache, batch.decode,
                attention.scaling))
        if batch.prefill is not None:
            outputs.append(self._prefill_attention(queries[decoded:], layer, cache,
                                                   batch.prefill, attention.scaling))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return attention.o_proj(output.reshape(count, -1))

    @staticmethod
    def _gather(layer: int, cache: PagedKVCache, rows: PagedRows
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's cached keys and values through its block table, ``[rows, kv_heads,
        max_blocks * block_size, head_dim]``."""
        keys, values = cache.gather(layer, rows.block_tables)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def _decode_attention(self, queries: torch.Tensor, new_keys: torch.Tensor,
                          new_values: torch.Tensor, layer: int, cache: PagedKVCache,
                          rows: PagedRows, scale: float) -> torch.Tensor:
        """``queries [rows, heads, head_dim]``, one token per row (``new_keys``/``new_values``
        ``[rows, kv_heads, head_dim]``, already in the pool). On CPU the keys come from the
        decode workspace, on other devices through the block tables. The query heads sharing
        a KV head go in as that head's queries, so the keys are not repeated per group (what
        ``enable_gqa`` does on CPU): 3x faster at batch 256."""
        count, heads, _ = queries.shape
        if cache.decode is not None:
            keys, values = cache.decode.append(layer, new_keys, new_values, rows.mask.shape[-1])
        else:
            keys, values = self._gather(layer, cache, rows)
        grouped = queries.view(count, self.num_kv_heads, heads // self.num_kv_heads,
                               self.head_dim)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=rows.mask,
                                                scale=scale)
        return output.reshape(count, heads, self.head_dim)

    def _prefill_attention(self, queries: torch.Tensor, layer: int, cache: PagedKVCache,
                           rows: PrefillRows, scale: float) -> torch.Tensor:
        """``queries [n, heads, head_dim]`` of every prefill chunk, padded to the longest chunk
        for one call, then unpadded."""
        count = rows.block_tables.shape[0]
        heads = queries.shape[1]
        padded = queries.new_zeros(count * rows.max_query, heads, self.head_dim)
        padded.index_copy_(0, rows.query_index, queries)
        keys, values = self._gather(layer, cache, rows)
        output = F.scaled_dot_product_attention(
            padded.view(count, rows.max_query, heads, self.head_dim).transpose(1, 2), keys,
            values, attn_mask=rows.mask, scale=scale, enable_gqa=True)
        return output.transpose(1, 2).reshape(count * rows.max_query, heads,
                                              self.head_dim)[rows.query_index]


def _eos_token_ids(checkpoint: Checkpoint) -> frozenset[int]:
    """The ids ``generate()`` stops at: generation_config.json's, else the config's."""
    generation_file = checkpoint.path / "generation_config.json"
    eos: int | list[int] | None = None
    if generation_file.is_file():
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
    if eos is None:
        eos = checkpoint.config.text_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


ENCODER_HALF = QwenVLEncoderHalf
LANGUAGE_HALF = QwenVLLanguageHalf
