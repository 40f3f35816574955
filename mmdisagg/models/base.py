"""The two halves of a vision-language model, as the servers see them.

An ``EncoderHalf`` (encode server) turns chat messages into the language model's input:
per-token embeddings with image features merged in, token ids and M-RoPE positions. A
``LanguageHalf`` (language server) takes those and generates. Each half loads only its own
weights from an ordinary Hugging Face checkpoint folder; ``from_pretrained`` on either base
class picks the implementation for the checkpoint's ``model_type``.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mmdisagg.config import ImageSettings
from mmdisagg.core import EncodedPrompt
from mmdisagg.models.kv_cache import KVCache

# model_type in config.json -> module with ``ENCODER_HALF`` and ``LANGUAGE_HALF`` classes.
FAMILY_MODULES = {
    "qwen2_vl": "mmdisagg.models.qwen2_vl",
    "qwen2_5_vl": "mmdisagg.models.qwen2_vl",
    "qwen3_vl": "mmdisagg.models.qwen3_vl",
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
    """One image after the image processor, before the vision tower."""

    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]  # patches along time, height, width
    content_hash: str  # of the encoded bytes: the image-cache key
    num_tokens: int  # placeholder tokens it fills in the prompt (patches / merge_size**2)


@dataclass(eq=False)
class PreparedPrompt:
    """A tokenized request with its images processed: everything but the vision forward."""

    token_ids: torch.Tensor  # [L], each image placeholder already expanded to its num_tokens
    images: list[PreparedImage]

    @property
    def total_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@dataclass(eq=False)
class Chunk:
    """Tokens appended to one sequence in one forward pass: a whole prompt, part of one, or one
    decoded token."""

    cache: KVCache
    embeddings: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [n, 3]
    deepstack: torch.Tensor | None = None  # [layers, visual tokens among the n, hidden]
    visual_mask: torch.Tensor | None = None  # [n] bool, where deepstack is given


class ImageFeatureCache(Protocol):
    """Where ``EncoderHalf.encode`` looks up and stores per-image vision features."""

    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, value: torch.Tensor) -> None: ...


class EncoderHalf(ABC):
    """Image processor, tokenizer, vision tower and token embedding table: never the decoder.

    Attributes: ``hidden_size`` and ``dtype`` of the embeddings it produces, the ``device`` it
    runs on, ``tokenizer``, and ``deepstack_layers``: how many deepstack rows each visual token
    of an ``EncodedPrompt`` has (0: the model has none).
    """

    deepstack_layers: int = 0
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    tokenizer: Any

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
    def prepare(self, messages: Sequence[Mapping[str, Any]]) -> PreparedPrompt:
        """Tokenize OpenAI-style chat messages (with the assistant turn opened) and fetch, check
        and process their images; no vision forward yet, so ``total_tokens`` is known early.

        Raises ``InputError`` (with a client-readable ``message`` and ``status``) for anything
        the request itself got wrong: malformed messages, bad or too many images, a prompt
        longer than the model takes."""

    @abstractmethod
    def encode(self, batch: Sequence[PreparedPrompt],
               cache: ImageFeatureCache | None = None) -> list[EncodedPrompt]:
        """Run the vision tower once for every image in ``batch`` not found in ``cache`` (and
        store the new features there), merge the image features into the token embeddings and
        compute each prompt's M-RoPE positions and ``mrope_delta``."""

    @property
    @abstractmethod
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        """Checkpoint tensor name -> tensor held: what this half loaded, and nothing else."""


class LanguageHalf(ABC):
    """Decoder layers, final norm, LM head and token embedding table: never the vision tower.

    Attributes: ``hidden_size``, ``dtype``, ``device``, ``eos_token_ids``, ``max_model_len``,
    ``tokenizer``. Positions are ``[n, 3]`` (M-RoPE t/h/w). A decoded token sits at ``tokens so
    far + mrope_delta`` on all three rows. ``deepstack_layers``: how many decoder layers take
    deepstack features (0: none).
    """

    deepstack_layers: int = 0
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: frozenset[int]
    max_model_len: int
    tokenizer: Any

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu",
                        max_model_len: int | None = None) -> LanguageHalf:
        """Load the language half of the checkpoint at ``path``. ``dtype`` None or "auto" keeps
        the checkpoint's; ``max_model_len`` None or 0 means the model's own limit."""
        return family_module(path).LANGUAGE_HALF.load(
            path, dtype=dtype, device=device, max_model_len=max_model_len)

    @abstractmethod
    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""

    @abstractmethod
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` token ids -> ``[n, hidden]`` input embeddings (for decoded tokens)."""

    @abstractmethod
    def forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Run the decoder over several sequences' new tokens in one pass, appending them to
        each sequence's cache. Returns the final-norm hidden state of each chunk's last token,
        ``[len(chunks), hidden]``: the only rows worth an LM head."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[b, hidden]`` -> float32 ``[b, vocab]``."""

    @property
    @abstractmethod
    def loaded_weights(self) -> Mapping[str, torch.Tensor]:
        """Checkpoint tensor name -> tensor held: what this half loaded, and nothing else."""

    def prefill(self, cache: KVCache, embeddings: torch.Tensor, positions: torch.Tensor,
                deepstack: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append prompt tokens (all of them, or the next part) to ``cache``; return the
        ``[vocab]`` logits after the last one."""
        chunk = Chunk(cache, embeddings, positions, deepstack, visual_mask)
        return self.logits(self.forward([chunk]))[0]

    def decode(self, caches: Sequence[KVCache], token_ids: Sequence[int],
               mrope_deltas: Sequence[int]) -> torch.Tensor:
        """Feed one token to each sequence, in one batch; return ``[len(caches), vocab]``."""
        embeddings = self.embed(torch.tensor(list(token_ids), device=self.device))
        chunks = [Chunk(cache, embeddings[i:i + 1], decode_position(cache, delta, self.device))
                  for i, (cache, delta) in enumerate(zip(caches, mrope_deltas, strict=True))]
        return self.logits(self.forward(chunks))


def decode_position(cache: KVCache, mrope_delta: int, device: torch.device) -> torch.Tensor:
    """``[1, 3]`` position of the next token: tokens so far plus the prompt's M-RoPE offset, the
    same on all three rows."""
    return torch.full((1, 3), cache.length + mrope_delta, dtype=torch.long, device=device)
