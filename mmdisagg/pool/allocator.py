"""Block allocator of the embedding pool.

NOTE: blocks come back in any order and are not contiguous, and a block freed a moment ago is
the first one handed out again (a LIFO free list). Nothing may assume order or contiguity, or
compare block ids to detect progress: that is what seed notes 02-04 got wrong.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field


class AllocatorError(RuntimeError):
    """A free that would corrupt the pool: double free, foreign or out-of-range block."""


_allocator_ids = itertools.count(1)


@dataclass(frozen=True, eq=False)
class Allocation:
    """Blocks owned by one request. Compared by identity: two allocations are never equal."""

    blocks: tuple[int, ...]
    block_size: int
    allocation_id: int
    allocator_id: int = field(repr=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def allocated_tokens(self) -> int:
        """Always whole blocks, never the requested count (seed note 01: 8000 -> 8064)."""
        return len(self.blocks) * self.block_size


@dataclass(frozen=True)
class AllocatorStats:
    total_blocks: int
    free_blocks: int
    used_blocks: int
    live_allocations: int
    allocs: int
    frees: int
    failed_allocs: int


class BlockAllocator:
    """Hands out whole blocks of a pool of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int, default_blocks: int = 8) -> None:
        if num_blocks <= 0 or block_size <= 0 or default_blocks <= 0:
            raise ValueError("num_blocks, block_size and default_blocks must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.default_blocks = default_blocks
        self._id = next(_allocator_ids)
        self._lock = threading.Lock()
        self._free_block_ids: list[int] = list(reversed(range(num_blocks)))
        self._live: dict[int, Allocation] = {}
        self._used_block_ids: set[int] = set()
        self._serial = itertools.count(1)
        self._allocs = self._frees = self._failed = 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_block_ids)

    def alloc(self, num_tokens: int) -> Allocation | None:
        """Enough whole blocks for ``num_tokens``, or None when not enough are free."""
        if num_tokens <= 0:
            raise ValueError(f"alloc needs a positive token count, got {num_tokens}")
        return self.alloc_blocks(self.blocks_for(num_tokens))

    def alloc_default(self) -> Allocation | None:
        """The first window of a request whose length is not known yet (seed note 02)."""
        return self.alloc_blocks(self.default_blocks)

    def alloc_blocks(self, num_blocks: int) -> Allocation | None:
        """Exactly ``num_blocks`` blocks, or None: never a partial allocation."""
        taken = self.alloc_each(1, num_blocks)
        return taken[0] if taken else None

    def alloc_each(self, count: int, num_blocks: int) -> list[Allocation] | None:
        """``count`` allocations of ``num_blocks`` blocks each (to be freed one by one), or
        None: all or nothing."""
        if num_blocks <= 0 or count <= 0:
            raise ValueError(f"need a positive count of positive block counts, got {count} "
                             f"of {num_blocks}")
        with self._lock:
            if count * num_blocks > len(self._free_block_ids):
                self._failed += 1
                return None
            allocations = []
            for _ in range(count):
                taken = self._free_block_ids[-num_blocks:]
                del self._free_block_ids[-num_blocks:]
                taken.reverse()
                allocation = Allocation(tuple(taken), self.block_size, next(self._serial),
                                        self._id)
                self._live[allocation.allocation_id] = allocation
                self._used_block_ids.update(taken)
                allocations.append(allocation)
            self._allocs += count
            return allocations

    def free(self, allocation: Allocation) -> None:
        """Return the blocks. A second free, or blocks this allocator never gave, is an error."""
        with self._lock:
            self._check_owned(allocation)
            del self._live[allocation.allocation_id]
            self._used_block_ids.difference_update(allocation.blocks)
            self._free_block_ids.extend(reversed(allocation.blocks))
            self._frees += 1

    def shrink(self, allocation: Allocation, keep_blocks: int) -> Allocation:
        """Free the tail beyond ``keep_blocks`` and return the smaller allocation that replaces
        ``allocation`` (which is no longer valid)."""
        if not 0 < keep_blocks <= allocation.num_blocks:
            raise ValueError(f"cannot keep {keep_blocks} of {allocation.num_blocks} blocks")
        if keep_blocks == allocation.num_blocks:
            return allocation
        with self._lock:
            self._check_owned(allocation)
            del self._live[allocation.allocation_id]
            kept = Allocation(allocation.blocks[:keep_blocks], self.block_size,
                              next(self._serial), self._id)
            self._live[kept.allocation_id] = kept
            tail = allocation.blocks[keep_blocks:]
            self._used_block_ids.difference_update(tail)
            self._free_block_ids.extend(reversed(tail))
            return kept

    def _check_owned(self, allocation: Allocation) -> None:
        for block in allocation.blocks:
            if not 0 <= block < self.num_blocks:
                raise AllocatorError(
                    f"block {block} is out of range for a pool of {self.num_blocks} blocks")
        if allocation.allocator_id != self._id:
            raise AllocatorError(
                f"block {allocation.blocks[0]} belongs to another pool "
                f"(allocation #{allocation.allocation_id} of allocator {allocation.allocator_id})")
        if self._live.get(allocation.allocation_id) is not allocation:
            raise AllocatorError(
                f"block {allocation.blocks[0]} of allocation #{allocation.allocation_id} "
                f"is not allocated: double free")

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    def stats(self) -> AllocatorStats:
        with self._lock:
            return AllocatorStats(
                total_blocks=self.num_blocks,
                free_blocks=len(self._free_block_ids),
                used_blocks=len(self._used_block_ids),
                live_allocations=len(self._live),
                allocs=self._allocs,
                frees=self._frees,
                failed_allocs=self._failed,
            )

    def check(self) -> None:
        """Integrity: free + used == total, no block twice, live allocations disjoint."""
        with self._lock:
            free = self._free_block_ids
            if len(set(free)) != len(free):
                raise AllocatorError("a block is on the free list twice")
            if set(free) & self._used_block_ids:
                raise AllocatorError(
                    f"blocks {sorted(set(free) & self._used_block_ids)} are both free and used")
            if len(free) + len(self._used_block_ids) != self.num_blocks:
                raise AllocatorError(
                    f"free {len(free)} + used {len(self._used_block_ids)} != {self.num_blocks}")
            in_live = [b for a in self._live.values() for b in a.blocks]
            if len(in_live) != len(set(in_live)) or set(in_live) != self._used_block_ids:
                raise AllocatorError("live allocations overlap or disagree with the used set")
