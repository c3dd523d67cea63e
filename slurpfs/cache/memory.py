"""A byte-bounded, thread-safe LRU of decrypted contexts, in process memory only."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    entries: int
    bytes: int
    limit: int
    hits: int
    misses: int


class PlaintextCache:
    """Maps version id -> plaintext. Versions are immutable, so entries never go stale."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, version_id: bytes) -> bytes | None:
        with self._lock:
            data = self._items.get(version_id)
            if data is None:
                self._misses += 1
                return None
            self._items.move_to_end(version_id)
            self._hits += 1
            return data

    def contains(self, version_id: bytes) -> bool:
        with self._lock:
            return version_id in self._items

    def put(self, version_id: bytes, data: bytes) -> None:
        if len(data) > self._limit // 4:
            return  # one huge context must not flush everything else
        with self._lock:
            if version_id in self._items:
                return
            self._items[version_id] = data
            self._bytes += len(data)
            while self._bytes > self._limit:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)

    def discard(self, version_id: bytes) -> None:
        with self._lock:
            data = self._items.pop(version_id, None)
            if data is not None:
                self._bytes -= len(data)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                len(self._items), self._bytes, self._limit, self._hits, self._misses
            )
