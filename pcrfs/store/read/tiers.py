"""What both fetchers stand on: the group table, the record source, the two caches, and
their table of fetches in flight.

:class:`~pcrfs.store.read.fetch.GroupFetcher` (per image) and
:class:`~pcrfs.store.read.prefixtier.PrefixFetcher` (per record prefix) read the same tiers
in the same order (memory, in flight, disk, source); they differ in the unit they
fetch, so what they share is this state, not their logic.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, NamedTuple

from ..sources.backends import RecordSource
from ..sources.cache import ByteLRU
from ..sources.diskcache import DiskCache
from ..format.groups import GroupTable


class Declined(NamedTuple):
    """A tier's answer "not from me: ask the next tier", and why (counted in its stats)."""
    why: str


class Tiers:
    def __init__(self, groups: GroupTable, source: RecordSource, memory: ByteLRU | None = None,
                 disk: DiskCache | None = None) -> None:
        self.groups = groups
        self.source = source
        self.memory = memory
        self.disk = disk
        self._inflight: dict[Any, Future] = {}  # key -> the fetch readers of it wait on
        self._lock = threading.Lock()
