"""Data planes by name; a backend's module is imported only when it is chosen."""

from __future__ import annotations

import importlib

from mmdisagg.transfer.planes.base import DataPlane

PLANES = {
    "shm": "mmdisagg.transfer.planes.shm:ShmPlane",
    "tcp": "mmdisagg.transfer.planes.tcp:TcpPlane",
    "mooncake": "mmdisagg.transfer.planes.mooncake:MooncakePlane",
}


def plane_class(name: str) -> type[DataPlane]:
    if name not in PLANES:
        raise ValueError(f"unknown transfer backend {name!r}; available: {', '.join(PLANES)}")
    module, cls = PLANES[name].split(":")
    return getattr(importlib.import_module(module), cls)
