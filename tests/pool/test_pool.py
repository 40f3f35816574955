"""EmbeddingPool scatter/gather over unordered, non-contiguous, reused blocks."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmdisagg.pool.allocator import Allocation
from mmdisagg.pool.layout import PoolLayout, paired_ranges, runs_within
from mmdisagg.pool.pool import EmbeddingPool

BLOCK = 128


def make_tokens(n: int, hidden: int, seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, hidden, generator=gen).to(dtype),
        torch.randint(0, 150_000, (n,), generator=gen, dtype=torch.int32),
        torch.randint(0, 10_000, (n, 3), generator=gen, dtype=torch.int32),
    )


def assert_reads_back(pool, allocation, tokens, start=0):
    embeddings, token_ids, positions = tokens
    got = pool.read(allocation, len(token_ids), start)
    assert torch.equal(got.embeddings, embeddings)
    assert torch.equal(got.token_ids, token_ids)
    assert torch.equal(got.positions, positions)


@pytest.fixture(params=["process", "shm"])
def pool(request):
    layout = PoolLayout(num_blocks=32, block_size=BLOCK, hidden_size=16, dtype="bfloat16")
    pool = EmbeddingPool(layout, backing=request.param)
    yield pool
    pool.close()


def test_unordered_non_contiguous_blocks_round_trip(pool):
    """Seed notes 02/04: [15..19, 14..10] must not be read from min(block) * block_size."""
    blocks = (15, 16, 17, 18, 19, 14, 13, 12, 11, 10)
    allocation = Allocation(blocks, BLOCK, allocation_id=-1, allocator_id=-1)
    tokens = make_tokens(len(blocks) * BLOCK - 37, 16, seed=1)
    pool.write(allocation, 0, *tokens)
    assert_reads_back(pool, allocation, tokens)
    # and nothing landed in the neighbours a contiguous misreading would have used
    assert not pool.arrays.embeddings[:10].any() and not pool.arrays.embeddings[20:].any()
    assert torch.equal(pool.arrays.token_ids[14, :BLOCK], tokens[1][5 * BLOCK: 6 * BLOCK])


def test_write_at_offset_spans_blocks(pool):
    allocation = pool.allocator.alloc(1000)
    first, second = make_tokens(300, 16, seed=2), make_tokens(700, 16, seed=3)
    pool.write(allocation, 0, *first)
    pool.write(allocation, 300, *second)
    assert_reads_back(pool, allocation, first)
    assert_reads_back(pool, allocation, second, start=300)


def test_reused_block_holds_new_data_not_old(pool):
    """A block freed and re-allocated at once reads the new request's data (seed note 05)."""
    old = pool.allocator.alloc(2 * BLOCK)
    pool.write(old, 0, *make_tokens(2 * BLOCK, 16, seed=4))
    pool.allocator.free(old)
    new = pool.allocator.alloc(BLOCK + 5)
    assert new.blocks == old.blocks
    fresh = make_tokens(BLOCK + 5, 16, seed=5)
    pool.write(new, 0, *fresh)
    assert_reads_back(pool, new, fresh)


def test_overflowing_write_is_refused(pool):
    allocation = pool.allocator.alloc_blocks(1)
    with pytest.raises(IndexError):
        pool.write(allocation, 100, *make_tokens(29, 16, seed=6))
    with pytest.raises(ValueError):
        embeddings, token_ids, positions = make_tokens(10, 16, seed=6)
        pool.write(allocation, 0, embeddings[:, :8], token_ids, positions)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_dtypes(dtype):
    layout = PoolLayout(num_blocks=4, block_size=8, hidden_size=5, dtype=dtype)
    pool = EmbeddingPool(layout)
    allocation = pool.allocator.alloc(20)
    tokens = make_tokens(20, 5, seed=7, dtype=layout.torch_dtype)
    pool.write(allocation, 0, *tokens)
    assert_reads_back(pool, allocation, tokens)


def test_layout_block_ranges_are_disjoint_and_inside_buffer():
    layout = PoolLayout(num_blocks=7, block_size=16, hidden_size=24, dtype="bfloat16")
    ranges = sorted(layout.block_range(a, b) for a in ("embeddings", "token_ids", "positions")
                    for b in range(7))
    for (start, size), (next_start, _) in itertools.pairwise(ranges):
        assert start + size <= next_start
    assert ranges[-1][0] + ranges[-1][1] <= layout.total_bytes
    with pytest.raises(IndexError):
        layout.block_range("embeddings", 7)


def test_layout_mismatch_names_the_field():
    base = PoolLayout(8, 128, 64, "bfloat16")
    assert base.mismatch(PoolLayout(99, 128, 64, "bfloat16")) is None
    assert "hidden_size 64 here vs 32" in base.mismatch(PoolLayout(8, 128, 32, "bfloat16"))
    assert "dtype" in base.mismatch(PoolLayout(8, 128, 64, "float32"))


operations = st.lists(
    st.one_of(st.tuples(st.just("alloc"), st.integers(1, 5 * 16)),
              st.tuples(st.just("free"), st.integers(0, 1000))),
    min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_alloc_write_free_sequences(ops):
    """Every live allocation reads back what was written; no block shared; accounting holds."""
    layout = PoolLayout(num_blocks=12, block_size=16, hidden_size=4, dtype="float32")
    pool = EmbeddingPool(layout)
    live: list[tuple[Allocation, tuple]] = []
    for step, (op, value) in enumerate(ops):
        if op == "alloc":
            allocation = pool.allocator.alloc(value)
            if allocation is None:
                assert pool.allocator.num_free_blocks < pool.allocator.blocks_for(value)
                continue
            tokens = make_tokens(value, 4, seed=step, dtype=torch.float32)
            pool.write(allocation, 0, *tokens)
            live.append((allocation, tokens))
        elif live:
            allocation, _ = live.pop(value % len(live))
            pool.allocator.free(allocation)
        pool.allocator.check()
        used = [b for allocation, _ in live for b in allocation.blocks]
        assert len(used) == len(set(used))
        stats = pool.allocator.stats()
        assert stats.free_blocks + stats.used_blocks == layout.num_blocks == (
            stats.free_blocks + len(used))
        for allocation, tokens in live:
            assert_reads_back(pool, allocation, tokens)


@pytest.mark.parametrize("src_start, dst_start, count", [(0, 0, 300), (256, 0, 200),
                                                         (128, 5, 130), (0, 0, 0)])
def test_copy_between_pools_block_to_block(src_start, dst_start, count):
    layout = PoolLayout(num_blocks=8, block_size=BLOCK, hidden_size=16, dtype="bfloat16")
    src, dst = EmbeddingPool(layout), EmbeddingPool(layout, backing="shm")
    try:
        src.allocator.alloc_blocks(1)
        src_alloc = src.allocator.alloc_blocks(5)
        dst_alloc = Allocation((6, 2, 4), BLOCK, allocation_id=-1, allocator_id=-1)
        tokens = make_tokens(5 * BLOCK, 16, seed=8)
        src.write(src_alloc, 0, *tokens)
        src.arrays.copy_to(dst.arrays, src_alloc.blocks, src_start, dst_alloc.blocks, dst_start,
                           count)
        window = tuple(t[src_start: src_start + count] for t in tokens)
        assert_reads_back(dst, dst_alloc, window, start=dst_start)
    finally:
        src.close()
        dst.close()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_paired_ranges_copy_any_window_between_pools_of_different_sizes(data):
    """The runs a one-sided plane writes (mooncake): applied as plain copies they move exactly
    the window's tokens; neighbouring blocks on both sides cost one run per array."""
    src_layout = PoolLayout(num_blocks=12, block_size=BLOCK, hidden_size=8, dtype="float16")
    dst_layout = PoolLayout(num_blocks=7, block_size=BLOCK, hidden_size=8, dtype="float16")
    src, dst = EmbeddingPool(src_layout), EmbeddingPool(dst_layout)
    count = data.draw(st.integers(1, 4 * BLOCK))
    src_start = data.draw(st.integers(0, 3)) * BLOCK
    used = -(-count // BLOCK)
    src_blocks = data.draw(st.permutations(range(12)))[: src_start // BLOCK + used]
    dst_blocks = data.draw(st.permutations(range(7)))[:used]
    tokens = make_tokens(len(src_blocks) * BLOCK, 8, seed=count, dtype=torch.float16)
    src.arrays.write(src_blocks, 0, *tokens)
    runs = paired_ranges(src_layout, src_blocks, src_start, dst_layout, dst_blocks, 0, count)
    src_bytes, dst_bytes = src.arrays.buffer, dst.arrays.buffer
    for src_at, dst_at, size in runs:
        dst_bytes[dst_at: dst_at + size] = src_bytes[src_at: src_at + size]
    got = dst.arrays.read(dst_blocks, count)
    window = [t[src_start: src_start + count] for t in tokens]
    assert torch.equal(got.embeddings, window[0]) and torch.equal(got.token_ids, window[1])
    assert torch.equal(got.positions, window[2])
    assert sum(size for *_, size in runs) == count * src_layout.token_bytes
    for (a_src, a_dst, a_size), (b_src, b_dst, _) in itertools.pairwise(runs):
        assert not (a_src + a_size == b_src and a_dst + a_size == b_dst)


def test_paired_ranges_merge_blocks_adjacent_in_both_pools():
    layout = PoolLayout(num_blocks=8, block_size=BLOCK, hidden_size=8, dtype="float16")
    assert len(paired_ranges(layout, [2, 3, 4], 0, layout, [5, 6, 7], 0, 3 * BLOCK)) == 3
    assert len(paired_ranges(layout, [2, 3, 4], 0, layout, [5, 7, 6], 0, 3 * BLOCK)) == 9


def test_fast_copy_tunable_keeps_other_tunables():
    from mmdisagg.pool.pool import FAST_COPY_TUNABLE, with_fast_copies
    assert with_fast_copies({})["GLIBC_TUNABLES"] == FAST_COPY_TUNABLE
    env = with_fast_copies({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{FAST_COPY_TUNABLE}"
    mine = "glibc.cpu.x86_non_temporal_threshold=0x1000"
    assert with_fast_copies({"GLIBC_TUNABLES": mine})["GLIBC_TUNABLES"] == mine


# -- deepstack rows (Qwen3-VL) ------------------------------------------------------------

DEEPSTACK = PoolLayout(num_blocks=12, block_size=BLOCK, hidden_size=8, dtype="float16",
                       deepstack_layers=3)


def test_deepstack_array_only_when_the_model_has_it():
    plain = PoolLayout(num_blocks=12, block_size=BLOCK, hidden_size=8, dtype="float16")
    assert "deepstack" not in plain.arrays and EmbeddingPool(plain).arrays.deepstack is None
    assert DEEPSTACK.arrays[-1] == "deepstack"
    assert DEEPSTACK.deepstack_bytes == 3 * 8 * 2
    assert DEEPSTACK.total_bytes >= plain.total_bytes + 12 * BLOCK * DEEPSTACK.deepstack_bytes
    assert DEEPSTACK.mismatch(plain) == "pool layout mismatch: deepstack_layers 3 here vs 0 at " \
                                        "the peer"
    assert PoolLayout.from_dict(DEEPSTACK.to_dict()) == DEEPSTACK
    # text tokens move what they move without deepstack rows: same ranges, same bytes
    assert DEEPSTACK.byte_ranges([4, 1], 0, 200) == [
        (DEEPSTACK.offset(a) + at - plain.offset(a), size)
        for a, (at, size) in zip([a for a in plain.arrays for _ in range(2)],
                                 plain.byte_ranges([4, 1], 0, 200), strict=True)]
    assert DEEPSTACK.chunk_bytes(200) == plain.chunk_bytes(200) == 200 * plain.token_bytes


@pytest.mark.parametrize("runs", [[(0, 1), (5, 3)], [(120, 20)], [(199, 1)], []])
def test_deepstack_rows_of_visual_runs_round_trip_and_copy(runs):
    src, dst = EmbeddingPool(DEEPSTACK), EmbeddingPool(DEEPSTACK, backing="shm")
    try:
        src_blocks, dst_blocks = [7, 2, 9], [3, 0]
        tokens = make_tokens(3 * BLOCK, 8, seed=9, dtype=torch.float16)
        src.arrays.write(src_blocks, 0, *tokens)
        visual = sum(count for _, count in runs)
        rows = torch.randn(visual, 3, 8).to(torch.float16)
        start = BLOCK  # the chunk is tokens [128, 328) of the prompt
        src.arrays.write_deepstack(src_blocks, start, runs, rows)
        assert torch.equal(src.arrays.read_deepstack(src_blocks, start, runs), rows)
        src.arrays.copy_to(dst.arrays, src_blocks, start, dst_blocks, 0, 200, runs)
        assert torch.equal(dst.arrays.read_deepstack(dst_blocks, 0, runs), rows)
        got = dst.arrays.read(dst_blocks, 200)
        assert torch.equal(got.embeddings, tokens[0][start: start + 200])
        assert int(dst.arrays.deepstack.flatten(2).any(dim=2).sum()) == visual  # only theirs
        moved = sum(size for *_, size in paired_ranges(DEEPSTACK, src_blocks, start, DEEPSTACK,
                                                        dst_blocks, 0, 200, runs))
        assert moved == DEEPSTACK.chunk_bytes(200, runs)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("runs", [[(5, 3), (0, 1)], [(0, 0)], [(190, 20)], [(-1, 2)],
                                  [(3, 4), (6, 1)]])
def test_bad_visual_runs_are_refused(runs):
    with pytest.raises(IndexError, match="visual runs"):
        DEEPSTACK.byte_ranges([0, 1], 0, 200, runs)


def test_visual_runs_need_a_deepstack_pool():
    plain = PoolLayout(num_blocks=2, block_size=BLOCK, hidden_size=8, dtype="float16")
    with pytest.raises(IndexError, match="without deepstack rows"):
        plain.byte_ranges([0, 1], 0, 200, [(0, 1)])


def test_runs_within_clips_a_prompts_runs_to_a_window():
    prompt_runs = [(10, 20), (100, 200), (400, 5)]
    assert runs_within(prompt_runs, 0, 128) == [(10, 20), (100, 28)]
    assert runs_within(prompt_runs, 128, 256) == [(0, 172)]
    assert runs_within(prompt_runs, 384, 128) == [(16, 5)]
    assert runs_within(prompt_runs, 512, 128) == []
