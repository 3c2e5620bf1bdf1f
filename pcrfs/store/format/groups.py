"""Where every scan group lives, from the index alone: the table the read path consults.

:class:`GroupTable` answers "groups 1..k of image i: record, offsets, lengths, CRC-32s"
for the store (:mod:`pcrfs.store.read.reader`) and the fetchers below it
(:mod:`pcrfs.store.read.fetch`, :mod:`pcrfs.store.read.prefixtier`). It does no I/O and knows
no store: the fetchers get this table and a record source, never the store, so the
read path's dependencies point one way (store -> fetchers -> table, source).
:meth:`GroupTable.corrupt` is the one message for a group that fails its CRC-32,
whichever path found it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..errors import CorruptData
from .index import Index


@dataclass(frozen=True)
class GroupRange:
    """Where one scan group of one image lives."""
    group: int     # 1-based scan group number
    record: int
    offset: int    # absolute offset in the record file
    length: int
    crc32: int


class GroupTable:
    """Scan-group locations and checksums of a store's images (read-only, thread-safe)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.num_images = index.num_images
        self.num_groups = index.num_groups      # the store's largest group count
        self.group_lengths = index.group_lengths
        # a record's offsets are computed once per record, not per read
        self._record_offsets = lru_cache(maxsize=256)(index.record_offsets)
        # plain columns: indexing one is ~10x cheaper than a field of a structured row
        self._n_groups_col = index.images["n_groups"]

    def path(self, i: int) -> str:
        return self.index.paths[i]

    def n_groups(self, i: int) -> int:
        return int(self._n_groups_col[i])

    def groups_for(self, i: int, k: int) -> int:
        """How many groups image i has at fidelity k; ValueError for a k no view has."""
        if not 1 <= k <= max(self.num_groups, 1):
            raise ValueError(f"fidelity k must be in 1..{self.num_groups}, got {k}")
        return min(k, int(self._n_groups_col[i]))

    def table(self, i: int, k: int) -> tuple[int, list[int], list[int], list[int]]:
        """(record, offsets, lengths, crcs) of groups 1..min(k, n) of image i, as plain lists
        (indexing a list is cheaper than a numpy scalar on the hot path)."""
        kk = self.groups_for(i, k)
        index = self.index
        pos = index.position(i)
        r = int(np.searchsorted(index.record_starts, pos, side="right")) - 1
        row = self._record_offsets(r)[pos - int(index.records[r]["first_image"])]
        return (r, row[:kk].tolist(), index.group_lengths[i, :kk].tolist(),
                index.group_crc32[i, :kk].tolist())

    def ranges(self, i: int, k: int) -> list[GroupRange]:
        """The stored byte ranges behind image i at fidelity k."""
        r, offsets, lengths, crcs = self.table(i, k)
        return [GroupRange(g + 1, r, offsets[g], lengths[g], crcs[g]) for g in range(len(lengths))]

    def prefix_bytes(self, i: int, groups: int) -> int:
        """Bytes of image i's groups 1..``groups`` together."""
        return int(np.asarray(self.group_lengths[i, :groups], dtype=np.int64).sum())

    def record_groups(self, r: int, groups: int, base: int) -> tuple[np.ndarray, list[int], list[int], list[int]]:
        """(images, offsets relative to ``base``, lengths, crcs) of groups 1..``groups`` of
        every image of record r, as flat lists, image-major: entry ``j * groups + g - 1`` is
        image ``images[j]``'s group g (the record's images in storage order). Flat, because
        a record's thousands of small lists would wake the garbage collector (a full
        collection of the daemon's heap cost ~40% of a prefix's CPU, measured with perf)."""
        index = self.index
        images = index.record_images(r)
        rows = slice(int(images[0]), int(images[0]) + len(images)) if not index.shuffled and len(images) else images
        offsets = (self._record_offsets(r)[:, :groups].astype(np.int64) - base).ravel().tolist()
        return (images, offsets, index.group_lengths[rows, :groups].ravel().tolist(),
                index.group_crc32[rows, :groups].ravel().tolist())

    def corrupt(self, i: int, group: int, record: int, offset: int) -> CorruptData:
        """The error for image i's 1-based ``group`` failing its CRC-32."""
        return CorruptData(f"{self.path(i)}: scan group {group} fails its CRC-32 check "
                           f"(record {record}, offset {offset})")
