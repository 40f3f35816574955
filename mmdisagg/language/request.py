"""One ``Req`` per request (room) on a language server: everything known about it, in one place,
so that admission, preemption, abort and failure each touch one structure."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.detokenizer import Detokenizer
from mmdisagg.messages import Event

if TYPE_CHECKING:
    from mmdisagg.models.base import PreparedPrompt
    from mmdisagg.transfer.receiver import EmbeddingReceiver


class ReqStatus(enum.IntEnum):
    """Where a request is, in the order it gets there (``PREEMPTED`` goes back to running)."""

    PREALLOC = 0  # waiting for the first window's embedding-pool blocks
    TRANSFER = 1  # embeddings on their way
    WAITING = 2  # prompt here, waiting for KV blocks
    RUNNING = 3  # holds KV blocks: prefilling or decoding
    PREEMPTED = 4  # KV blocks taken back; recomputed from prompt + output when re-admitted
    FINISHED = 5


def _no_events(event: Event) -> None:
    pass


@dataclass(eq=False)
class Req:
    """A request's whole state. ``emit`` is called once per event, by the output thread's
    ``deliver`` (on ``loop`` for an HTTP request).

    NOTE: the tokens of a request are its prompt then its output; ``num_computed`` of them
    have their keys and values in the KV blocks of ``block_table``. The prompt's embeddings
    and the output ids stay in host memory until it finishes: preemption drops only KV. A
    prompt whose first tokens were found in the prefix cache when it was announced
    (``prompt.cached_tokens``) has no embeddings for them: it needs the cache again.
    """

    request_id: str
    params: SamplingParams
    prompt: EncodedPrompt | None = None
    emit: Callable[[Event], None] = _no_events
    room: int = 0
    encoder: str = ""  # bootstrap address of the encode server sending the prompt
    prepared: PreparedPrompt | None = None  # colocated: the prompt to encode here
    receiver: EmbeddingReceiver | None = None
    status: ReqStatus = ReqStatus.PREALLOC
    seed: int = 0  # the sampler's; drawn at random when params.seed is None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    landed_tokens: int | None = None  # while its prompt is still arriving: tokens it has
    block_table: list[int] = field(default_factory=list)
    pinned_blocks: int = 0  # of block_table: a prefix-cache hit it holds while not running
    preemptions: int = 0
    # the output thread's: what it has told the client
    detokenizer: Detokenizer | None = None
    delivered_tokens: int = 0
    delivered_final: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # where ``emit`` runs (HTTP requests)
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    index: int = 0  # which of the request's ``params.n`` choices this is
    choices: list[Req] = field(default_factory=list)  # n > 1: every choice, this one too
    grammar: Any = None  # structured output: the compiled grammar (xgrammar)
    matcher: Any = None  # ... and this choice's place in it
    _prompt_vocab: list[int] | None = None

    @property
    def prompt_tokens(self) -> int:
        """The whole prompt's, a cached prefix included."""
        return self.prompt.prompt_tokens if self.prompt is not None else 0

    def prompt_vocab(self) -> list[int]:
        """The distinct token ids of the prompt (image placeholders included), found once."""
        if self._prompt_vocab is None:
            self._prompt_vocab = (sorted(set(self.prompt.whole_token_ids()))
                                  if self.prompt is not None else [])
        return self._prompt_vocab

    def fork(self, index: int) -> Req:
        """Choice ``index`` of this request: the same prompt, room and emitter; its own
        output, seed and grammar state."""
        return Req(f"{self.request_id}/{index}", self.params, self.prompt, self.emit,
                   self.room, self.encoder, grammar=self.grammar, index=index,
                   arrived=self.arrived, loop=self.loop, landed_tokens=self.landed_tokens)

    @property
    def num_tokens(self) -> int:
        """Prompt and output so far."""
        return self.prompt_tokens + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are not yet in the cache."""
        return self.num_tokens - self.num_computed

    @property
    def num_ready(self) -> int:
        """Pending tokens that can be computed now: all, unless the prompt is still arriving
        (then those whose rows landed)."""
        if self.landed_tokens is None:
            return self.num_pending
        return max(0, min(self.num_pending, self.landed_tokens - self.num_computed))

    def pending_embeddings(self, count: int, embed: Callable[[torch.Tensor], torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and ``[count, 3]`` positions of the next ``count`` pending tokens: prompt
        rows as they came, output tokens (recomputed after a preemption) through ``embed``."""
        assert self.prompt is not None
        start, end = self.num_computed, self.num_computed + count
        length = self.prompt_tokens
        first = self.prompt.first_token  # NOTE: the rows start at this token
        if start < first:
            raise ValueError(f"request {self.request_id}: token {start} is in its cached "
                             f"prefix, whose embeddings never came (they start at {first})")
        prompt_part = slice(start - first, min(end, length) - first)
        if end <= length:
            return self.prompt.embeddings[prompt_part], self.prompt.positions[prompt_part]
        first = max(start, length)
        output = embed(torch.tensor(self.output_ids[first - length:end - length]))
        steps = torch.arange(first, end, device=self.prompt.positions.device)
        output_positions = (steps + self.prompt.mrope_delta)[:, None].expand(-1, 3)
        if start >= length:
            return output, output_positions
        # NOTE: the prompt rows take the embedding table's dtype, as the forward pass would.
        return (torch.cat([self.prompt.embeddings[prompt_part].to(output), output]),
                torch.cat([self.prompt.positions[prompt_part], output_positions]))
