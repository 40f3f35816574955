"""Data plane over Mooncake Transfer Engine: pools registered once, one-sided batch writes.

Each side starts one engine and registers its whole pool with it at start-up. The receiver
publishes its engine's session (``host:rpc_port``: Mooncake's P2P handshake, so no metadata
server; mmdisagg's bootstrap already tells the sender where to look) and its pool's base
address. A sender turns a window into byte ranges on both sides, merges neighbours, and
writes them with one batch write that returns once Mooncake reports every range complete;
the chunk notice then goes over the control channel, as for shm.

NOTE: Mooncake checks every remote address against the receiver's registered pool, but its
ports take no auth token and listen on every interface whatever ``--host`` says: as with an
RDMA fabric, the network those ports face is the trust boundary.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from mmdisagg.config import MooncakeSettings, NetworkSettings, TransferSettings
from mmdisagg.pool.layout import PoolLayout, paired_ranges
from mmdisagg.pool.pool import EmbeddingPool
from mmdisagg.transfer.planes.base import ChunkSink, DataPlane, Link, PlaneError
from mmdisagg.transfer.protocol import ChunkDone, chunk_row

P2P_HANDSHAKE = "P2PHANDSHAKE"
WHEELS = ("mooncake-transfer-engine-non-cuda on CPU hosts (pip install 'mmdisagg[mooncake]'), "
          "mooncake-transfer-engine on CUDA hosts")


def unavailable(error: ImportError) -> str:
    """Why Mooncake Transfer Engine did not load, and what fixes it."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == "mooncake":
        return f"the mooncake data plane needs Mooncake Transfer Engine: install {WHEELS}"
    message = str(error)
    if "libibverbs" in message or "libnl" in message:
        fix = "install Debian's libibverbs1 and libnl-route-3-200 (scripts/setup.sh does)"
    elif "libcuda" in message:
        fix = ("this is Mooncake's CUDA build on a host without CUDA: uninstall "
               "mooncake-transfer-engine and install mooncake-transfer-engine-non-cuda")
    else:
        fix = f"reinstall it: {WHEELS}"
    return f"cannot load Mooncake Transfer Engine ({message}): {fix}"


def engine_class() -> type:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise PlaneError(unavailable(exc)) from exc
    return TransferEngine


def session_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rdma_nics(engine: Any, device: str) -> list[str]:
    """The RDMA NICs Mooncake found (those named in ``device`` when given)."""
    topology = json.loads(engine.get_local_topology(device or None) or "{}")
    return sorted({nic for tiers in topology.values() for tier in tiers for nic in tier})


def start_engine(settings: MooncakeSettings, hostname: str, timeout_s: float) -> Any:
    """An initialized engine, or PlaneError naming what is missing."""
    # NOTE: Mooncake reads its configuration from MC_* variables. These two follow mmdisagg's
    # knobs (a write stuck on a hung receiver fails within the transfer timeout); any other
    # MC_* variable reaches the library untouched.
    os.environ["MC_LOG_LEVEL"] = settings.mooncake_log_level
    os.environ["MC_TRANSFER_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
    engine = engine_class()()
    protocol = settings.mooncake_protocol
    device = settings.mooncake_device if protocol == "rdma" else ""
    status = engine.initialize(hostname, P2P_HANDSHAKE, protocol, device)
    if status != 0:
        raise PlaneError(f"Mooncake Transfer Engine did not start on {hostname} over {protocol} "
                         f"(status {status}); its log above says why")
    if protocol == "rdma" and not rdma_nics(engine, device):
        which = f"named {device!r}" if device else "at all"
        raise PlaneError(f"--mooncake-protocol rdma, but libibverbs finds no RDMA NIC {which}; "
                         "use --mooncake-protocol tcp on hosts without one")
    return engine


class MooncakeLink(Link):
    def __init__(self, engine: Any, session: str, src: PoolLayout, src_base: int,
                 dst: PoolLayout, dst_base: int) -> None:
        self.engine = engine
        self.session = session
        self.src, self.src_base = src, src_base
        self.dst, self.dst_base = dst, dst_base

    def write(self, src_blocks: Sequence[int], src_start: int, dst_blocks: Sequence[int],
              notice: ChunkDone) -> None:
        runs = paired_ranges(self.src, src_blocks, src_start, self.dst, dst_blocks,
                             chunk_row(notice, self.dst.block_size), notice.num_tokens,
                             notice.visual_runs)
        status = self.engine.batch_transfer_sync_write(
            self.session, [self.src_base + at for at, _, _ in runs],
            [self.dst_base + at for _, at, _ in runs], [size for _, _, size in runs])
        if status != 0:
            raise PlaneError(f"mooncake write of {notice.num_tokens} tokens ({len(runs)} ranges) "
                             f"to {self.session} failed (status {status}): the receiver is gone "
                             "or unreachable; Mooncake's log says more")

    def close(self) -> None:
        self.engine = None


class MooncakePlane(DataPlane):
    name = "mooncake"

    def __init__(self, pool: EmbeddingPool, host: str, advertise_host: str, port: int,
                 auth_token: str, source: str, timeout_s: float,
                 settings: MooncakeSettings) -> None:
        super().__init__(pool, host, advertise_host, port, auth_token, source, timeout_s)
        self.settings = settings
        self.engine = start_engine(settings, advertise_host, timeout_s)
        self.session = session_name(advertise_host, self.engine.get_rpc_port())
        self.base = pool.arrays.buffer.data_ptr()
        status = self.engine.register_memory(self.base, pool.layout.total_bytes)
        if status != 0:
            raise PlaneError(f"Mooncake could not register the {pool.layout.total_bytes}-byte "
                             f"pool (status {status}); with rdma, check 'ulimit -l'")

    @classmethod
    def create(cls, pool: EmbeddingPool, transfer: TransferSettings, network: NetworkSettings,
               source: str) -> MooncakePlane:
        return cls(pool, network.host, network.reachable_host, transfer.data_port,
                   network.auth_token, source, transfer.transfer_timeout, transfer.mooncake)

    def listen(self, sink: ChunkSink) -> dict:
        return {"session": self.session, "protocol": self.settings.mooncake_protocol,
                "base": self.base}

    def connect(self, description: dict, peer_layout: dict) -> Link:
        try:
            session, protocol = str(description["session"]), str(description["protocol"])
            base = int(description["base"])
            layout = PoolLayout.from_dict(peer_layout)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlaneError(f"bad mooncake plane description {description!r}: {exc}") from None
        if protocol != self.settings.mooncake_protocol:
            raise PlaneError(f"Mooncake protocol mismatch: the receiver uses {protocol}, this "
                             f"server {self.settings.mooncake_protocol}")
        found = self.engine.get_first_buffer_address(session)
        if found == 0:
            raise PlaneError(f"cannot reach the receiver's Mooncake engine at {session} (its "
                             "handshake failed: is that address reachable from here? the "
                             "receiver sets it with --advertise-host)")
        if found != base:
            raise PlaneError(f"the Mooncake engine at {session} holds a pool at {found:#x}, not "
                             f"the receiver's at {base:#x}")
        return MooncakeLink(self.engine, session, self.pool.layout, self.base, layout, base)

    def close(self) -> None:
        """Unregister the pool (later writes into it are refused) and let the engine go."""
        self.engine.unregister_memory(self.base)
        self.engine = None
