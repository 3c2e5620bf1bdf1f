"""From "groups of image i" to verified bytes: caches, requests in flight, readahead.

:class:`GroupFetcher` sits between the group table (which groups an image at
fidelity k needs, where they are: :class:`~pcrfs.store.format.groups.GroupTable`) and a
record source (bytes of spans); it is given both and never calls back into the
store. For every group it tries, in order:

1. the memory cache (:class:`~pcrfs.store.sources.cache.ByteLRU`, keyed (image, group));
2. a request already in flight for it (another reader's, or readahead's);
3. the disk cache (:class:`~pcrfs.store.sources.diskcache.DiskCache`), one file per image
   holding a prefix of its groups (groups 1..m, concatenated);
4. the source: the missing groups become spans, adjacent spans are merged
   (:func:`~pcrfs.store.sources.backends.coalesce`), and all of them are requested at
   once.

It is the store's last read tier (:mod:`pcrfs.store.readpath`): the record-prefix
tier before it may have served the read or declined it.

Every group's CRC-32 is checked before its bytes are returned or cached.
A read has one deadline (:meth:`~pcrfs.store.sources.backends.RecordSource.deadline`, opened
by the read path and handed to every tier): its record-prefix attempt, the per-image
fetch after it and any wait on a fetch another reader started all end by then
(:class:`~pcrfs.store.errors.ReadTimedOut`, EIO).
With ``whole_image`` (remote stores) the first read of an image fetches all
its groups 1..k together, not only those the read overlaps: the kernel reads
a file in 128 KiB pieces, and k concurrent requests beat k sequential ones.
A :class:`~pcrfs.store.read.readahead.Readahead` policy, if given, is told about every
read and answers with runs of following images; those are fetched in the
background, one span per (record, group) -- "groups 1..k of the next images"
costs k requests, whatever the number of images.
"""
from __future__ import annotations

import bisect
import logging
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np

from ...remote.deadline import Deadline
from ..sources.cache import ByteLRU, GroupKey
from ..sources.diskcache import DiskCache, image_entry
from .readahead import Readahead
from ..sources.backends import RecordSource, Span, coalesce
from ..errors import CorruptData
from ..format.groups import GroupRange, GroupTable
from .tiers import Tiers

log = logging.getLogger("pcrfs.store")
Key = GroupKey                         # (image, 1-based group): memory cache and fetches in flight
Item = tuple[int, GroupRange]          # (image, where its group lives)


class GroupFetcher(Tiers):
    """Verified groups of images, from the caches, requests in flight, or ``source``.

    ``large_group_bytes``: groups longer than this are the store's to read by range
    (:meth:`pcrfs.store.read.reader.Store.read_at`), so neither a whole-image fetch nor
    readahead reads them whole in passing."""

    def __init__(self, groups: GroupTable, source: RecordSource, memory: ByteLRU | None = None,
                 disk: DiskCache | None = None, readahead: Readahead | None = None,
                 readahead_bytes: int = 16 << 20, whole_image: bool = False, prefetch_threads: int = 2,
                 large_group_bytes: int = 1 << 20) -> None:
        super().__init__(groups, source, memory, disk)
        self.large_group_bytes = large_group_bytes
        self.readahead = readahead
        self.readahead_bytes = readahead_bytes
        self.whole_image = whole_image
        self._pool = (ThreadPoolExecutor(max_workers=prefetch_threads, thread_name_prefix="pcrfs-readahead")
                      if readahead is not None else None)
        self.prefetched_groups = 0  # groups fetched by readahead
        self.prefetch_failures = 0

    # ---- the read path -------------------------------------------------------------

    def read_groups(self, i: int, k: int, wanted: list[GroupRange]) -> list[bytes]:
        """Verified bytes of ``wanted`` (groups of image ``i``, read at fidelity ``k``), within
        a deadline of its own (ReadTimedOut past it)."""
        with self.source.deadline() as deadline:
            return self.serve(i, k, wanted, deadline)

    def serve(self, i: int, k: int, wanted: list[GroupRange], deadline: Deadline) -> list[bytes]:
        """Verified bytes of ``wanted``, within the read's ``deadline``: this tier always
        serves (it is the last one)."""
        if self.readahead is not None:
            self._maybe_prefetch(i, k)
        have: dict[int, bytes] = {}
        missing: list[GroupRange] = []
        for rng in wanted:
            data = self._cached(i, rng)
            if data is None:
                missing.append(rng)
            else:
                have[rng.group] = data
        if missing:
            if self.whole_image:
                asked = {r.group for r in missing}
                # (large groups are the store's to read by range, never whole in passing)
                missing += [r for r in self.groups.ranges(i, k) if r.group not in asked
                            and r.length <= self.large_group_bytes and not self._available(i, r.group)]
            mine, futures = self._claim([(i, r) for r in missing])
            if mine:
                self._run(mine, futures)
            ours = {rng.group for _, rng in mine}
            for rng in wanted:
                if rng.group not in have:
                    have[rng.group] = self._result(i, rng, futures[(i, rng.group)], rng.group in ours, deadline)
        return [have[r.group] for r in wanted]

    def _result(self, i: int, rng: GroupRange, fut: Future, ours: bool, deadline: Deadline) -> bytes:
        what = f"image {i}, scan group {rng.group}"
        try:
            return deadline.wait(fut, what)
        except CorruptData:
            raise
        except Exception:  # noqa: BLE001 - a failed fetch of our own is final
            if ours or not fut.done():  # (not done: our own wait ended -- the deadline, an interrupt)
                raise
        # someone else's fetch (readahead, another reader) failed: try once ourselves
        mine, futures = self._claim([(i, rng)])
        if mine:
            self._run(mine, futures)
        return deadline.wait(futures[(i, rng.group)], what)

    def _cached(self, i: int, rng: GroupRange) -> bytes | None:
        if self.memory is not None:
            data = self.memory.get(GroupKey(i, rng.group))
            if data is not None:
                return data
        if self.disk is not None:
            return self._from_disk(i, rng)
        return None

    def _available(self, i: int, g: int) -> bool:
        key = GroupKey(i, g)
        if self.memory is not None and key in self.memory:
            return True
        with self._lock:
            return key in self._inflight

    # ---- fetching ----------------------------------------------------------------------

    def _claim(self, items: Iterable[Item]) -> tuple[list[Item], dict[Key, Future]]:
        mine: list[Item] = []
        futures: dict[Key, Future] = {}
        with self._lock:
            for i, rng in items:
                key = (i, rng.group)
                fut = self._inflight.get(key)
                if fut is None:
                    # a fetch may have finished since the caller looked: results reach the
                    # memory cache before they leave the in-flight table
                    data = self.memory.peek(key) if self.memory is not None else None
                    fut = Future()
                    if data is not None:
                        fut.set_result(data)
                    else:
                        self._inflight[key] = fut
                        mine.append((i, rng))
                futures[key] = fut
        return mine, futures

    def _run(self, mine: list[Item], futures: dict[Key, Future]) -> None:
        try:
            results = self._download(mine)
        except BaseException as e:  # noqa: BLE001 - handed to every waiter
            results = {(i, rng.group): e for i, rng in mine}
        with self._lock:
            for key in results:
                self._inflight.pop(key, None)
        for key, value in results.items():
            if isinstance(value, BaseException):
                futures[key].set_exception(value)
            else:
                futures[key].set_result(value)

    def _download(self, items: list[Item]) -> dict[Key, bytes | BaseException]:
        """Fetch, split, check and cache ``items``; a CRC failure affects its own group only."""
        spans = coalesce([Span(r.record, r.offset, r.length) for _, r in items if r.length])
        blobs = self.source.read_spans(spans)
        starts = [(s.record, s.offset) for s in spans]
        out: dict[Key, bytes | BaseException] = {}
        for i, rng in items:
            if not rng.length:
                out[(i, rng.group)] = b""
                continue
            j = bisect.bisect_right(starts, (rng.record, rng.offset)) - 1
            rel = rng.offset - spans[j].offset
            data = blobs[j][rel:rel + rng.length]
            if zlib.crc32(data) != rng.crc32:
                out[(i, rng.group)] = self.groups.corrupt(i, rng.group, rng.record, rng.offset)
                continue
            out[(i, rng.group)] = data
            if self.memory is not None:
                self.memory.put(GroupKey(i, rng.group), data)
        if self.disk is not None:
            self._to_disk({i for i, _ in items}, out)
        return out

    # ---- readahead ---------------------------------------------------------------------

    def _maybe_prefetch(self, i: int, k: int) -> None:
        plan = self.readahead.access(i, k, self.groups.num_images, clip=self._clip)
        if plan is None:
            return
        items = [(j, rng) for j in range(*plan) for rng in self.groups.ranges(j, k)
                 if rng.length <= self.large_group_bytes
                 and not self._available(j, rng.group) and not self._on_disk(j, rng)]
        mine, futures = self._claim(items)
        if mine:
            self.prefetched_groups += len(mine)
            self._pool.submit(self._prefetch, mine, futures)

    def _prefetch(self, mine: list[Item], futures: dict[Key, Future]) -> None:
        self._run(mine, futures)
        failed = [f.exception() for f in futures.values() if f.done() and f.exception() is not None]
        if failed:
            self.prefetch_failures += 1
            log.warning("readahead of %d groups failed: %s", len(mine), failed[0])

    def _clip(self, first: int, end: int, k: int) -> int:
        """The end of the longest run from ``first`` whose groups 1..k fit the readahead budget."""
        lengths = np.asarray(self.groups.group_lengths[first:end, :k], dtype=np.int64).sum(axis=1)
        fits = int(np.searchsorted(np.cumsum(lengths), self.readahead_bytes, side="right"))
        return first + max(1, fits)

    # ---- the disk cache: one file per image, a prefix of its groups ------------------------

    def _on_disk(self, i: int, rng: GroupRange) -> bool:
        if self.disk is None:
            return False
        size = self.disk.size(image_entry(i))
        return size is not None and size >= self.groups.prefix_bytes(i, rng.group)

    def _from_disk(self, i: int, rng: GroupRange) -> bytes | None:
        data = self.disk.read(image_entry(i), self.groups.prefix_bytes(i, rng.group - 1), rng.length)
        if data is None:
            return None
        if zlib.crc32(data) != rng.crc32:
            log.warning("disk cache entry of %s fails its CRC-32 check; dropped", self.groups.path(i))
            self.disk.discard(image_entry(i))
            return None
        if self.memory is not None:
            self.memory.put(GroupKey(i, rng.group), data)
        return data

    def _to_disk(self, images: set[int], fresh: dict[Key, Any]) -> None:
        """Write each image's longest available prefix of groups, if it is longer than the stored one."""
        for i in images:
            key = image_entry(i)
            stored = self.disk.size(key) or 0
            parts = []
            for g in range(1, self.groups.n_groups(i) + 1):
                data = fresh.get((i, g))
                if not isinstance(data, bytes) and self.memory is not None:
                    data = self.memory.peek(GroupKey(i, g))
                if not isinstance(data, bytes) and self.groups.prefix_bytes(i, g) <= stored:
                    data = self.disk.read(key, self.groups.prefix_bytes(i, g - 1), self.groups.prefix_bytes(i, g) - self.groups.prefix_bytes(i, g - 1))
                if not isinstance(data, bytes):
                    break
                parts.append(data)
            size = sum(len(p) for p in parts)
            if size > stored:
                self.disk.put(key, b"".join(parts))

    # ---- bookkeeping -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.readahead is not None:
            out["readahead"] = dict(self.readahead.stats(), groups=self.prefetched_groups,
                                    failures=self.prefetch_failures, budget_bytes=self.readahead_bytes)
        if self.disk is not None:
            out["disk_cache"] = self.disk.stats()
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
