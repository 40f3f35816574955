"""Test-wide settings: one thread per process (2 shared cores), offline hub, no shm leaks."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from mmdisagg.pool.shm import PREFIX, SHM_DIR

torch.set_num_threads(1)


def _segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(PREFIX + "*")}


@pytest.fixture(autouse=True, scope="session")
def no_leaked_shared_memory():
    """Every pool segment a test created is unlinked by the time the session ends."""
    before = _segments()
    yield
    leaked = _segments() - before
    assert not leaked, f"shared-memory segments leaked in {SHM_DIR}: {sorted(leaked)}"
