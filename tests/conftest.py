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

# Processes the tests started (harnesses add theirs). Other sessions may share /dev/shm, so
# only segments created by this process or these count as ours.
SPAWNED: set[int] = {os.getpid()}


def segments_of(pids: set[int]) -> set[str]:
    return {p.name for p in SHM_DIR.glob(PREFIX + "*")
            if p.name[len(PREFIX):].split("-", 1)[0] in {str(pid) for pid in pids}}


@pytest.fixture(autouse=True, scope="session")
def no_leaked_shared_memory():
    """Every pool segment the tests' processes created is unlinked when the session ends."""
    yield
    leaked = segments_of(SPAWNED)
    assert not leaked, f"shared-memory segments leaked in {SHM_DIR}: {sorted(leaked)}"
