"""Same-host data plane: the sender maps the receiver's shared-memory pool and copies into the
offered blocks itself (a one-sided write; no socket on the data path)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import PoolArrays
from mmdisagg.pool.shm import SegmentError
from mmdisagg.transfer.planes.base import ChunkSink, DataPlane, Link, PlaneError
from mmdisagg.transfer.protocol import ChunkDone, chunk_row


def host_identity() -> str:
    """Same kernel boot and same network namespace: what 'one host' means for shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = socket.gethostname()
    return f"{boot}/netns:{os.stat('/proc/self/ns/net').st_ino}"


class ShmLink(Link):
    def __init__(self, src: PoolArrays, dst: PoolArrays) -> None:
        self.src = src
        self.dst = dst

    def write(self, src_blocks: Sequence[int], src_start: int, dst_blocks: Sequence[int],
              notice: ChunkDone) -> None:
        self.src.copy_to(self.dst, src_blocks, src_start, dst_blocks,
                         chunk_row(notice, self.dst.layout.block_size), notice.num_tokens,
                         notice.visual_runs)

    def close(self) -> None:
        self.dst.close()


class ShmPlane(DataPlane):
    name = "shm"
    receiver_backing = "shm"

    def listen(self, sink: ChunkSink) -> dict:
        if self.pool.arrays.segment_name is None:
            raise PlaneError("the shm data plane needs the receiver's pool in shared memory")
        return {"segment": self.pool.arrays.segment_name, "host": host_identity()}

    def connect(self, description: dict, peer_layout: dict) -> Link:
        here = host_identity()
        if description.get("host") != here:
            raise PlaneError(
                "the shm data plane needs both servers on one host (receiver host "
                f"{description.get('host')}, sender host {here}); use --transfer-backend tcp "
                "or mooncake across hosts")
        try:
            dst = PoolArrays.attach(str(description.get("segment")),
                                    PoolLayout.from_dict(peer_layout))
        except (SegmentError, KeyError, ValueError) as exc:
            raise PlaneError(f"cannot map the receiver's pool: {exc}") from exc
        return ShmLink(self.pool.arrays, dst)
