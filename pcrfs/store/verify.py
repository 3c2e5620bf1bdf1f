"""Whole-store checks for `pcrfs verify` and statistics for `pcrfs info`.

Verification reads each record file once, sequentially, and checks the header,
the size and every scan group's CRC-32 against the index.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import format as fmt
from .reader import Store


@dataclass
class Damage:
    record: int
    image: str | None   # relative path, None for record-level damage
    group: int | None   # 1-based
    reason: str

    def __str__(self) -> str:
        where = f"record {self.record}"
        if self.image is not None:
            where = f"{self.image} (scan group {self.group}, {where})"
        return f"{where}: {self.reason}"


def verify_store(store: Store, on_record: Callable[[int], None] | None = None) -> list[Damage]:
    """Every problem found in the store's records; an empty list means intact."""
    damage: list[Damage] = []
    index = store.index
    for r in range(len(index.records)):
        damage.extend(_verify_record(store, r))
        if on_record:
            on_record(int(index.records[r]["size"]))
    return damage


def _verify_record(store: Store, r: int) -> list[Damage]:
    index = store.index
    rec = index.records[r]
    try:
        data = store.record_bytes(r)  # local file or remote object, through the store's record source
    except OSError as e:  # CorruptData (missing, unreadable) or StoreUnavailable (unreachable)
        return [Damage(r, None, None, e.strerror or str(e))]
    out = []
    if len(data) != int(rec["size"]):
        out.append(Damage(r, None, None, f"record file is {len(data)} bytes, index says {int(rec['size'])}"))
    if data[:fmt.RECORD_HEADER_SIZE] != fmt.record_header(r):
        out.append(Damage(r, None, None, "record header is damaged"))
    first, n = int(rec["first_image"]), int(rec["n_images"])
    offsets = index.record_offsets(r)
    view = memoryview(data)
    for j in range(n):
        i = first + j
        n_groups = int(index.images[i]["n_groups"])
        for g in range(n_groups):
            off, length = int(offsets[j, g]), int(index.group_lengths[i, g])
            if off + length > len(data):
                out.append(Damage(r, store.path(i), g + 1, "group lies past the end of the record file"))
            elif zlib.crc32(view[off:off + length]) != int(index.group_crc32[i, g]):
                out.append(Damage(r, store.path(i), g + 1, "CRC-32 mismatch"))
    return out


def cumulative_fractions(store: Store, chunk: int = 65536) -> list[dict]:
    """Per k: total bytes of the scanK view and its fraction of the full view."""
    index = store.index
    n, g = index.group_lengths.shape
    totals = np.zeros(g, dtype=np.float64)
    for start in range(0, n, chunk):
        lengths = np.asarray(index.group_lengths[start:start + chunk], dtype=np.uint64)
        totals += np.cumsum(lengths, axis=1).sum(axis=0)
    totals += 2 * n  # the EOI each served file ends with
    full = totals[-1] if g else 0
    return [{"k": k + 1, "bytes": int(totals[k]), "fraction": float(totals[k] / full) if full else 0.0}
            for k in range(g)]
