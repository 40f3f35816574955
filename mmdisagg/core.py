"""Types and process conventions shared by every role. Imports nothing else of mmdisagg."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class GrammarSpec:
    """Output constrained to compact JSON that matches ``json_schema`` (JSON text), written
    between the literal texts ``begin`` and ``end`` (a tool call's tags), then a stop token."""

    json_schema: str
    begin: str = ""
    end: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy. The OpenAI fields keep their
    OpenAI meaning; ``logprobs`` is how many alternatives to report per token (None: no
    logprobs); ``n`` choices share one prompt, choice i seeded with ``seed + i``."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    n: int = 1
    grammar: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class PromptInput:
    """What a request asks to have encoded: chat ``messages`` (and ``tools``) rendered by the
    chat template, or, when ``text`` is set, a raw completion prompt (a string or token ids)
    taken as is."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    text: str | list[int] | None = None


@dataclass(eq=False)
class EncodedPrompt:
    """What the encode side produces and the language side consumes, for one whole prompt.

    ``embeddings [L, H]`` are the language model's input embeddings (image features merged in),
    ``token_ids [L]`` the prompt's token ids (image placeholders included), ``positions [L, 3]``
    the M-RoPE t/h/w position ids (1-D models repeat one value), and ``mrope_delta`` the offset
    that decode positions add to the number of tokens so far.

    Models with deepstack features (Qwen3-VL) also have ``visual_mask [L]`` (bool: the visual
    tokens) and ``deepstack [layers, visual tokens, H]``: what the decoder adds to the visual
    tokens' hidden states after each of its first ``layers`` layers. Both None otherwise.
    """

    embeddings: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    mrope_delta: int = 0
    deepstack: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    # Set when a language server already holds the prompt's first ``prefix.tokens`` tokens
    # (prefix cache). The tensors above then start at token ``first_token`` (<= those: the
    # rows between are never used), not at token 0.
    prefix: PrefixHit | None = None
    first_token: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # core.block_hashes of the prompt
    tail_images: list[ImageSpan] = field(default_factory=list)  # core.tail_images of it

    @property
    def total_tokens(self) -> int:
        """Tokens in the tensors (the whole prompt's, when nothing was cached)."""
        return int(self.token_ids.shape[0])

    @property
    def cached_tokens(self) -> int:
        return self.prefix.tokens if self.prefix is not None else 0

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the whole prompt, the cached ones included."""
        return self.first_token + self.total_tokens

    def whole_token_ids(self) -> list[int]:
        """The whole prompt's token ids, those of a cached prefix included."""
        cached = self.prefix.token_ids if self.prefix is not None else []
        return cached + self.token_ids.tolist()

    def hashes_with(self, generated: Sequence[int]) -> list[bytes]:
        """``block_hashes`` of this prompt followed by ``generated``: what a later prompt that
        repeats both (a chat's next turn) hashes to, so that the KV of generated tokens is
        found again. Just the prompt's when it came without all its hashes."""
        hashed = len(self.block_hashes) * HASH_BLOCK_TOKENS
        # NOTE: a cached prefix ends on or before the last whole hash block (it leaves the last
        # token out), so the rows of the partial block are here; never hash other tokens.
        if (not self.block_hashes or self.prompt_tokens - hashed >= HASH_BLOCK_TOKENS
                or hashed < self.first_token):
            return self.block_hashes
        tail = self.token_ids[hashed - self.first_token:].tolist() + list(generated)
        return self.block_hashes + block_hashes(tail, self.tail_images, hashed,
                                                self.block_hashes[-1])

    def visual_runs(self) -> list[tuple[int, int]]:
        """(first token, count) of each run of visual tokens carrying deepstack rows."""
        if self.deepstack is None:
            return []
        return mask_runs(self.visual_mask)

    def deepstack_rows(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Of tokens ``[start, end)``: the visual ones (counted from ``start``) and their
        ``[layers, visual, H]`` deepstack rows; None when there are none."""
        if self.deepstack is None:
            return None
        mask = self.visual_mask[start:end]
        first = int(self.visual_mask[:start].sum())
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return None
        return rows, self.deepstack[:, first: first + rows.numel()]

    def after(self, prefix: PrefixHit | None) -> EncodedPrompt:
        """This whole prompt without the ``prefix`` a language server holds."""
        if prefix is None:
            return self
        return self.from_token(prefix.tokens, prefix)

    def from_token(self, first: int, prefix: PrefixHit | None = None) -> EncodedPrompt:
        """The tensors from token ``first`` on (the deepstack rows of its visual tokens too)."""
        rows = slice(first - self.first_token, None)
        part = EncodedPrompt(self.embeddings[rows], self.token_ids[rows], self.positions[rows],
                             self.mrope_delta, prefix=prefix, first_token=first,
                             block_hashes=self.block_hashes, tail_images=self.tail_images)
        if self.deepstack is not None:
            before = int(self.visual_mask[:rows.start].sum())
            part.visual_mask = self.visual_mask[rows]
            part.deepstack = self.deepstack[:, before:]
        return part


@dataclass(eq=False)
class PrefixHit:
    """The first ``tokens`` tokens of a prompt, found in a language server's prefix cache: the
    KV ``blocks`` that hold them stay pinned until the request that found them releases them."""

    tokens: int
    blocks: list[int]
    # The prefix's token ids (the KV alone does not say them): a repetition penalty counts the
    # whole prompt's, the cached part too.
    token_ids: list[int] = field(default_factory=list)


class PrefixCache(Protocol):
    """A language server's prefix cache, as the transfer layer asks it (from any thread)."""

    def match(self, hashes: Sequence[bytes], max_tokens: int) -> PrefixHit | None:
        """Pin the longest cached prefix of these block hashes, at most ``max_tokens``."""

    def release(self, hit: PrefixHit) -> None:
        """Unpin what ``match`` pinned, when its request ends without using it."""


# Tokens per prompt hash (``block_hashes``): the granularity at which prefixes are found again;
# a KV block size must be a multiple of it.
HASH_BLOCK_TOKENS = 16


@dataclass(frozen=True)
class ImageSpan:
    """Tokens ``[start, end)`` of a prompt are one image's placeholders; ``key`` names the
    image's content (a hash of the pixels the vision tower sees)."""

    start: int
    end: int
    key: str


def block_hashes(token_ids: Sequence[int], images: Sequence[ImageSpan] = (), first: int = 0,
                 parent: bytes = b"") -> list[bytes]:
    """Chain hashes of a prompt's whole ``HASH_BLOCK_TOKENS``-token blocks. To continue a
    chain: ``token_ids`` from token ``first`` on (a block's start), ``parent`` the hash of the
    block that ends there.

    NOTE: a block's hash covers every token before its end, and an image's placeholder tokens
    count by the image's ``key``, not their (shared) id: equal hashes mean equal prefixes, so
    equal KV. Encode and language servers must hash alike; this is the one place that does.
    """
    hashes: list[bytes] = []
    size = HASH_BLOCK_TOKENS
    for at in range(0, len(token_ids) - size + 1, size):
        start, end = first + at, first + at + size
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", token_ids[at:at + size]).tobytes())
        for image in images:
            if image.start < end and image.end > start:
                digest.update(f"|{image.key}@{image.start}-{image.end}".encode())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


def tail_images(images: Sequence[ImageSpan], total_tokens: int) -> list[ImageSpan]:
    """The images that reach into a prompt's last, partial hash block: with the prompt's
    hashes and tokens, all it takes to continue its chain over the tokens that follow."""
    hashed = total_tokens - total_tokens % HASH_BLOCK_TOKENS
    return [image for image in images if image.end > hashed]


def mask_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(first, count) of each run of True in a 1-D bool tensor."""
    edges = torch.diff(mask.to(torch.int8), prepend=mask.new_zeros(1, dtype=torch.int8),
                       append=mask.new_zeros(1, dtype=torch.int8))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(start, end - start) for start, end in zip(starts, ends, strict=True)]


def runs_mask(runs: list[tuple[int, int]], length: int) -> torch.Tensor:
    """The bool mask of ``length`` tokens that is True on ``runs``."""
    mask = torch.zeros(length, dtype=torch.bool)
    for first, count in runs:
        mask[first: first + count] = True
    return mask


class RecentRooms:
    """The last ``size`` rooms added, for membership tests; the oldest are forgotten."""

    def __init__(self, size: int = 65536) -> None:
        self._order: deque[int] = deque(maxlen=size)
        self._members: set[int] = set()

    def add(self, room: int) -> None:
        if len(self._order) == self._order.maxlen:
            self._members.discard(self._order[0])
        self._order.append(room)
        self._members.add(room)

    def __contains__(self, room: object) -> bool:
        return room in self._members


class LoopThread:
    """A server's scheduler loop on a thread of its own: ``step()`` again and again, sleeping
    between steps as long as it says, until closed; then ``drain()`` fails what is left.

    NOTE: a bug inside the loop must not leave a process that looks alive and answers
    nothing: it is logged and the process is stopped (SIGTERM: the HTTP server shuts down,
    its supervisor sees the exit)."""

    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        self.wake()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        """Any thread: new work; cut the current sleep short."""
        self._wake.set()

    def step(self) -> float:
        """One pass of the loop; returns how long to sleep unless woken (0: go on at once)."""
        raise NotImplementedError

    def drain(self) -> None:
        """After the last step: answer what is still queued."""

    def _run(self) -> None:
        try:
            while not self._stopping:
                pause = self.step()
                if pause > 0:
                    self._wake.wait(pause)
                    self._wake.clear()
        except Exception:
            logging.getLogger(__name__).critical("%s crashed; stopping this server",
                                                 self._thread.name, exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
        self.drain()
