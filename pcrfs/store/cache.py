"""A byte-bounded LRU cache for verified scan groups.

Scan group g of an image is the same bytes in every view scanK with K >= g, so
caching groups (not assembled files) lets scan1, scan5 and full share them.
Record prefixes (:mod:`pcrfs.store.prefixfetch`) share the same budget: any value
whose ``len()`` is its size in bytes may be cached.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable


class ByteLRU:
    """Least-recently-used mapping whose values' total length stays <= capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def peek(self, key: Hashable) -> bytes | None:
        """The value if present, without counting a hit or a miss or refreshing it."""
        with self._lock:
            return self._items.get(key)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, value: bytes) -> None:
        size = len(value)
        if size > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
