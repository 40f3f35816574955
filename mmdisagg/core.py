"""Types and process conventions shared by every role. Imports nothing else of mmdisagg."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator
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


@dataclass
class EncodedPrompt:
    """What the encode side produces and the language side consumes, for one whole prompt.

    ``embeddings [L, H]`` are the language model's input embeddings (image features merged in),
    ``token_ids [L]`` the prompt's token ids (image placeholders included), ``positions [L, 3]``
    the M-RoPE t/h/w position ids (1-D models repeat one value), and ``mrope_delta`` the offset
    that decode positions add to the number of tokens so far.
    """

    embeddings: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    mrope_delta: int = 0

    @property
    def total_tokens(self) -> int:
        return int(self.token_ids.shape[0])


@contextlib.contextmanager
def stop_process_on_crash(what: str) -> Iterator[None]:
    """Around a server's loop thread: a bug there must not leave a process that looks alive and
    answers nothing. Log it and stop the process (SIGTERM: the HTTP server shuts down, the
    loop's requests are failed, its supervisor sees the exit)."""
    try:
        yield
    except Exception:
        logging.getLogger(__name__).critical("%s crashed; stopping this server", what,
                                             exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)
