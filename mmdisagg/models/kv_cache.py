"""The paged KV cache: keys and values of every sequence, in fixed-size blocks of one pool.

Which blocks a sequence owns (its block table) is decided by the language engine; this module
only holds the memory and knows its layout.
"""

from __future__ import annotations

import mmap
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
            count = 1
            for size in shape:
                count *= size
            itemsize = torch.empty((), dtype=layout.dtype).element_size()
            self._mapping = mmap.mmap(-1, count * itemsize)
            storage = torch.frombuffer(self._mapping, dtype=layout.dtype, count=count)
            both = storage.view(shape)
        else:
            both = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.keys, self.values = both[0], both[1]

    @classmethod
    def within(cls, layout: KVLayout, memory_bytes: int, block_size: int,
               device: torch.device) -> PagedKVCache:
        """As many blocks as ``memory_bytes`` holds; an error naming both sizes if not one."""
        block_bytes = layout.bytes_per_token * block_size
        if memory_bytes < block_bytes:
            raise ValueError(f"a KV cache of {memory_bytes} bytes cannot hold one block of "
                             f"{block_size} tokens ({block_bytes} bytes)")
        return cls(layout, memory_bytes // block_bytes, block_size, device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values, ``[num_blocks * block_size, kv_heads, head_dim]``."""
        shape = (self.num_tokens, self.layout.num_kv_heads, self.layout.head_dim)
        return self.keys[layer].view(shape), self.values[layer].view(shape)
