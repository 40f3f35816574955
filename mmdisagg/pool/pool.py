"""The embedding pool: block-major arrays (``PoolArrays``) plus their allocator (``EmbeddingPool``).

Writes scatter and reads gather block by block over the blocks given, in the order given: a
request's tokens ``[k * block_size, (k + 1) * block_size)`` live in its k-th block, whatever
that block's id. Metadata (total length, mrope delta) is never stored here: it travels in
control messages (seed note 05).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmdisagg.core import EncodedPrompt
from mmdisagg.pool.allocator import Allocation, BlockAllocator
from mmdisagg.pool.layout import (
    DEEPSTACK,
    POSITION_DTYPE,
    TOKEN_DTYPE,
    PoolLayout,
    Runs,
    run_tokens,
    runs_within,
    split_to_match,
)
from mmdisagg.pool.shm import SharedSegment

BACKINGS = ("process", "shm")

# glibc switches memmove to non-temporal stores only above 3/4 of the shared cache, which
# virtual machines often report as hundreds of MB. Copies into a peer's pool then read each
# destination line first (it sits in the reading core's cache); non-temporal stores skip that
# and run about 1.5x faster at 14 MB. Only effective at process start: see with_fast_copies.
FAST_COPY_TUNABLE = "glibc.cpu.x86_non_temporal_threshold=0x40000"


def with_fast_copies(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a process that copies into pools (a sender): non-temporal memmove above
    256 KiB. Other glibc tunables already set are kept; non-x86 glibc ignores it."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.cpu.x86_non_temporal_threshold=") for t in tunables):
        tunables.append(FAST_COPY_TUNABLE)
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)}


@dataclass
class Gathered:
    """Tokens read back from a pool, in request order."""

    embeddings: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor


class PoolArrays:
    """Typed views over one pool buffer, with block-wise scatter and gather.

    A peer on the same host builds one of these over the owner's segment (``attach``) to write
    into blocks it was offered; it has no allocator.
    """

    def __init__(self, layout: PoolLayout, buffer: torch.Tensor,
                 segment: SharedSegment | None = None) -> None:
        self.layout = layout
        self.buffer = buffer
        self.segment = segment
        n, bs, h = layout.num_blocks, layout.block_size, layout.hidden_size

        def view(array: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
            start = layout.offset(array)
            raw = buffer[start: start + layout.num_blocks * layout.block_bytes(array)]
            return raw.view(dtype).view(shape)

        self.embeddings = view("embeddings", layout.torch_dtype, (n, bs, h))
        self.token_ids = view("token_ids", TOKEN_DTYPE, (n, bs))
        self.positions = view("positions", POSITION_DTYPE, (n, bs, 3))
        self.deepstack = view(DEEPSTACK, layout.torch_dtype, (
            n, bs, layout.deepstack_layers, h)) if layout.deepstack_layers else None

    @classmethod
    def in_process(cls, layout: PoolLayout, pin: bool = False) -> PoolArrays:
        return cls(layout, torch.zeros(layout.total_bytes, dtype=torch.uint8, pin_memory=pin))

    @classmethod
    def shared(cls, layout: PoolLayout) -> PoolArrays:
        """A new named segment this process owns; peers ``attach`` to it by name."""
        segment = SharedSegment.create(layout.total_bytes, layout.to_dict())
        return cls(layout, torch.frombuffer(segment.mmap, dtype=torch.uint8), segment)

    @classmethod
    def attach(cls, name: str, layout: PoolLayout) -> PoolArrays:
        segment = SharedSegment.attach(name, layout.total_bytes, layout.to_dict())
        return cls(layout, torch.frombuffer(segment.mmap, dtype=torch.uint8), segment)

    @property
    def segment_name(self) -> str | None:
        return self.segment.name if self.segment else None

    def write(self, blocks: Sequence[int], start_token: int, embeddings: torch.Tensor,
              token_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Scatter ``len(token_ids)`` tokens into ``blocks`` from token ``start_token`` on."""
        num_tokens = int(token_ids.shape[0])
        if embeddings.shape != (num_tokens, self.layout.hidden_size) or positions.shape != (
                num_tokens, 3):
            raise ValueError(
                f"expected embeddings [{num_tokens}, {self.layout.hidden_size}] and positions "
                f"[{num_tokens}, 3], got {tuple(embeddings.shape)} and {tuple(positions.shape)}")
        for block, offset, at, count in self.layout.token_spans(blocks, start_token, num_tokens):
            self.embeddings[block, offset: offset + count].copy_(embeddings[at: at + count])
            self.token_ids[block, offset: offset + count].copy_(token_ids[at: at + count])
            self.positions[block, offset: offset + count].copy_(positions[at: at + count])

    def write_deepstack(self, blocks: Sequence[int], start_token: int, visual_runs: Runs,
                        rows: torch.Tensor) -> None:
        """Scatter ``rows [visual tokens, deepstack_layers, hidden]`` into the deepstack rows of
        the tokens in ``visual_runs`` (counted from ``start_token``), in order."""
        expected = (run_tokens(visual_runs), self.layout.deepstack_layers, self.layout.hidden_size)
        if self.deepstack is None or rows.shape != expected:
            raise ValueError(f"expected deepstack rows {list(expected)} for a pool with "
                             f"{self.layout.deepstack_layers} deepstack layers, got "
                             f"{list(rows.shape)}")
        at = 0
        for first, count in visual_runs:
            for block, offset, _, n in self.layout.token_spans(blocks, start_token + first, count):
                self.deepstack[block, offset: offset + n].copy_(rows[at: at + n])
                at += n

    def read_deepstack(self, blocks: Sequence[int], start_token: int,
                       visual_runs: Runs) -> torch.Tensor:
        """Gather the deepstack rows of the tokens in ``visual_runs``: ``[visual tokens,
        deepstack_layers, hidden]``."""
        out = torch.empty(run_tokens(visual_runs), self.layout.deepstack_layers,
                          self.layout.hidden_size, dtype=self.layout.torch_dtype)
        at = 0
        for first, count in visual_runs:
            for block, offset, _, n in self.layout.token_spans(blocks, start_token + first, count):
                out[at: at + n].copy_(self.deepstack[block, offset: offset + n])
                at += n
        return out

    def read(self, blocks: Sequence[int], num_tokens: int, start_token: int = 0,
             out: Gathered | None = None) -> Gathered:
        """Gather ``num_tokens`` tokens from ``blocks`` starting at token ``start_token``."""
        if out is None:
            out = Gathered(
                torch.empty(num_tokens, self.layout.hidden_size, dtype=self.layout.torch_dtype),
                torch.empty(num_tokens, dtype=TOKEN_DTYPE),
                torch.empty(num_tokens, 3, dtype=POSITION_DTYPE),
            )
        for block, offset, at, count in self.layout.token_spans(blocks, start_token, num_tokens):
            out.embeddings[at: at + count].copy_(self.embeddings[block, offset: offset + count])
            out.token_ids[at: at + count].copy_(self.token_ids[block, offset: offset + count])
            out.positions[at: at + count].copy_(self.positions[block, offset: offset + count])
        return out

    def copy_to(self, dst: PoolArrays, src_blocks: Sequence[int], src_start: int,
                dst_blocks: Sequence[int], dst_start: int, num_tokens: int,
                visual_runs: Runs = ()) -> None:
        """Copy tokens block to block into another pool of the same layout (the shm plane),
        with the deepstack rows of those in ``visual_runs`` (counted from the first)."""
        if num_tokens == 0:
            return
        src_ranges = self.layout.byte_ranges(src_blocks, src_start, num_tokens, visual_runs)
        dst_ranges = dst.layout.byte_ranges(dst_blocks, dst_start, num_tokens, visual_runs)
        src_ranges, dst_ranges = split_to_match(src_ranges, dst_ranges)
        # NOTE: ranges come from both layouts, whose buffers were size-checked when created
        # or attached. libc memmove (ctypes releases the GIL) runs at memcpy speed even on
        # cold caches, where per-range tensor copies lose a third.
        src_base, dst_base = self.buffer.data_ptr(), dst.buffer.data_ptr()
        for (src_at, size), (dst_at, _) in zip(src_ranges, dst_ranges, strict=True):
            ctypes.memmove(dst_base + dst_at, src_base + src_at, size)

    def close(self) -> None:
        """Drop the views and, for a segment, unmap it (its owner also unlinks it)."""
        del self.embeddings, self.token_ids, self.positions, self.deepstack, self.buffer
        if self.segment is not None:
            self.segment.close()


class EmbeddingPool:
    """Arrays plus the allocator that decides who owns which block."""

    def __init__(self, layout: PoolLayout, backing: str = "process", default_blocks: int = 8,
                 pin: bool = False) -> None:
        if backing not in BACKINGS:
            raise ValueError(f"unknown pool backing {backing!r}; use one of {', '.join(BACKINGS)}")
        self.layout = layout
        self.arrays = PoolArrays.shared(layout) if backing == "shm" else PoolArrays.in_process(
            layout, pin=pin)
        self.allocator = BlockAllocator(layout.num_blocks, layout.block_size, default_blocks)

    def write(self, allocation: Allocation, start_token: int, embeddings: torch.Tensor,
              token_ids: torch.Tensor, positions: torch.Tensor) -> None:
        self.arrays.write(allocation.blocks, start_token, embeddings, token_ids, positions)

    def write_prompt(self, allocation: Allocation, prompt: EncodedPrompt,
                     first_token: int = 0, end_token: int | None = None
                     ) -> list[tuple[int, int]]:
        """Write a prompt's tokens from ``first_token`` (the receiver holds those before) to
        ``end_token`` (default: its end), deepstack rows included; return their visual runs
        (what the sender needs to send those rows)."""
        part = prompt.from_token(first_token)
        count = (prompt.prompt_tokens if end_token is None else end_token) - first_token
        self.write(allocation, first_token, part.embeddings[:count], part.token_ids[:count],
                   part.positions[:count])
        runs = runs_within(part.visual_runs(), 0, count)
        if runs:
            self.arrays.write_deepstack(allocation.blocks, first_token, runs,
                                        part.deepstack[:, :run_tokens(runs)].transpose(0, 1))
        return [(first_token + first, count) for first, count in runs]

    def read(self, allocation: Allocation, num_tokens: int, start_token: int = 0) -> Gathered:
        return self.arrays.read(allocation.blocks, num_tokens, start_token)

    def close(self) -> None:
        self.arrays.close()
