"""A byte-bounded LRU cache for verified scan groups.

Scan group g of an image is the same bytes in every view scanK with K >= g, so
caching groups (not assembled files) lets scan1, scan5 and full share them.
Record prefixes (:mod:`pcrfs.store.read.prefixtier`) share the same budget: any value
whose ``len()`` is its size in bytes may be cached. Whoever holds on to values past
a ``get`` (the mount's compiled path) or must save them elsewhere before they go
(the disk cache's write-back) hears of every value that leaves (:meth:`on_evict`).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, NamedTuple

log = logging.getLogger("pcrfs.store")


class GroupKey(NamedTuple):
    """The memory-cache key of scan group ``group`` (1-based) of image ``image``: its
    verified bytes (the per-image tier's entries, and the local tier's)."""
    image: int
    group: int


class PrefixKey(NamedTuple):
    """The memory-cache key of record ``record``'s prefix: a
    :class:`~pcrfs.store.read.prefixtier.RecordPrefix` (the record-prefix tier's entries)."""
    record: int


class ByteLRU:
    """Least-recently-used mapping whose values' total length stays <= capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._evict_listeners: list[Callable[[Hashable, Any], None]] = []
        self._kept: Callable[[Hashable], bool] | None = None

    def keep_while(self, kept: Callable[[Hashable], bool]) -> None:
        """Evict no entry for which ``kept(key)`` is true (called under the cache's lock: it
        must be quick and take no lock of the cache's): the record-prefix tier's pinned
        prefixes, which the mount's compiled path reads without refreshing them here. A value
        that fits only by evicting kept entries is not cached (the owner of ``kept`` keeps its
        entries' total below the capacity)."""
        self._kept = kept

    def on_evict(self, listener: Callable[[Hashable, Any], None]) -> None:
        """Call ``listener(key, value)`` after a value leaves (evicted or replaced; no lock held)."""
        self._evict_listeners.append(listener)

    def items(self) -> list[tuple[Hashable, Any]]:
        """A snapshot of the entries, least recently used first."""
        with self._lock:
            return list(self._items.items())

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
        gone = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
                gone.append((key, old))
            self._items[key] = value
            self._bytes += size
            kept, skipped = self._kept, 0
            while self._bytes > self.capacity:
                oldest = next(iter(self._items))
                if kept is not None and oldest != key and kept(oldest):
                    self._items.move_to_end(oldest)  # kept: to the back of the line
                    skipped += 1
                    if skipped < len(self._items):
                        continue
                    oldest = key  # only kept entries besides it: the new value goes
                value_gone = self._items.pop(oldest)
                self._bytes -= len(value_gone)
                gone.append((oldest, value_gone))
                skipped = 0
                if oldest == key:
                    break
        if gone and self._evict_listeners:
            for k, v in gone:
                for listener in self._evict_listeners:
                    try:
                        listener(k, v)
                    except Exception:  # noqa: BLE001 - a listener's failure must not fail the cache
                        log.exception("memory cache eviction listener failed for %r", k)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
