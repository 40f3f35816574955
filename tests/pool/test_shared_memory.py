"""Shared-memory backing with a real second process: attach, write, crash, refuse, clean up."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest
import torch

from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import EmbeddingPool, PoolArrays
from mmdisagg.pool.shm import SHM_DIR, SegmentError

LAYOUT = PoolLayout(num_blocks=16, block_size=32, hidden_size=24, dtype="bfloat16")

PEER = """
import json, os, sys, torch
from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import PoolArrays
spec = json.loads(sys.argv[1])
arrays = PoolArrays.attach(spec["name"], PoolLayout.from_dict(spec["layout"]))
gen = torch.Generator().manual_seed(spec["seed"])
n = spec["tokens"]
arrays.write(spec["blocks"], 0,
             torch.randn(n, arrays.layout.hidden_size, generator=gen).to(torch.bfloat16),
             torch.arange(n, dtype=torch.int32), torch.full((n, 3), 7, dtype=torch.int32))
if spec.get("crash"):
    os._exit(9)
arrays.close()
"""


def run_peer(name: str, blocks, tokens: int, layout: PoolLayout = LAYOUT, crash: bool = False):
    spec = {"name": name, "layout": layout.to_dict(), "blocks": list(blocks), "tokens": tokens,
            "seed": 11, "crash": crash}
    return subprocess.run([sys.executable, "-c", PEER, json.dumps(spec)], capture_output=True,
                          text=True, timeout=120)


def expected(tokens: int):
    gen = torch.Generator().manual_seed(11)
    return torch.randn(tokens, LAYOUT.hidden_size, generator=gen).to(torch.bfloat16)


def test_peer_process_writes_owner_reads_exactly():
    pool = EmbeddingPool(LAYOUT, backing="shm")
    try:
        pool.allocator.alloc_blocks(3)  # so the peer's blocks are not at the start
        allocation = pool.allocator.alloc(100)
        result = run_peer(pool.arrays.segment_name, allocation.blocks, 100)
        assert result.returncode == 0, result.stderr
        got = pool.read(allocation, 100)
        assert torch.equal(got.embeddings, expected(100))
        assert torch.equal(got.token_ids, torch.arange(100, dtype=torch.int32))
        assert (got.positions == 7).all()
    finally:
        pool.close()
    assert not (SHM_DIR / pool.arrays.segment.name).exists()


def test_segment_is_owner_only():
    pool = EmbeddingPool(LAYOUT, backing="shm")
    try:
        mode = stat.S_IMODE((SHM_DIR / pool.arrays.segment_name).stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)
    finally:
        pool.close()


def test_attacher_crash_does_not_unlink_owner_segment():
    """An attacher that dies (even abruptly) never takes the owner's segment with it."""
    pool = EmbeddingPool(LAYOUT, backing="shm")
    try:
        allocation = pool.allocator.alloc(40)
        result = run_peer(pool.arrays.segment_name, allocation.blocks, 40, crash=True)
        assert result.returncode == 9
        assert (SHM_DIR / pool.arrays.segment_name).exists()
        assert torch.equal(pool.read(allocation, 40).embeddings, expected(40))
    finally:
        pool.close()


def test_wrong_layout_is_refused():
    pool = EmbeddingPool(LAYOUT, backing="shm")
    try:
        other_hidden = PoolLayout(16, 32, 12, "bfloat16")
        result = run_peer(pool.arrays.segment_name, [0], 4, layout=other_hidden)
        assert result.returncode != 0 and "SegmentError" in result.stderr
        same_size_other_dtype = PoolLayout(16, 32, 12, "float32")
        assert same_size_other_dtype.total_bytes == LAYOUT.total_bytes
        with pytest.raises(SegmentError, match="expected"):
            PoolArrays.attach(pool.arrays.segment_name, same_size_other_dtype)
    finally:
        pool.close()


def test_attach_refuses_foreign_names():
    with pytest.raises(SegmentError, match="not an mmdisagg pool"):
        PoolArrays.attach("../etc/passwd", LAYOUT)


OWNER = """
import sys, time
from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import EmbeddingPool
pool = EmbeddingPool(PoolLayout(4, 8, 8, "float32"), backing="shm")
print(pool.arrays.segment_name, flush=True)
time.sleep(60)
"""


def test_segment_of_killed_owner_is_swept_by_next_owner():
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        name = proc.stdout.readline().strip()
        assert (SHM_DIR / name).exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert (SHM_DIR / name).exists()  # SIGKILL leaves it behind...
    pool = EmbeddingPool(LAYOUT, backing="shm")  # ...until the next owner starts
    pool.close()
    deadline = time.monotonic() + 5
    while (SHM_DIR / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (SHM_DIR / name).exists()


def test_owner_exit_without_close_unlinks():
    code = OWNER.replace("time.sleep(60)", "")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    name = result.stdout.strip()
    assert name and not (SHM_DIR / name).exists()
