"""Byte layout of an embedding pool: enough for a peer to write a block with no pool code.

The pool is one buffer: a header page, then three block-major arrays, each page aligned:

    embeddings [num_blocks, block_size, hidden_size]  model dtype
    token_ids  [num_blocks, block_size]               int32
    positions  [num_blocks, block_size, 3]            int32 (M-RoPE t/h/w)

Block ``b`` of an array is the single byte range ``offset + b * block_bytes`` of length
``block_bytes``, so one block is one memcpy or one RDMA write.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

PAGE = 4096
HEADER_BYTES = PAGE
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
TOKEN_DTYPE = torch.int32
POSITION_DTYPE = torch.int32
ARRAYS = ("embeddings", "token_ids", "positions")


def _page_align(n: int) -> int:
    return -(-n // PAGE) * PAGE


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported embedding dtype {dtype}; use one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class PoolLayout:
    num_blocks: int
    block_size: int
    hidden_size: int
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported embedding dtype {self.dtype!r}; use one of "
                             f"{', '.join(DTYPES)}")
        for name in ("num_blocks", "block_size", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pool layout {name} must be > 0, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies across the three arrays."""
        return self.hidden_size * self.itemsize + 4 + 12

    def block_bytes(self, array: str) -> int:
        per_token = {"embeddings": self.hidden_size * self.itemsize, "token_ids": 4,
                     "positions": 12}[array]
        return self.block_size * per_token

    def offset(self, array: str) -> int:
        """Byte offset of block 0 of ``array`` from the start of the buffer."""
        at = HEADER_BYTES
        for name in ARRAYS:
            if name == array:
                return at
            at = _page_align(at + self.num_blocks * self.block_bytes(name))
        raise KeyError(array)

    def block_range(self, array: str, block: int) -> tuple[int, int]:
        """(offset, length) in bytes of one block of one array."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} outside a pool of {self.num_blocks} blocks")
        size = self.block_bytes(array)
        return self.offset(array) + block * size, size

    def token_spans(self, blocks: Sequence[int], start_token: int,
                    num_tokens: int) -> Iterator[tuple[int, int, int, int]]:
        """Tokens ``[start_token, start_token + num_tokens)`` of a request whose k-th block is
        ``blocks[k]``, as (block, first token in block, first token in slice, count) runs."""
        bs = self.block_size
        if start_token < 0 or num_tokens < 0 or start_token + num_tokens > len(blocks) * bs:
            raise IndexError(f"tokens [{start_token}, {start_token + num_tokens}) do not fit in "
                             f"{len(blocks)} blocks of {bs}")
        done = 0
        while done < num_tokens:
            token = start_token + done
            count = min(bs - token % bs, num_tokens - done)
            yield blocks[token // bs], token % bs, done, count
            done += count

    def byte_ranges(self, blocks: Sequence[int], start_token: int,
                    num_tokens: int) -> list[tuple[int, int]]:
        """(offset, length) of those tokens in the buffer: embeddings, then token ids, then
        positions. This order is the wire order of a chunk on every data plane."""
        spans = list(self.token_spans(blocks, start_token, num_tokens))
        ranges = []
        for array in ARRAYS:
            base, per_token = self.offset(array), self.block_bytes(array) // self.block_size
            for block, first, _, count in spans:
                ranges.append((base + (block * self.block_size + first) * per_token,
                               count * per_token))
        return ranges

    @property
    def total_bytes(self) -> int:
        last = ARRAYS[-1]
        return _page_align(self.offset(last) + self.num_blocks * self.block_bytes(last))

    def mismatch(self, other: PoolLayout) -> str | None:
        """Why two pools cannot exchange blocks, or None. Block counts may differ."""
        for name in ("block_size", "hidden_size", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"pool layout mismatch: {name} {mine} here vs {theirs} at the peer"
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PoolLayout:
        return cls(**{name: data[name] for name in ("num_blocks", "block_size", "hidden_size",
                                                     "dtype")})


def split_to_match(a: list[tuple[int, int]], b: list[tuple[int, int]]):
    """Cut two lists of byte ranges covering the same number of bytes at each other's seams."""
    out_a, out_b = [], []
    i = j = 0
    (a_at, a_left), (b_at, b_left) = a[0], b[0]
    while True:
        size = min(a_left, b_left)
        out_a.append((a_at, size))
        out_b.append((b_at, size))
        a_at, a_left, b_at, b_left = a_at + size, a_left - size, b_at + size, b_left - size
        if a_left == 0:
            i += 1
            if i == len(a):
                return out_a, out_b
            a_at, a_left = a[i]
        if b_left == 0:
            j += 1
            b_at, b_left = b[j]


def paired_ranges(src: PoolLayout, src_blocks: Sequence[int], src_start: int, dst: PoolLayout,
                  dst_blocks: Sequence[int], dst_start: int,
                  num_tokens: int) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, length) runs that copy those tokens from one pool
    into another, in wire order. Runs adjacent on both sides are merged, so blocks that happen
    to be neighbours in both pools cost one write (one RDMA work request), not one per block."""
    runs: list[tuple[int, int, int]] = []
    if num_tokens == 0:
        return runs
    for (src_at, size), (dst_at, _) in zip(*split_to_match(
            src.byte_ranges(src_blocks, src_start, num_tokens),
            dst.byte_ranges(dst_blocks, dst_start, num_tokens)), strict=True):
        if runs and runs[-1][0] + runs[-1][2] == src_at and runs[-1][1] + runs[-1][2] == dst_at:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + size)
        else:
            runs.append((src_at, dst_at, size))
    return runs
