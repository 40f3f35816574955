"""Byte layout of an embedding pool: enough for a peer to write a block with no pool code.

The pool is one buffer: a header page, then three block-major arrays, each page aligned:

    embeddings [num_blocks, block_size, hidden_size]  model dtype
    token_ids  [num_blocks, block_size]               int32
    positions  [num_blocks, block_size, 3]            int32 (M-RoPE t/h/w)

and, for models with deepstack features (Qwen3-VL: visual features the decoder adds after its
first ``deepstack_layers`` layers), a fourth:

    deepstack  [num_blocks, block_size, deepstack_layers, hidden_size]  model dtype

Block ``b`` of an array is the single byte range ``offset + b * block_bytes`` of length
``block_bytes``, so one block is one memcpy or one RDMA write. Only visual tokens use their
deepstack rows: a chunk names its visual tokens as runs (``visual_runs``), and only those rows
are copied, so a text token moves the same bytes whatever the model.
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
DEEPSTACK = "deepstack"

# (first token, count) runs of a chunk's visual tokens, counted from the chunk's first token.
Runs = Sequence[tuple[int, int]]


def _page_align(n: int) -> int:
    return -(-n // PAGE) * PAGE


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported embedding dtype {dtype}; use one of {', '.join(DTYPES)}")


def runs_problem(runs: Runs, num_tokens: int) -> str | None:
    """Why ``runs`` are not sorted, disjoint, non-empty runs inside ``num_tokens`` tokens, or
    None."""
    end = 0
    for first, count in runs:
        if first < end or count <= 0 or first + count > num_tokens:
            return f"visual runs {list(runs)[:8]} are not ordered runs within {num_tokens} tokens"
        end = first + count
    return None


def runs_within(runs: Runs, start: int, num_tokens: int) -> list[tuple[int, int]]:
    """The parts of ``runs`` (of a whole prompt) inside tokens ``[start, start + num_tokens)``,
    counted from ``start``."""
    clipped = []
    for first, count in runs:
        lo, hi = max(first, start), min(first + count, start + num_tokens)
        if lo < hi:
            clipped.append((lo - start, hi - lo))
    return clipped


def run_tokens(runs: Runs) -> int:
    return sum(count for _, count in runs)


@dataclass(frozen=True)
class PoolLayout:
    num_blocks: int
    block_size: int
    hidden_size: int
    dtype: str
    deepstack_layers: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported embedding dtype {self.dtype!r}; use one of "
                             f"{', '.join(DTYPES)}")
        for name in ("num_blocks", "block_size", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pool layout {name} must be > 0, got {getattr(self, name)}")
        if self.deepstack_layers < 0:
            raise ValueError(f"pool layout deepstack_layers must be >= 0, got "
                             f"{self.deepstack_layers}")

    @property
    def arrays(self) -> tuple[str, ...]:
        return (*ARRAYS, DEEPSTACK) if self.deepstack_layers else ARRAYS

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes a text token moves: its embedding, token id and positions."""
        return self.hidden_size * self.itemsize + 4 + 12

    @property
    def deepstack_bytes(self) -> int:
        """Bytes a visual token moves on top of ``token_bytes``."""
        return self.deepstack_layers * self.hidden_size * self.itemsize

    def chunk_bytes(self, num_tokens: int, visual_runs: Runs = ()) -> int:
        return num_tokens * self.token_bytes + run_tokens(visual_runs) * self.deepstack_bytes

    def block_bytes(self, array: str) -> int:
        per_token = {"embeddings": self.hidden_size * self.itemsize, "token_ids": 4,
                     "positions": 12, DEEPSTACK: self.deepstack_bytes}[array]
        return self.block_size * per_token

    def offset(self, array: str) -> int:
        """Byte offset of block 0 of ``array`` from the start of the buffer."""
        at = HEADER_BYTES
        for name in self.arrays:
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

    def byte_ranges(self, blocks: Sequence[int], start_token: int, num_tokens: int,
                    visual_runs: Runs = ()) -> list[tuple[int, int]]:
        """(offset, length) of those tokens in the buffer: embeddings, then token ids, then
        positions, then the deepstack rows of the tokens in ``visual_runs`` (counted from
        ``start_token``). This order is the wire order of a chunk on every data plane."""
        problem = runs_problem(visual_runs, num_tokens)
        if problem or (visual_runs and not self.deepstack_layers):
            raise IndexError(problem or "visual runs for a pool without deepstack rows")
        spans = list(self.token_spans(blocks, start_token, num_tokens))
        ranges = []
        for array in ARRAYS:
            ranges.extend(self._array_ranges(array, spans))
        for first, count in visual_runs:
            ranges.extend(self._array_ranges(DEEPSTACK, self.token_spans(
                blocks, start_token + first, count)))
        return ranges

    def _array_ranges(self, array: str, spans) -> Iterator[tuple[int, int]]:
        base, per_token = self.offset(array), self.block_bytes(array) // self.block_size
        for block, first, _, count in spans:
            yield base + (block * self.block_size + first) * per_token, count * per_token

    @property
    def total_bytes(self) -> int:
        last = self.arrays[-1]
        return _page_align(self.offset(last) + self.num_blocks * self.block_bytes(last))

    def mismatch(self, other: PoolLayout) -> str | None:
        """Why two pools cannot exchange blocks, or None. Block counts may differ."""
        for name in ("block_size", "hidden_size", "dtype", "deepstack_layers"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"pool layout mismatch: {name} {mine} here vs {theirs} at the peer"
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PoolLayout:
        return cls(**{name: data[name] for name in ("num_blocks", "block_size", "hidden_size",
                                                     "dtype")},
                   deepstack_layers=data.get("deepstack_layers", 0))


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
                  dst_blocks: Sequence[int], dst_start: int, num_tokens: int,
                  visual_runs: Runs = ()) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, length) runs that copy those tokens from one pool
    into another, in wire order. Runs adjacent on both sides are merged, so blocks that happen
    to be neighbours in both pools cost one write (one RDMA work request), not one per block."""
    runs: list[tuple[int, int, int]] = []
    if num_tokens == 0:
        return runs
    for (src_at, size), (dst_at, _) in zip(*split_to_match(
            src.byte_ranges(src_blocks, src_start, num_tokens, visual_runs),
            dst.byte_ranges(dst_blocks, dst_start, num_tokens, visual_runs)), strict=True):
        if runs and runs[-1][0] + runs[-1][2] == src_at and runs[-1][1] + runs[-1][2] == dst_at:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + size)
        else:
            runs.append((src_at, dst_at, size))
    return runs
