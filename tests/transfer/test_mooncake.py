"""The mooncake plane on its own: start-up errors that name their cause, the handshake check
in connect, and one-sided writes between two real engines (in this process, on 127.0.0.1)."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from backends import requires_mooncake

from mmdisagg.config import MooncakeSettings, NetworkSettings, TransferSettings
from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.planes.base import PlaneError
from mmdisagg.transfer.planes.mooncake import MooncakePlane, unavailable
from mmdisagg.transfer.protocol import ChunkDone

BLOCK = 128


def make_plane(pool: EmbeddingPool, **knobs) -> MooncakePlane:
    transfer = TransferSettings(transfer_backend="mooncake", transfer_timeout=5.0,
                                mooncake=MooncakeSettings(**knobs))
    return MooncakePlane.create(pool, transfer, NetworkSettings(), "test")


@pytest.fixture
def pools():
    made = [EmbeddingPool(PoolLayout(n, BLOCK, 64, "bfloat16")) for n in (16, 8)]
    yield made
    for pool in made:
        pool.close()


@pytest.mark.parametrize("error, cause", [
    (ModuleNotFoundError("No module named 'mooncake'", name="mooncake"),
     "pip install 'mmdisagg[mooncake]'"),
    (ImportError("libibverbs.so.1: cannot open shared object file: No such file or directory"),
     "install Debian's libibverbs1 and libnl-route-3-200"),
    (ImportError("libcuda.so.1: cannot open shared object file: No such file or directory"),
     "Mooncake's CUDA build on a host without CUDA"),
])
def test_load_failures_name_their_cause(error, cause):
    assert cause in unavailable(error)


def test_start_without_the_library_names_the_wheels(monkeypatch, pools):
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    with pytest.raises(PlaneError, match="needs Mooncake Transfer Engine: install "
                                         "mooncake-transfer-engine-non-cuda on CPU hosts"):
        make_plane(pools[0])


@requires_mooncake
def test_rdma_without_that_nic_fails_at_start(pools):
    with pytest.raises(PlaneError, match="no RDMA NIC named 'mmdisagg_no_such_nic'"):
        make_plane(pools[0], mooncake_protocol="rdma", mooncake_device="mmdisagg_no_such_nic")


@requires_mooncake
def test_connect_checks_the_receiver_before_any_write(pools):
    sender = make_plane(pools[0])
    layout = pools[1].layout.to_dict()
    try:
        with pytest.raises(PlaneError, match=re.escape(
                "cannot reach the receiver's Mooncake engine at 127.0.0.1:1 (its handshake")):
            sender.connect({"session": "127.0.0.1:1", "protocol": "tcp", "base": 4096}, layout)
        with pytest.raises(PlaneError, match="protocol mismatch: the receiver uses rdma"):
            sender.connect({"session": sender.session, "protocol": "rdma", "base": 4096}, layout)
        with pytest.raises(PlaneError, match="bad mooncake plane description"):
            sender.connect({"session": sender.session}, layout)
        with pytest.raises(PlaneError, match="holds a pool at"):
            sender.connect({"session": sender.session, "protocol": "tcp", "base": 4096}, layout)
    finally:
        sender.close()


@requires_mooncake
def test_one_sided_write_lands_exactly_and_fails_once_the_receiver_is_gone(pools):
    src, dst = pools
    receiver, sender = make_plane(dst), make_plane(src)
    try:
        link = sender.connect(receiver.listen(sink=None), dst.layout.to_dict())
        gen = torch.Generator().manual_seed(3)
        tokens = (torch.randn(7 * BLOCK, 64, generator=gen).to(torch.bfloat16),
                  torch.randint(0, 150_000, (7 * BLOCK,), generator=gen, dtype=torch.int32),
                  torch.randint(0, 4096, (7 * BLOCK, 3), generator=gen, dtype=torch.int32))
        src_blocks = [9, 3, 4, 5, 12, 0, 1]
        src.arrays.write(src_blocks, 0, *tokens)
        dst_blocks = [6, 0, 1, 2, 7]  # 0..2 neighbour 3..5 at the source: merged writes
        count = 4 * BLOCK + 77  # a resumed window: request tokens 256.. of the sender's blocks
        link.write(src_blocks, 2 * BLOCK, dst_blocks, ChunkDone(1, 2 * BLOCK, count, 10**4, 0))
        got = dst.arrays.read(dst_blocks, count)
        window = [t[2 * BLOCK: 2 * BLOCK + count] for t in tokens]
        assert torch.equal(got.embeddings, window[0]) and torch.equal(got.token_ids, window[1])
        assert torch.equal(got.positions, window[2])
        receiver.close()
        with pytest.raises(PlaneError, match="the receiver is gone or unreachable"):
            link.write(src_blocks, 0, dst_blocks, ChunkDone(1, 0, BLOCK, 10**4, 0))
        link.close()
    finally:
        sender.close()
        if receiver.engine is not None:
            receiver.close()
