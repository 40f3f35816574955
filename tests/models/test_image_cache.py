"""The image-feature cache: least recently used goes first, and the byte bound holds."""

from __future__ import annotations

import torch

from mmdisagg.models.image_cache import ImageCache


def features(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes a row


def test_get_and_put() -> None:
    cache = ImageCache(max_bytes=1000)
    value = features(2)
    assert cache.get("a") is None
    cache.put("a", value)
    assert cache.get("a") is value
    assert (cache.hits, cache.misses, cache.bytes_used, len(cache)) == (1, 1, 32, 1)


def test_evicts_least_recently_used_until_it_fits() -> None:
    cache = ImageCache(max_bytes=100)
    for key in "abc":
        cache.put(key, features(2))  # 32 bytes each: 96
    cache.get("a")  # b is now the least recently used
    cache.put("d", features(2))
    assert [key for key in "abcd" if key in cache] == ["a", "c", "d"]
    cache.put("e", features(4))  # 64 bytes: c and a must go
    assert [key for key in "abcde" if key in cache] == ["d", "e"]
    assert cache.bytes_used == 96 <= cache.max_bytes


def test_entry_larger_than_the_bound_is_not_kept() -> None:
    cache = ImageCache(max_bytes=100)
    cache.put("small", features(1))
    cache.put("huge", features(10))
    assert "huge" not in cache and "small" in cache and cache.bytes_used == 16


def test_put_again_replaces_and_recounts() -> None:
    cache = ImageCache(max_bytes=100)
    cache.put("a", features(4))
    cache.put("a", features(1))
    assert cache.bytes_used == 16 and len(cache) == 1


def test_zero_bound_caches_nothing() -> None:
    cache = ImageCache(max_bytes=0)
    cache.put("a", features(1))
    assert len(cache) == 0 and cache.bytes_used == 0
