"""Record prefixes in the read path: fetch, check, cache and serve groups 1..k of whole records.

:class:`PrefixFetcher` is the first read tier of a remote store (:mod:`pcrfs.store.readpath`):
asked for every read, it answers from

1. the record's prefix in the memory cache (one entry per record, key
   :class:`~pcrfs.store.sources.cache.PrefixKey`: its bytes were checked when they arrived);
2. the record's prefix in the disk cache (one file per record, ``r<record>``,
   holding the record's bytes from the group-1 region on; every group read back is
   checked against its CRC-32, a damaged file is dropped);
3. a new fetch, when :class:`~pcrfs.store.read.prefixpolicy.RecordPrefixPolicy` says so: the
   span as a few ranged GETs at once, every group of every image in it checked,
   then cached: in the memory cache when the policy finds the whole view fits
   there (written back to the disk cache, if any, when it leaves memory and when
   the store closes: the next mount finds it there), else in the disk cache (the
   parts are written straight from the client's buffers and checked through a
   read-only mapping of the file: no copy of the prefix in the daemon's memory),
   else in memory as far as it fits -- or
4. :class:`~pcrfs.store.read.tiers.Declined`, with why: the next tier
   (:class:`~pcrfs.store.read.fetch.GroupFetcher`) reads the image group by group.

The mount's compiled path serves a record from its cached prefix itself
(:meth:`PrefixFetcher.prefix_holder`: the buffer in memory or the file on disk,
every group's CRC-32 checked as it is read) until :meth:`PrefixFetcher.on_dropped`
reports that the cache let go of it.

Why memory first when the view fits: writing a prefix into the page cache costs
the daemon about as much CPU as everything else a prefix read does (measured, see
tools/bench_remote_epoch.py), and a shuffled epoch over a view that fits in memory
reads every prefix from memory anyway; the disk copy is for the next mount.

Readers of the same record wait on one fetch. A prefix that arrives damaged
-- a group failing its CRC, a part that came back short or failed after retries --
is cached with those groups marked bad (and is not written to disk; after parts
failed, only for ``retry_after`` seconds, then the prefix is fetched again); reads that
need a bad group are declined (``BAD_GROUP``) and fall back to the per-image tier, which fetches
the groups again and raises :class:`~pcrfs.store.errors.CorruptData` or
:class:`~pcrfs.store.errors.StoreUnavailable` (EIO) if they are still wrong, so
exactly the affected images fail and a transient error heals. A disk cache that
is full evicts (its LRU), and one that cannot be written is skipped: neither
fails a read.

All of this happens within the read's deadline (:mod:`pcrfs.remote.deadline`, shared
with the per-image path): a reader waits on another's fetch, and on its own fetch's
parts, no longer than that, then fails (:class:`~pcrfs.store.errors.ReadTimedOut`,
EIO) -- and the readers waiting on a fetch given up that way read image by image,
each within its own deadline. A prefix fetched ahead of any read has a deadline of
the same length.
"""
from __future__ import annotations

import logging
import mmap
import os
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from ...remote.deadline import Deadline, DeadlineExceeded, Interrupted
from ..sources.cache import ByteLRU, PrefixKey
from ..sources.diskcache import DiskCache, prefix_entry, record_of_entry
from ..sources.backends import RecordSource
from ..errors import StoreUnavailable
from ..format.groups import GroupRange, GroupTable
from .prefixpolicy import PrefixPlan, RecordPrefixPolicy, split_parts
from .tiers import Declined, Tiers

log = logging.getLogger("pcrfs.store")
# why a read was left to the per-image tier
POLICY = Declined("the record-prefix policy does not fetch this record now")
FETCH_FAILED = Declined("the fetch of the record's prefix this read waited on failed")
BAD_GROUP = Declined("a group this read needs arrived damaged in the record's prefix")
NOTHING_WANTED = Declined("no group wanted")


class RecordPrefix:
    """Bytes ``[base, base + len(data))`` of one record: groups 1..``groups`` of all its images."""
    __slots__ = ("record", "groups", "base", "data", "bad", "retry_at", "unsaved")

    def __init__(self, record: int, groups: int, base: int, data: bytes, bad: frozenset[tuple[int, int]],
                 retry_at: float | None = None, unsaved: bool = False) -> None:
        self.record = record
        self.groups = groups
        self.base = base
        self.data = data
        self.bad = bad            # (image, group) whose bytes here are not to be served
        self.retry_at = retry_at  # parts failed: fetch the prefix again after this (time.monotonic())
        self.unsaved = unsaved    # sound, and not yet written to the disk cache

    def __len__(self) -> int:  # what the memory cache counts
        return len(self.data)


class PrefixFetcher(Tiers):
    """Groups served from, or fetched as, whole record prefixes (keyed by record in flight)."""

    def __init__(self, groups: GroupTable, source: RecordSource, policy: RecordPrefixPolicy,
                 memory: ByteLRU | None = None, disk: DiskCache | None = None, threads: int = 8,
                 retry_after: float = 5.0, prefetch_records: int = 2) -> None:
        super().__init__(groups, source, memory, disk)
        self.retry_after = retry_after
        self.policy = policy
        self._bounds = policy.bounds
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pcrfs-prefix")
        # whole-view prefetching (RecordPrefixPolicy.prefetch): a few records at a time, beside
        # the readers' own fetches; its own pool, as each fetch waits on parts in the one above
        self._ahead = ThreadPoolExecutor(max_workers=prefetch_records, thread_name_prefix="pcrfs-ahead")
        self._closing = False
        self.prefetched = 0
        self.parts = 0          # counters for the mount's stats
        self.failed_parts = 0
        self.bad_groups = 0
        self.fallbacks = 0      # reads handed back to the per-image path because of a bad group
        self.written_back = 0   # prefixes written to the disk cache on leaving memory or at close
        self._drop_listeners: list[Callable[[int], None]] = []
        # A disk cache shared by the processes of a node (SharedDiskCache: DataLoader workers)
        # is where a prefix goes first, so the others find it, and a record is fetched under
        # its lock there: one process fetches it, the others wait and read its file.
        self._shared = bool(getattr(disk, "shared", False))
        if memory is not None:
            memory.on_evict(self._left_memory)
            # pinned prefixes stay: the compiled path reads them without refreshing their LRU place
            memory.keep_while(lambda key: type(key) is PrefixKey and policy.is_pinned(key.record))
        if disk is not None:
            disk.on_drop(self._left_disk)

    # ---- serving ---------------------------------------------------------------------------

    def serve(self, i: int, k: int, wanted: list[GroupRange], deadline: Deadline) -> list[bytes] | Declined:
        """Verified bytes of ``wanted`` (groups of image i at fidelity k) from record prefixes,
        within the read's ``deadline``; or :class:`Declined`: the next tier reads them image
        by image (the policy said so, a fetch waited on failed, or a group is bad)."""
        if not wanted:
            return NOTHING_WANTED
        r = wanted[0].record
        need = wanted[-1].group if len(wanted) == 1 else max(rng.group for rng in wanted)
        while True:
            entry = self._in_memory(r)
            if entry is not None and entry.retry_at is not None and time.monotonic() >= entry.retry_at:
                entry = None  # parts of it had failed: time to try the whole prefix again
            if entry is not None and entry.groups >= need:
                return self._serve(entry, i, wanted)
            on_disk = self._disk_groups(r)
            if on_disk >= need:
                out = self._serve_disk(r, wanted)
                if out is not None:
                    return out
                on_disk = 0  # damaged, and dropped
            held = max(entry.groups if entry is not None else 0, on_disk)
            waiting = self._inflight.get(r)
            if waiting is not None:
                try:
                    deadline.wait(waiting, f"record prefix {self.source.describe(r)}")
                except Exception:  # noqa: BLE001 - the fetcher logged it; read image by image
                    if not waiting.done():  # our own wait ended: the deadline passed, or an interrupt
                        raise
                    return FETCH_FAILED
                continue
            plan = self.policy.access(r, max(k, need), held, image=i)
            if plan is None:
                # another process of the node fetching this record (a worker's read, or the
                # main process fetching ahead of a sampler): its prefix, not image by image
                if self._shared and self.disk.wait_for_other(prefix_entry(r), deadline):
                    continue
                return POLICY
            for other in self.policy.prefetch(r, plan.groups):
                self._ahead.submit(self._fetch_ahead, other, plan.groups)
            fetched = self._claim_and_fetch(plan, entry, on_disk, deadline)
            if fetched is None:
                continue  # somebody else started first (wait for theirs), or it went to disk
            return self._serve(fetched, i, wanted)

    def fetch_ahead(self, r: int, k: int) -> Future:
        """Fetch record r's prefix at fidelity k in the background, ahead of any read (unless a
        cache holds it or a fetch of it is in flight, here or in another process sharing the
        disk cache): for a caller that knows the order records will be read in (a sampler's).
        The future ends when the fetch does (never raises: a read of the record will tell)."""
        self.announce()
        return self._ahead.submit(self._fetch_ahead, r, k)

    def announce(self) -> None:
        """A reader that knows its order reads here (:meth:`RecordPrefixPolicy.announce`)."""
        self.policy.announce()

    def listed(self, c: int) -> None:
        """A reader listed class ``c``'s directory (:meth:`RecordPrefixPolicy.listed`)."""
        self.policy.listed(c)

    def _fetch_ahead(self, r: int, k: int) -> None:
        """Fetch record r's prefix at fidelity k before any read asks (unless held or in flight)."""
        if self._closing:
            return
        try:
            entry = self._in_memory(r)
            on_disk = self._disk_groups(r)
            held = max(entry.groups if entry is not None else 0, on_disk)
            if held >= k or r in self._inflight:
                return
            with self.source.deadline() as deadline:  # as long as a reader's
                # (wait=False: a record another process fetches is left to it)
                fetched = self._claim_and_fetch(self.policy.plan(r, k, held), entry, on_disk, deadline, wait=False)
            if fetched is not None or self._disk_groups(r) >= k:
                self.prefetched += 1
        except StoreUnavailable as e:  # unreachable, or out of time: a read of the record will tell
            log.warning("record prefix %s: fetching ahead failed: %s", self.source.describe(r), e)
        except Exception:  # noqa: BLE001 - a read of the record will fetch it (and report)
            log.exception("record prefix %s: fetching ahead failed", self.source.describe(r))

    def _in_memory(self, r: int) -> RecordPrefix | None:
        return self.memory.get(PrefixKey(r)) if self.memory is not None else None  # type: ignore[return-value]

    def _serve(self, entry: RecordPrefix, i: int, wanted: list[GroupRange]) -> list[bytes] | Declined:
        data, base, bad = entry.data, entry.base, entry.bad
        if bad and any((i, rng.group) in bad for rng in wanted):
            self.fallbacks += 1
            return BAD_GROUP
        return [data[rng.offset - base:rng.offset - base + rng.length] for rng in wanted]

    # ---- the disk tier: one file per record -----------------------------------------------

    def _disk_groups(self, r: int) -> int:
        """How many groups of record r the disk cache's prefix file covers."""
        if self.disk is None:
            return 0
        size = self.disk.size(prefix_entry(r))
        if not size:
            return 0
        ends = self._bounds[r, 1:] - self._bounds[r, 0]
        return int(np.searchsorted(ends, size, side="right"))

    def prefix_holder(self, r: int) -> tuple[Any, int, int] | None:
        """What holds record r's cached prefix, for a reader that serves from it itself (the
        mount's compiled path): its bytes in memory (a buffer) or a new read-only
        descriptor of its disk cache file (the caller closes it); the record offset at
        its byte 0; how many groups of every image it holds. None if neither cache holds
        a sound one. The reader must check every group's CRC-32 as it reads, and let go
        when :meth:`on_dropped` reports the record."""
        entry = self.memory.peek(PrefixKey(r)) if self.memory is not None else None
        if entry is not None and not entry.bad and entry.retry_at is None:  # type: ignore[union-attr]
            return entry.data, entry.base, entry.groups  # type: ignore[union-attr]
        return self._prefix_file(r)

    def _prefix_file(self, r: int) -> tuple[int, int, int] | None:
        if self.disk is None:
            return None
        opened = self.disk.open_entry(prefix_entry(r))  # a regular file, never blocking, never a link
        if opened is None:
            return None
        fd, size = opened
        ends = self._bounds[r, 1:] - self._bounds[r, 0]
        groups = int(np.searchsorted(ends, size, side="right"))
        if groups == 0:
            os.close(fd)
            return None
        return fd, int(self._bounds[r, 0]), groups

    def on_dropped(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(r)`` when record r's prefix leaves a cache or is replaced there."""
        self._drop_listeners.append(listener)

    def _dropped(self, r: int) -> None:
        for listener in self._drop_listeners:
            listener(r)

    def _left_disk(self, key: str) -> None:
        r = record_of_entry(key)
        if r is not None:
            self._dropped(r)

    def _left_memory(self, key: Any, entry: Any) -> None:
        if not isinstance(key, PrefixKey):
            return
        self._dropped(key.record)
        if key not in self.memory:  # evicted, not replaced by a longer prefix
            self._write_back(entry)

    def _write_back(self, entry: RecordPrefix) -> None:
        """Save a prefix that only memory held into the disk cache (on eviction, at close)."""
        if self.disk is None or not entry.unsaved or self._disk_groups(entry.record) >= entry.groups:
            return
        entry.unsaved = False
        if self.disk.put(prefix_entry(entry.record), entry.data):
            self.written_back += 1

    def _serve_disk(self, r: int, wanted: list[GroupRange]) -> list[bytes] | None:
        base = int(self._bounds[r, 0])
        key = prefix_entry(r)
        out = self.disk.read_ranges(key, [(rng.offset - base, rng.length) for rng in wanted])
        if out is None:
            return None
        for data, rng in zip(out, wanted):
            if zlib.crc32(data) != rng.crc32:
                log.warning("disk cache prefix of record %d fails a CRC-32 check; dropped", r)
                self.disk.discard(key)
                return None
        return out

    # ---- fetching --------------------------------------------------------------------------

    def _claim_and_fetch(self, plan: PrefixPlan, entry: RecordPrefix | None, on_disk: int,
                         deadline: Deadline, wait: bool = True) -> RecordPrefix | None:
        """Fetch ``plan`` unless another reader already fetches this record; the prefix, or None
        when somebody else fetches it or it was kept in the disk cache (read it there).
        ``wait=False``: a record another process fetches is not waited for (None)."""
        fut: Future = Future()
        with self._lock:
            if plan.record in self._inflight:
                return None
            self._inflight[plan.record] = fut
        try:
            if self._shared:
                result = self._fetch_shared(plan, entry, on_disk, deadline, wait)
            else:
                result = self._fetch(plan, entry, on_disk, deadline)
        except BaseException as e:
            fut.set_exception(e)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                self._inflight.pop(plan.record, None)

    def _fetch_shared(self, plan: PrefixPlan, entry: RecordPrefix | None, on_disk: int, deadline: Deadline,
                      wait: bool) -> RecordPrefix | None:
        """:meth:`_fetch` under the record's lock in the shared disk cache: a process that
        finds another fetching the record waits (within the read's deadline), then reads
        what that one wrote (None: look on disk again) or, if it wrote nothing (it died,
        or failed), fetches the record itself."""
        r = plan.record
        with self.disk.fetching(prefix_entry(r), deadline if wait else None) as mine:
            if not mine:
                return None
            now = self._disk_groups(r)
            if now >= plan.groups:
                return None  # written by another process meanwhile
            if now > on_disk:  # another process wrote part of it: fetch only the rest
                start = int(self._bounds[r, now])
                plan = PrefixPlan(r, now + 1, plan.groups, start, plan.end,
                                  split_parts(start, plan.end, self.policy.part_bytes, self.policy.max_parts))
                on_disk = now
            return self._fetch(plan, entry, on_disk, deadline)

    def _held_bytes(self, plan: PrefixPlan, entry: RecordPrefix | None, on_disk: int) -> bytes:
        """The record's bytes before ``plan.start`` (groups 1..first_group-1), from a cache."""
        if plan.first_group == 1:
            return b""
        if entry is not None and entry.groups == plan.first_group - 1:
            return entry.data
        if on_disk == plan.first_group - 1:
            data = self.disk.read(prefix_entry(plan.record))
            if data is not None and len(data) == plan.start - int(self._bounds[plan.record, 0]):
                return data  # checked below with the new groups
        raise _Replan()

    def _fetch(self, plan: PrefixPlan, entry: RecordPrefix | None, on_disk: int, deadline: Deadline) -> RecordPrefix:
        r = plan.record
        try:
            held = self._held_bytes(plan, entry, on_disk)
        except _Replan:  # what was held went away meanwhile: fetch the whole prefix
            base = int(self._bounds[r, 0])
            plan = PrefixPlan(r, 1, plan.groups, base, plan.end,
                              split_parts(base, plan.end, self.policy.part_bytes, self.policy.max_parts))
            held = b""
        # One buffer for the whole prefix; the parts stream into their places in it.
        data = bytearray(len(held) + plan.end - plan.start)
        data[:len(held)] = held
        view = memoryview(data)
        at = len(held) - plan.start
        # each part under this read's deadline (its retries stop there), waited for until then
        futures = [self._pool.submit(deadline.run, self.source.read_into, r, off, n, view[at + off:at + off + n])
                   for off, n in plan.parts]
        failed: list[tuple[int, int, BaseException]] = []
        for (off, n), f in zip(plan.parts, futures):
            try:
                deadline.wait(f, f"record prefix {self.source.describe(r)} [{plan.start}, {plan.end})")
            except Exception as e:  # noqa: BLE001 - the groups in it are marked bad, the rest served
                if not f.done() or isinstance(e, (DeadlineExceeded, Interrupted)):
                    for g in futures:  # out of time (or interrupted): the prefix is given up whole
                        g.cancel()
                    raise
                failed.append((off, n, e))
                view[at + off:at + off + n] = bytes(n)
        view.release()
        self.parts += len(plan.parts)
        base = int(self._bounds[r, 0])
        in_memory = self.memory is not None and self.policy.fits_memory(plan.groups) and not self._shared
        if self.disk is not None and not failed and not in_memory and self._to_disk(r, plan.groups, base, data):
            return None
        bad = self._check(r, plan.groups, base, data)
        if failed:
            self.failed_parts += len(failed)
            off, n, e = failed[0]
            log.warning("record prefix %s [%d, %d): %d of %d parts failed (%s); %d groups will be read image by "
                        "image", self.source.describe(r), plan.start, plan.end, len(failed), len(plan.parts), e,
                        len(bad))
        elif bad:
            log.warning("record prefix %s: %d scan groups fail their CRC-32 check", self.source.describe(r), len(bad))
        self.bad_groups += len(bad)
        sound = not bad and not failed
        result = RecordPrefix(r, plan.groups, base, data, frozenset(bad),
                              time.monotonic() + self.retry_after if failed else None,
                              unsaved=sound and self.disk is not None)
        kept = False
        if self.memory is not None:
            self.memory.put(PrefixKey(r), result)  # type: ignore[arg-type] - sized like bytes
            kept = PrefixKey(r) in self.memory
        if self.disk is not None and sound and not kept:
            result.unsaved = False
            kept = self.disk.put(prefix_entry(r), data)
        if not kept and not failed:
            log.warning("a record prefix of %d bytes fits in neither cache; reading image by image", len(data))
            self.policy.not_kept(plan.groups)
        return result

    def _to_disk(self, r: int, groups: int, base: int, data: bytearray) -> bool:
        """Write the prefix into the disk cache and check it there; True if it was kept (every
        group sound). False: the caller checks and keeps it in memory instead."""
        def fill(fd: int) -> int:
            pos = 0
            with memoryview(data) as view:
                while pos < len(data):
                    pos += os.pwrite(fd, view[pos:], pos)
            # checked as written (the page cache's copy), so what the compiled path reads
            # later is what was checked; a mapping reads it without another copy
            with mmap.mmap(fd, pos, prot=mmap.PROT_READ) as mapped:
                if self._check(r, groups, base, mapped):
                    raise OSError("a scan group fails its CRC-32 check")  # not kept; found again in memory
            return pos
        if not data or len(data) > self.disk.capacity:
            return False
        return self.disk.put_file(prefix_entry(r), fill, len(data))

    def _check(self, r: int, groups: int, base: int, data: Any) -> set[tuple[int, int]]:
        """(image, group) of every group 1..``groups`` of record r whose bytes fail their CRC-32."""
        images, offsets, lengths, crcs = self.groups.record_groups(r, groups, base)
        view = memoryview(data)
        crc32 = zlib.crc32
        bad = set()
        for j, (off, length, crc) in enumerate(zip(offsets, lengths, crcs)):
            if length and crc32(view[off:off + length]) != crc:
                bad.add((int(images[j // groups]), j % groups + 1))
        return bad

    # ---- bookkeeping -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return dict(self.policy.stats(), parts=self.parts, failed_parts=self.failed_parts,
                    bad_groups=self.bad_groups, fallbacks=self.fallbacks, written_back=self.written_back,
                    prefetched=self.prefetched)

    def close(self) -> None:
        """Write the prefixes only memory holds to the disk cache (the next mount's), then stop."""
        self._closing = True
        self._ahead.shutdown(wait=True, cancel_futures=True)
        if self.memory is not None and self.disk is not None:
            unsaved = [entry for key, entry in self.memory.items()
                       if isinstance(key, PrefixKey) and entry.unsaved]  # type: ignore[union-attr]
            if unsaved:
                log.info("saving %d record prefixes (%d bytes) to the disk cache", len(unsaved),
                         sum(len(entry) for entry in unsaved))
            for entry in unsaved:
                try:
                    self._write_back(entry)  # type: ignore[arg-type]
                except OSError as e:
                    log.warning("record prefix %d not saved to the disk cache: %s", entry.record, e)
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Replan(Exception):
    pass

