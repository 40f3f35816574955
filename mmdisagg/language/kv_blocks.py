"""Which KV-cache blocks each running request owns: its block table.

Block ids come from the project's ``BlockAllocator``; a request's table is the concatenation of
its allocations. A request is admitted with blocks for all its known tokens plus one, and
grows by a block when its next token would not fit.

NOTE: the prefix cache (issue 13) will give blocks a reference count and a content hash
(nano-vllm's BlockManager); every block change already goes through ``allocate`` and
``free`` here, which is where that bookkeeping belongs.
"""

from __future__ import annotations

from mmdisagg.language.request import Req
from mmdisagg.pool.allocator import AllocatorStats, BlockAllocator


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_tokens(self) -> int:
        """Tokens the whole cache holds."""
        return self.allocator.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    def blocks_missing(self, req: Req, num_tokens: int) -> int:
        """Blocks ``req`` lacks to hold ``num_tokens`` tokens."""
        return max(0, self.allocator.blocks_for(num_tokens) - len(req.block_table))

    def can_allocate(self, req: Req, num_tokens: int) -> bool:
        return self.allocator.can_allocate(self.blocks_missing(req, num_tokens))

    def allocate(self, req: Req, num_tokens: int) -> bool:
        """Grow ``req``'s table to hold ``num_tokens`` tokens; False (nothing taken) if the
        blocks are not free."""
        missing = self.blocks_missing(req, num_tokens)
        if missing == 0:
            return True
        allocation = self.allocator.alloc_blocks(missing)
        if allocation is None:
            return False
        req.allocations.append(allocation)
        req.block_table.extend(allocation.blocks)
        return True

    def free(self, req: Req) -> None:
        """Every block of ``req``; its cached tokens are gone."""
        for allocation in req.allocations:
            self.allocator.free(allocation)
        req.allocations.clear()
        req.block_table.clear()
        req.num_computed = 0

    def stats(self) -> AllocatorStats:
        return self.allocator.stats()

    def check(self) -> None:
        self.allocator.check()
