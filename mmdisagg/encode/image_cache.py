"""Vision features of recently seen images, so a repeated image skips the vision tower."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class ImageCache:
    """LRU map from an image's content hash to its vision features, bounded in bytes.

    ``put`` evicts least recently used entries until the new total fits ``max_bytes``; an entry
    larger than the whole bound is not kept. ``get`` counts as a use. Safe to share between
    threads.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.nbytes
        with self._lock:
            self._remove(key)
            if size > self.max_bytes:
                return
            while self.bytes_used + size > self.max_bytes:
                self._remove(next(iter(self._entries)))
            self._entries[key] = value
            self.bytes_used += size

    def _remove(self, key: str) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.bytes_used -= value.nbytes
