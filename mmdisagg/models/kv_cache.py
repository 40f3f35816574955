"""The paged KV cache: keys and values of every sequence, in fixed-size blocks of one pool.

Which blocks a sequence owns (its block table) is decided by the language engine; this module
only holds the memory and knows its layout.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's keys and values across every decoder layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """Keys and values, every layer."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class PagedKVCache:
    """``keys`` and ``values``, each ``[layers, num_blocks, block_size, kv_heads, head_dim]``.

    A token's slot is ``block * block_size + offset``; ``slots(layer)`` views a layer as
    ``[num_blocks * block_size, kv_heads, head_dim]`` so new tokens go in with one index op.

    NOTE: the memory starts zeroed and only finite keys and values are ever written, so the
    unwritten tail of a block gathered under a length mask can never turn a sum into NaN. On
    CPU it is an anonymous mapping: zero pages the kernel backs only once they are written,
    so the resident size grows with use up to the pool size and never beyond it.

    On CPU the cache also holds a ``DecodeWorkspace`` of as many tokens as the pool: ``within``
    gives each half of the memory.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int,
                 device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV cache needs at least one block, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        shape = (2, layout.num_layers, num_blocks, block_size, layout.num_kv_heads,
                 layout.head_dim)
        if device.type == "cpu":
            self._mapping, storage = _zeroed(math.prod(shape), layout.dtype)
            both = storage.view(shape)
        else:
            both = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.keys, self.values = both[0], both[1]
        self._workspace: torch.Tensor | None = None
        self.decode = (DecodeWorkspace(self, self.num_tokens) if device.type == "cpu"
                       else None)

    @classmethod
    def within(cls, layout: KVLayout, memory_bytes: int, block_size: int,
               device: torch.device) -> PagedKVCache:
        """As many blocks as ``memory_bytes`` holds; an error naming both sizes if not one."""
        block_bytes = layout.bytes_per_token * block_size
        if device.type == "cpu":  # the decode workspace holds as many tokens as the pool
            block_bytes *= 2
        if memory_bytes < block_bytes:
            raise ValueError(f"a KV cache of {memory_bytes} bytes cannot hold one block of "
                             f"{block_size} tokens ({block_bytes} bytes)")
        return cls(layout, memory_bytes // block_bytes, block_size, device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        workspace = self.decode.nbytes if self.decode is not None else 0
        return self.keys.nbytes + self.values.nbytes + workspace

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values of each row's blocks, ``[rows, blocks * block_size,
        kv_heads, head_dim]``, copied into a workspace that the next call overwrites: prefill
        chunks' (the engine bounds their rows times width), and off CPU decode rows'.

        NOTE: a fresh tensor per call would be freed and re-faulted page by page every layer
        (5x slower on CPU at batch 64); the workspace grows to the largest gather and stays."""
        rows, width = block_tables.shape
        blocks = block_tables.flatten()
        count = blocks.numel()
        if self._workspace is None or self._workspace.shape[1] < count:
            self._workspace = self.keys.new_empty((2, count, *self.keys.shape[2:]))
        shape = (rows, width * self.block_size, self.layout.num_kv_heads, self.layout.head_dim)
        keys = torch.index_select(self.keys[layer], 0, blocks, out=self._workspace[0, :count])
        values = torch.index_select(self.values[layer], 0, blocks,
                                    out=self._workspace[1, :count])
        return keys.view(shape), values.view(shape)

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values, ``[num_blocks * block_size, kv_heads, head_dim]``."""
        shape = (self.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        return self.keys[layer].view(shape), self.values[layer].view(shape)


def _zeroed(count: int, dtype: torch.dtype) -> tuple[mmap.mmap, torch.Tensor]:
    """``count`` zeros in an anonymous mapping: pages the kernel backs only once written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, count * itemsize)
    return mapping, torch.frombuffer(mapping, dtype=dtype, count=count)


class DecodeWorkspace:
    """CPU: the decoding rows' keys and values, copied out of the pool in attention's layout
    ``[layers, rows, kv_heads, row_tokens, head_dim]`` and kept from step to step. Each step
    appends the rows' new keys and values here as well as to the pool, so a decode step reads
    every cached key once, as a per-sequence cache would, instead of gathering it through
    block tables first (which, with attention over the gathered copy, took 2.5x as long).

    A row is copied from the pool only when it joins (or comes back); a row that leaves is
    replaced by the last one. Rows times ``row_tokens`` never exceeds ``tokens``: the engine
    decodes, each step, only the rows that fit padded to the longest (``fitting``).

    NOTE: the memory starts zeroed and only finite values are written into it (as in the
    pool), so the masked-out tail of a row never turns an attention sum into NaN.
    """

    def __init__(self, cache: PagedKVCache, tokens: int) -> None:
        layout = cache.layout
        self.cache = cache
        self.tokens = tokens
        self._token_size = layout.num_layers * layout.num_kv_heads * layout.head_dim
        self._mapping, self._flat = _zeroed(2 * tokens * self._token_size, layout.dtype)
        self.owners: list[Hashable] = []  # by row
        self.lengths: list[int] = []  # tokens held, by row
        self.row_tokens = 0
        self.keys = self.values = self._flat[:0]
        self._slots = torch.zeros(0, dtype=torch.long)  # of the new tokens, in a layer

    @property
    def nbytes(self) -> int:
        return self._flat.nbytes

    def fitting(self, lengths: Sequence[int]) -> int:
        """How many of the first rows fit, each to hold ``lengths[i]`` tokens after this step
        (at least one: a sequence never outgrows the pool, and this holds as many tokens)."""
        longest = 0
        for count, length in enumerate(lengths, start=1):
            longest = max(longest, self._rounded(length))
            if count * longest > self.tokens:
                return max(count - 1, 1)
        return len(lengths)

    def place(self, owners: Sequence[Hashable], computed: Sequence[int],
              block_tables: Sequence[Sequence[int]]) -> list[int]:
        """Make the rows of this step's decode batch exactly ``owners`` (each with its
        ``computed`` tokens, in blocks ``block_tables``); return each one's row, a permutation
        of ``range(len(owners))``: the step's decode rows go through the layers in row order.
        Rows copy from the pool only when they are new or not up to date.

        NOTE: a row's length counts the token this step appends: the step's forward pass
        writes it (and a failed step fails every request)."""
        needed = self._rounded(max(computed) + 1)
        if needed > self.row_tokens or len(owners) * self.row_tokens > self.tokens:
            self._reshape(needed, len(owners))
        wanted = set(owners)
        for row in reversed(range(len(self.owners))):
            if self.owners[row] not in wanted:
                self._drop(row)
        where = {owner: row for row, owner in enumerate(self.owners)}
        rows, stale = [], []
        for owner, tokens in zip(owners, computed, strict=True):
            row = where.get(owner)
            if row is None:
                row = len(self.owners)
                self.owners.append(owner)
                self.lengths.append(-1)
            if self.lengths[row] != tokens:
                stale.append((row, block_tables[len(rows)][:self._rounded(tokens + 1)
                                                           // self.cache.block_size]))
            self.lengths[row] = tokens + 1
            rows.append(row)
        if stale:
            self._copy_in(stale)
        heads = self.cache.layout.num_kv_heads
        slots = ((torch.arange(len(rows))[:, None] * heads + torch.arange(heads)) * self.row_tokens
                 + torch.tensor(self.lengths)[:, None] - 1)
        self._slots = slots.flatten()
        return rows

    def forget(self, owner: Hashable) -> None:
        """``owner`` left the running batch (finished, failed or preempted): its row goes."""
        if owner in self.owners:
            self._drop(self.owners.index(owner))

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, end: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' new ``keys``/``values`` ``[rows, kv_heads, head_dim]`` (in row order)
        after their cached ones; return the layer's keys and values of every row, ``[rows,
        kv_heads, end, head_dim]``."""
        dim = self.cache.layout.head_dim
        self.keys[layer].view(-1, dim).index_copy_(0, self._slots, keys.reshape(-1, dim))
        self.values[layer].view(-1, dim).index_copy_(0, self._slots, values.reshape(-1, dim))
        count = len(self.owners)
        return self.keys[layer, :count, :, :end], self.values[layer, :count, :, :end]

    def _rounded(self, tokens: int) -> int:
        size = self.cache.block_size
        return -(-tokens // size) * size

    def _reshape(self, needed: int, rows: int) -> None:
        """Room for ``rows`` rows of at least ``needed`` tokens (a quarter more where it fits,
        so that growing rows rarely reshape); every row must be copied in again."""
        size = self.cache.block_size
        most = self.tokens // rows // size * size
        self.row_tokens = max(needed, min(most, self._rounded(needed + needed // 4 + size)))
        capacity = self.tokens // self.row_tokens
        layout = self.cache.layout
        shape = (layout.num_layers, capacity, layout.num_kv_heads, self.row_tokens,
                 layout.head_dim)
        half = self.tokens * self._token_size
        used = capacity * self.row_tokens * self._token_size
        self.keys = self._flat[:used].view(shape)
        self.values = self._flat[half:half + used].view(shape)
        self.owners.clear()
        self.lengths.clear()

    def _drop(self, row: int) -> None:
        last = len(self.owners) - 1
        if row != last:
            self.keys[:, row] = self.keys[:, last]
            self.values[:, row] = self.values[:, last]
            self.owners[row] = self.owners[last]
            self.lengths[row] = self.lengths[last]
        self.owners.pop()
        self.lengths.pop()

    def _copy_in(self, stale: list[tuple[int, Sequence[int]]]) -> None:
        """Rows' keys and values of every layer from the pool, through their block tables."""
        width = max(len(table) for _, table in stale)
        blocks = torch.tensor([list(table) + [0] * (width - len(table)) for _, table in stale])
        index = torch.tensor([row for row, _ in stale])
        layers, _, size, heads, dim = self.cache.keys.shape
        end = width * size
        for source, target in ((self.cache.keys, self.keys), (self.cache.values, self.values)):
            gathered = source[:, blocks.flatten()].view(layers, len(stale), end, heads, dim)
            target[:, index, :, :end] = gathered.transpose(2, 3)
