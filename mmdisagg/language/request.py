"""One ``Req`` per request (room) on a language server: everything known about it, in one place,
so that admission, preemption, abort and failure each touch one structure."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.detokenizer import Detokenizer
from mmdisagg.messages import Event
from mmdisagg.pool.allocator import Allocation

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
    """A request's whole state. ``emit`` is called from the scheduler's loop, once per event.

    NOTE: the tokens of a request are its prompt then its output; ``num_computed`` of them
    have their keys and values in the KV blocks of ``block_table``. The prompt's embeddings
    and the output ids stay in host memory until it finishes: preemption drops only KV.
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
    block_table: list[int] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    preemptions: int = 0
    detokenizer: Detokenizer | None = None
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.total_tokens if self.prompt is not None else 0

    @property
    def num_tokens(self) -> int:
        """Prompt and output so far."""
        return self.prompt_tokens + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose keys and values are not yet in the cache."""
        return self.num_tokens - self.num_computed

    def pending_embeddings(self, count: int, embed: Callable[[torch.Tensor], torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and ``[count, 3]`` positions of the next ``count`` pending tokens: prompt
        rows as they came, output tokens (recomputed after a preemption) through ``embed``."""
        assert self.prompt is not None
        start, end = self.num_computed, self.num_computed + count
        length = self.prompt_tokens
        prompt_part = slice(start, min(end, length))
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
