"""The per-sequence KV cache keeps what it holds when it grows."""

from __future__ import annotations

import torch

from mmdisagg.models.kv_cache import KVCache


def test_growth_keeps_cached_tokens() -> None:
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                    device=torch.device("cpu"), capacity=2)
    written = []
    for step in range(5):
        keys = torch.full((1, 3, 2), float(step))
        cache.reserve(3)
        for layer in range(2):
            all_keys, all_values = cache.write(layer, keys, -keys)
        cache.advance(3)
        written.append(keys)
    assert cache.length == 15 and cache.capacity >= 15
    assert torch.equal(all_keys, torch.cat(written, dim=1))
    assert torch.equal(all_values, -all_keys)
    assert cache.nbytes == 2 * 2 * cache.capacity * 2 * 4
