"""A running server seen from outside through its ``/metrics``: what tests, fault injection
and the soak read to know a cluster's state without reaching into its processes."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Sequence

from mmdisagg.serve.launcher import Child

USED_BLOCKS = 'mmdisagg_pool_blocks{state="used"}'
USED_KV_BLOCKS = 'mmdisagg_kv_blocks{state="used"}'
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$")


def metrics(url: str) -> dict[str, float]:
    """Every sample of a server's /metrics, keyed by name plus labels."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def used_blocks(url: str) -> float:
    """Embedding-pool blocks in use, plus KV-cache blocks on a language server."""
    samples = metrics(url)
    return samples[USED_BLOCKS] + samples.get(USED_KV_BLOCKS, 0)


def wait_pools_free(servers: Sequence[Child], timeout: float = 30) -> dict[str, float]:
    """Every live server's pools (embedding pool, KV cache) back to fully free (bounded
    wait); returns used blocks each."""
    deadline = time.monotonic() + timeout
    while True:
        used = {c.name: used_blocks(c.url) for c in servers if c.process.poll() is None}
        if not any(used.values()) or time.monotonic() > deadline:
            return used
        time.sleep(0.2)
