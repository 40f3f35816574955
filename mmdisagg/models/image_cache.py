"""Recently seen images, so that a repeated one skips work: its vision features (the encode
server's image cache, keyed by the pixels' hash: no vision forward) and its processed pixels
(the encoder half's, keyed by the image's bytes: no decoding and preprocessing)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Generic, Protocol, TypeVar


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=Sized)


class ImageCache(Generic[V]):
    """LRU map from a key to a value of ``nbytes`` bytes, bounded in bytes.

    ``put`` evicts least recently used entries until the new total fits ``max_bytes``; an entry
    larger than the whole bound is not kept. ``get`` counts as a use. Safe to share between
    threads.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: V) -> None:
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
