"""The "local pread" read tier: a local store read with a pread and a CRC per group.

A store on local files without readahead, a disk cache or a rate limit needs none of the
fetching tiers' machinery (futures, fetches in flight shared between readers, merged
spans): measured, that machinery cost ~7x this floor per file. The store chooses this
tier when it opens (:attr:`pcrfs.store.read.reader.Store.tiers`); the mount's compiled read
path (:mod:`pcrfs.fuse.fastpath`) does the same work in C where it may.
"""
from __future__ import annotations

import zlib

from ..sources.backends import RecordSource
from ..sources.cache import ByteLRU, GroupKey
from ..format.groups import GroupTable
from .largegroups import LargeGroups
from ...jpeg.scans import EOI_BYTES

Table = tuple[int, list[int], list[int], list[int]]  # (record, offsets, lengths, CRCs) of an image's groups


class LocalPread:
    """Verified groups straight from local records, the memory cache in front of them."""

    names = ("memory cache", "local pread")  # what Store.tiers shows for this tier

    def __init__(self, records: RecordSource, groups: GroupTable, cache: ByteLRU | None, large: LargeGroups) -> None:
        self.records = records
        self.groups = groups
        self.cache = cache  # groups of partial reads: no page cache holds the file they belong to
        self.large = large

    def whole(self, i: int, table: Table) -> bytes:
        """The whole file of image i: its groups in one call to the source, each checked, + EOI."""
        r, offsets, lengths, crcs = table
        parts = self.records.read_in_record(r, offsets, lengths)
        for g, data in enumerate(parts):
            if zlib.crc32(data) != crcs[g]:
                raise self.groups.corrupt(i, g + 1, r, offsets[g])
        parts.append(EOI_BYTES)
        return b"".join(parts)

    def groups_of(self, i: int, table: Table) -> list[bytes]:
        """Every group of ``table`` (image i), each checked and kept in the memory cache."""
        r, offsets, lengths, crcs = table
        return [self.group(i, r, g, offsets[g], lengths[g], crcs[g], True) for g in range(len(lengths))]

    def piece(self, i: int, table: Table, g: int, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of group g (0-based) of image i. A group the request covers whole goes
        to the kernel's page cache with the file; one it cuts is read once into the buffers of
        cut groups (:class:`~pcrfs.store.read.largegroups.LargeGroups`), so the kernel's pieces of a
        file -- sequential, or concurrent from its readahead -- read it from the store once."""
        r, offsets, lengths, crcs = table
        length = lengths[g]
        if hi - lo == length:
            return self.group(i, r, g, offsets[g], length, crcs[g], False)
        return self.large.read(i, r, g, offsets[g], length, crcs[g], lo, hi)

    def group(self, i: int, r: int, g: int, offset: int, length: int, crc: int, keep: bool) -> bytes:
        """One verified group (0-based ``g`` of image i); ``keep`` caches it (partial reads)."""
        cache = self.cache
        if cache is not None:
            data = cache.get(GroupKey(i, g + 1))
            if data is not None:
                return data
        data = self.records.read(r, offset, length)
        if zlib.crc32(data) != crc:
            raise self.groups.corrupt(i, g + 1, r, offset)
        if keep and cache is not None:
            cache.put(GroupKey(i, g + 1), data)
        return data
