"""BlockAllocator: the seed notes' scenarios, errors that name the block, accounting."""

from __future__ import annotations

import threading

import pytest

from mmdisagg.pool.allocator import AllocatorError, BlockAllocator


def test_whole_blocks_exact_multiple():
    allocator = BlockAllocator(num_blocks=128, block_size=128)
    allocation = allocator.alloc(8192)
    assert allocation.num_blocks == 64
    assert allocation.allocated_tokens == 8192


def test_allocated_tokens_is_blocks_times_block_size_not_request():
    """Seed note 01: 8000 requested -> 63 blocks -> 8064, so the peer's check holds."""
    allocator = BlockAllocator(num_blocks=128, block_size=128)
    allocation = allocator.alloc(8000)
    assert allocation.num_blocks == 63
    assert allocation.allocated_tokens == 8064
    assert allocation.allocated_tokens // len(allocation.blocks) == 128
    assert allocation.allocated_tokens % len(allocation.blocks) == 0


def test_resume_remainder_rounds_up():
    allocator = BlockAllocator(num_blocks=16, block_size=128)
    remainder = allocator.alloc(1000)
    assert remainder.num_blocks == 8 and remainder.allocated_tokens == 1024


def test_alloc_default_is_configured_block_count():
    """Seed note 02: the language side does not know the length, so it asks for blocks."""
    allocator = BlockAllocator(num_blocks=16, block_size=128, default_blocks=8)
    allocation = allocator.alloc_default()
    assert allocation.num_blocks == 8 and allocation.allocated_tokens == 1024


def test_not_enough_blocks_is_none_and_nothing_taken():
    allocator = BlockAllocator(num_blocks=4, block_size=128)
    held = allocator.alloc_blocks(3)
    assert allocator.alloc_blocks(2) is None
    assert allocator.alloc(200) is None
    assert allocator.num_free_blocks == 1
    stats = allocator.stats()
    assert stats.failed_allocs == 2 and stats.used_blocks == 3
    allocator.free(held)
    assert allocator.alloc_blocks(4) is not None


@pytest.mark.parametrize("count", [0, -1])
def test_non_positive_requests_are_errors(count):
    allocator = BlockAllocator(num_blocks=4, block_size=128)
    with pytest.raises(ValueError):
        allocator.alloc(count)
    with pytest.raises(ValueError):
        allocator.alloc_blocks(count)


def test_freed_blocks_are_handed_out_again_at_once():
    """Seed note 03: the same ids come back, so ids can never signal progress."""
    allocator = BlockAllocator(num_blocks=64, block_size=128)
    first = allocator.alloc_blocks(8)
    allocator.free(first)
    second = allocator.alloc_blocks(8)
    assert second.blocks == first.blocks
    assert second is not first and second.allocation_id != first.allocation_id


def test_double_free_names_the_block():
    allocator = BlockAllocator(num_blocks=8, block_size=128)
    allocation = allocator.alloc_blocks(2)
    allocator.free(allocation)
    with pytest.raises(AllocatorError, match=rf"block {allocation.blocks[0]}\b.*double free"):
        allocator.free(allocation)
    allocator.check()


def test_stale_allocation_after_reuse_is_a_double_free():
    """Freeing an old allocation whose blocks now belong to someone else must not free them."""
    allocator = BlockAllocator(num_blocks=8, block_size=128)
    old = allocator.alloc_blocks(2)
    allocator.free(old)
    new = allocator.alloc_blocks(2)
    assert new.blocks == old.blocks
    with pytest.raises(AllocatorError, match="double free"):
        allocator.free(old)
    assert allocator.stats().used_blocks == 2
    allocator.free(new)


def test_foreign_allocation_names_the_block():
    mine, theirs = BlockAllocator(8, 128), BlockAllocator(8, 128)
    foreign = theirs.alloc_blocks(1)
    with pytest.raises(AllocatorError, match=rf"block {foreign.blocks[0]} belongs to another"):
        mine.free(foreign)


def test_out_of_range_block_names_it():
    small, big = BlockAllocator(4, 128), BlockAllocator(64, 128)
    for _ in range(10):
        big.alloc_blocks(1)
    far = big.alloc_blocks(1)
    with pytest.raises(AllocatorError, match=rf"block {far.blocks[0]} is out of range"):
        small.free(far)


def test_thread_safety_and_accounting():
    allocator = BlockAllocator(num_blocks=64, block_size=16)
    errors = []

    def churn(seed: int) -> None:
        import random
        rng = random.Random(seed)
        held = []
        for _ in range(2000):
            if held and rng.random() < 0.5:
                allocator.free(held.pop(rng.randrange(len(held))))
            else:
                allocation = allocator.alloc_blocks(rng.randint(1, 4))
                if allocation is not None:
                    held.append(allocation)
        for allocation in held:
            allocator.free(allocation)

    threads = [threading.Thread(target=lambda s=s: _record(errors, churn, s)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    allocator.check()
    stats = allocator.stats()
    assert stats.free_blocks == 64 and stats.used_blocks == 0 and stats.live_allocations == 0
    assert stats.allocs == stats.frees


def _record(errors, fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # collected and asserted on in the main thread
        errors.append(exc)


def test_shrink_frees_the_tail_and_replaces_the_allocation():
    allocator = BlockAllocator(num_blocks=16, block_size=128, default_blocks=8)
    window = allocator.alloc_default()
    kept = allocator.shrink(window, 2)
    assert kept.blocks == window.blocks[:2] and kept.allocated_tokens == 256
    assert allocator.num_free_blocks == 14
    with pytest.raises(AllocatorError, match="double free"):
        allocator.free(window)
    allocator.free(kept)
    allocator.check()
    assert allocator.num_free_blocks == 16
