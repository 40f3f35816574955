"""The two halves of a vision-language model, as the servers see them.

An ``EncoderHalf`` (encode server) turns chat messages into the language model's input:
per-token embeddings with image features merged in, token ids and M-RoPE positions. A
``LanguageHalf`` (language server) takes those and generates. Each half loads only its own
weights from an ordinary Hugging Face checkpoint folder; ``from_pretrained`` on either base
class picks the implementation for the checkpoint's ``model_type``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmdisagg.config import ImageSettings
from mmdisagg.core import EncodedPrompt, ImageSpan, PromptInput, block_hashes, tail_images
from mmdisagg.models.image_cache import ImageCache
from mmdisagg.models.kv_cache import KVLayout, PagedKVCache

# model_type in config.json -> module with ``ENCODER_HALF`` and ``LANGUAGE_HALF`` classes.
FAMILY_MODULES = {
    "qwen2_vl": "mmdisagg.models.qwen2_vl",
    "qwen2_5_vl": "mmdisagg.models.qwen2_vl",
    "qwen3_vl": "mmdisagg.models.qwen3_vl",
    "qwen3_vl_moe": "mmdisagg.models.qwen3_vl",
}


def family_module(path: str | Path) -> Any:
    """The module implementing the checkpoint's family; a clear error for one we do not serve."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in FAMILY_MODULES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(FAMILY_MODULES[model_type])


@dataclass(eq=False)
class PreparedImage:
    """One image or video after its processor, before the vision tower (a video is a stack of
    frames: more patches along time)."""

    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]  # patches along time, height, width
    content_hash: str  # of the pixels the vision tower sees: image-cache and prefix-cache key
    num_tokens: int  # placeholder tokens it fills in the prompt (patches / merge_size**2)
    placeholder_id: int  # the token it fills: the image or the video placeholder
    time_step: float = 1.0  # M-RoPE time position per temporal patch (Qwen2.5-VL videos: more)

    @property
    def nbytes(self) -> int:
        return self.pixel_values.nbytes


@dataclass(eq=False)
class PreparedPrompt:
    """A tokenized request with its images and videos processed: everything but the vision
    forward."""

    token_ids: torch.Tensor  # [L], each placeholder already expanded to its num_tokens
    images: list[PreparedImage]  # images and videos, in prompt order
    image_starts: list[int]  # the token each one's placeholders start at

    def __post_init__(self) -> None:
        if len(self.image_starts) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.image_starts)} starts")

    @property
    def total_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def image_spans(self) -> list[ImageSpan]:
        return [ImageSpan(start, start + image.num_tokens, image.content_hash)
                for image, start in zip(self.images, self.image_starts, strict=True)]

    def block_hashes(self) -> list[bytes]:
        """The prefix cache's keys (``core.block_hashes``)."""
        return block_hashes(self.token_ids.tolist(), self.image_spans())

    def tail_images(self) -> list[ImageSpan]:
        """What a language server needs besides ``block_hashes`` to hash the tokens it will
        generate after this prompt (``core.tail_images``)."""
        return tail_images(self.image_spans(), self.total_tokens)

    def images_after(self, token: int) -> list[PreparedImage]:
        """The images not wholly inside the first ``token`` tokens: those a prompt whose
        first ``token`` tokens are cached still needs the vision tower for."""
        return [image for image, start in zip(self.images, self.image_starts, strict=True)
                if start + image.num_tokens > token]


def pixel_hash(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int],
               time_step: float = 1.0) -> str:
    """Content key of a processed image or video: equal keys, equal vision features and
    positions."""
    digest = hashlib.blake2b(f"{grid_thw}/{time_step!r}".encode(), digest_size=16)
    digest.update(pixel_values.contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass(eq=False)
class PagedRows:
    """Sequences whose new tokens attend to their cached keys and values through block tables.

    ``block_tables [rows, max_blocks]`` (padded with any valid block id) and ``mask [rows, 1,
    queries, max_blocks * block_size]``: True where a query may see a key (its own sequence,
    causal, within the cached length). Built once per step, shared by every layer.
    """

    block_tables: torch.Tensor
    mask: torch.Tensor


@dataclass(eq=False)
class PrefillRows(PagedRows):
    """Prefill chunks, padded to the longest: ``query_index [n]`` is where each chunk token
    sits in the flattened ``[rows * max_query]`` padded queries."""

    query_index: torch.Tensor
    max_query: int


@dataclass(eq=False)
class ForwardBatch:
    """The new tokens of several sequences for one forward pass: decode rows first (one token
    each), then prefill chunks, in the order of ``last_rows``.

    ``embeddings [n, hidden]``, ``positions [n, 3]`` (M-RoPE t/h/w), ``slots [n]``: the KV
    cache slot (``block * block_size + offset``) each token's keys and values go to;
    ``last_rows [sequences]``: each sequence's last token among the n. Models with deepstack
    features: ``visual_rows [v]`` (which of the n tokens have them) and ``deepstack [layers, v,
    hidden]`` (None when no token of the batch has any).
    """

    embeddings: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    last_rows: torch.Tensor
    decode: PagedRows | None
    prefill: PrefillRows | None
    visual_rows: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None

    @property
    def num_decode(self) -> int:
        return 0 if self.decode is None else int(self.decode.block_tables.shape[0])


class ImageFeatureCache(Protocol):
    """Where ``EncoderHalf.encode`` looks up and stores per-image vision features."""

    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, value: torch.Tensor) -> None: ...


class EncoderHalf(ABC):
    """Image processor, tokenizer, vision tower and token embedding table: never the decoder.

    Attributes: ``hidden_size`` and ``dtype`` of the embeddings it produces, the ``device`` it
    runs on, ``tokenizer``, ``deepstack_layers``: how many deepstack rows each visual token
    of an ``EncodedPrompt`` has (0: the model has none), ``images_encoded``: images run
    through the vision tower so far, and ``prepared_images``: processed images by their bytes
    (``--prepared-image-cache-bytes``; None: off).
    """

    deepstack_layers: int = 0
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    tokenizer: Any
    images_encoded: int = 0
    prepared_images: ImageCache[PreparedImage] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu",
                        image_settings: ImageSettings | None = None,
                        max_model_len: int | None = None) -> EncoderHalf:
        """Load the encoder half of the checkpoint at ``path``. ``dtype`` None or "auto" keeps
        the checkpoint's; ``image_settings`` (an ``ImageSettings``) bounds what ``prepare``
        accepts; prompts of ``max_model_len`` tokens or more are refused."""
        return family_module(path).ENCODER_HALF.load(
            path, dtype=dtype, device=device, image_settings=image_settings,
            max_model_len=max_model_len)

    @abstractmethod
    def prepare(self, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None) -> PreparedPrompt:
        """Tokenize OpenAI-style chat messages (and ``tools``) through the chat template (with
        the assistant turn opened) and fetch, check and process their images; no vision forward
        yet, so ``total_tokens`` is known early.

        Raises ``InputError`` (with a client-readable ``message`` and ``status``) for anything
        the request itself got wrong: malformed messages, bad or too many images, a prompt
        longer than the model takes, tools the chat template cannot render."""

    @abstractmethod
    def prepare_text(self, prompt: str | Sequence[int]) -> PreparedPrompt:
        """A raw completion prompt, text or token ids, as is: no chat template, no images."""

    def prepare_input(self, prompt: PromptInput) -> PreparedPrompt:
        if prompt.text is not None:
            return self.prepare_text(prompt.text)
        return self.prepare(prompt.messages, prompt.tools)

    @torch.no_grad()
    def encode(self, batch: Sequence[PreparedPrompt], cache: ImageFeatureCache | None = None,
               max_patches: int = 0, cached_tokens: Sequence[int] | None = None
               ) -> list[EncodedPrompt]:
        """Run the vision tower over every image and video in ``batch`` (``image_features``)
        and merge the features into each prompt (``merge``).

        ``cached_tokens[i]``: the language side holds prompt i's first tokens; images and
        videos wholly inside them skip the vision tower and their embedding rows are left
        zero (they are never used)."""
        skips = cached_tokens or [0] * len(batch)
        needed = [prompt.images_after(skip) for prompt, skip in zip(batch, skips, strict=True)]
        features = self.image_features([image for images in needed for image in images],
                                       cache, max_patches)
        return [self.merge(prompt, images, features)
                for prompt, images in zip(batch, needed, strict=True)]

    @abstractmethod
    def image_features(self, images: Sequence[PreparedImage], cache: ImageFeatureCache | None,
                       max_patches: int) -> dict[str, torch.Tensor]:
        """Vision features of every distinct image and video (by ``content_hash``): from
        ``cache``, or from forwards of the vision tower of at most ``max_patches`` patches
        (0: one forward; a video is cut between its temporal patches, an image larger than the
        bound goes alone), stored in ``cache``."""

    @abstractmethod
    def merge(self, prompt: PreparedPrompt, encoded: Sequence[PreparedImage],
              features: Mapping[str, torch.Tensor], into: EncodedPrompt | None = None
              ) -> EncodedPrompt:
        """The prompt's token embeddings with the features of its ``encoded`` images in place
        (the rows of its other images left zero), its M-RoPE positions and ``mrope_delta``.
        ``into``, an earlier merge of this prompt, gets just the ``encoded`` images' rows: a
        prompt encoded in stages embeds its text and computes its positions once."""

    @property
    @abstractmethod
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        """Checkpoint tensor name -> tensor held: what this half loaded, and nothing else."""


class LanguageHalf(ABC):
    """Decoder layers, final norm, LM head and token embedding table: never the vision tower.

    Attributes: ``hidden_size``, ``dtype``, ``device``, ``eos_token_ids``, ``max_model_len``,
    ``tokenizer``, ``vocab_size`` (the logits' width). Positions are ``[n, 3]`` (M-RoPE
    t/h/w). A decoded token sits at ``tokens so far + mrope_delta`` on all three rows.
    ``deepstack_layers``: how many decoder layers take deepstack features (0: none).
    """

    deepstack_layers: int = 0
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: frozenset[int]
    max_model_len: int
    tokenizer: Any
    vocab_size: int

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu",
                        max_model_len: int | None = None) -> LanguageHalf:
        """Load the language half of the checkpoint at ``path``. ``dtype`` None or "auto" keeps
        the checkpoint's; ``max_model_len`` None or 0 means the model's own limit."""
        return family_module(path).LANGUAGE_HALF.load(
            path, dtype=dtype, device=device, max_model_len=max_model_len)

    @property
    @abstractmethod
    def kv_layout(self) -> KVLayout:
        """What one token's keys and values take, for sizing the paged KV cache."""

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` token ids -> ``[n, hidden]`` input embeddings (for decoded tokens)."""

    @abstractmethod
    def forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        """Run the decoder over ``batch`` in one pass, writing each new token's keys and values
        into its slot of ``cache``. Returns the final-norm hidden state of each sequence's last
        token, ``[sequences, hidden]``: the only rows worth an LM head.

        NOTE: layers run in one loop; ``after_layer`` is the place for a family that adds
        something to the hidden states after a layer (Qwen3-VL's deepstack features)."""

    def after_layer(self, layer: int, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """``hidden [n, hidden]`` after decoder layer ``layer``; the default changes nothing."""
        return hidden

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[b, hidden]`` -> float32 ``[b, vocab]``."""

    @property
    @abstractmethod
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        """Checkpoint tensor name -> tensor held: what this half loaded, and nothing else."""
