"""Types and process conventions shared by every role. Imports nothing else of mmdisagg."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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

    @property
    def total_tokens(self) -> int:
        return int(self.token_ids.shape[0])

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
