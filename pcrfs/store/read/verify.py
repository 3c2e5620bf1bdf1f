"""Whole-store checks for `pcrfs verify` and statistics for `pcrfs info`.

Verification first checks the index's own structure beyond what ``open_store``
already refuses (each image's group count against its lengths, each record's exact
group-major layout, names sorted and unique, the directory table), then reads each
record file once, sequentially, and checks the header, the size and every scan
group's CRC-32 against the index. A record whose layout in the index does not add up
is reported and not read: its offsets cannot be trusted.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import format as fmt
from ..sources.backends import Span
from ..format.index import directories_of
from .reader import Store


@dataclass
class Damage:
    record: int | None  # None for damage to the index itself
    image: str | None   # relative path, None for record-level damage
    group: int | None   # 1-based
    reason: str

    def __str__(self) -> str:
        where = "index" if self.record is None else f"record {self.record}"
        if self.image is not None:
            where = f"{self.image} (scan group {self.group}, {where})"
        return f"{where}: {self.reason}"


def verify_store(store: Store, on_record: Callable[[int], None] | None = None) -> list[Damage]:
    """Every problem found in the store's index and records; an empty list means intact."""
    index = store.index
    damage, checkable = _verify_index(store)
    for r in range(len(index.records)):
        if r in checkable:
            damage.extend(_verify_record(store, r))
        if on_record:
            on_record(int(index.records[r]["size"]))
    return damage


# ---- the index's own structure -------------------------------------------------------------

def _verify_index(store: Store) -> tuple[list[Damage], set[int]]:
    """Problems in the index, and the records whose layout in it can be trusted enough to check.

    (Offsets inside their files, consecutive records, canonical names: ``Index.check_shapes``
    refuses those when the store is opened.)"""
    index = store.index
    out: list[Damage] = []
    bad_images = _check_group_counts(store, out)
    untrusted = {index.record_of(i) for i in bad_images} | _check_record_layout(index, out)
    _check_names(store, out)
    return out, set(range(len(index.records))) - untrusted


def _index_damage(out: list[Damage], reason: str, image: str | None = None) -> None:
    out.append(Damage(None, image, None, reason))


def _check_group_counts(store: Store, out: list[Damage]) -> set[int]:
    """Each image has 1..G groups, and a length for exactly those (G: the store's group count)."""
    index = store.index
    n, g = index.group_lengths.shape
    counts = np.asarray(index.images["n_groups"], dtype=np.int64)
    present = np.arange(g)[None, :] < counts[:, None]
    has_bytes = np.asarray(index.group_lengths) > 0
    bad = np.flatnonzero((counts < 1) | (counts > g) | (present != has_bytes).any(axis=1))
    for i in bad[:10]:
        _index_damage(out, f"image {i} claims {counts[i]} scan groups but has lengths for "
                           f"{int(has_bytes[i].sum())} (the store has {g})", store.path(int(i)))
    if len(bad) > 10:
        _index_damage(out, f"... and {len(bad) - 10} more images with inconsistent group counts")
    return {int(i) for i in bad}


def _check_record_layout(index, out: list[Damage]) -> set[int]:
    """Where each group region starts follows from the group lengths (group-major layout)."""
    bad = set()
    for r, rec in enumerate(index.records):
        regions = np.asarray(index.group_lengths[index.record_images(r)], dtype=np.uint64).sum(axis=0, dtype=np.uint64)
        ends = fmt.RECORD_HEADER_SIZE + np.cumsum(regions, dtype=np.uint64)
        starts = ends - regions
        size = int(ends[-1]) if len(ends) else fmt.RECORD_HEADER_SIZE
        if not np.array_equal(np.asarray(index.record_group_offsets[r], dtype=np.uint64), starts) \
                or int(rec["size"]) != size:
            out.append(Damage(r, None, None, "the index's layout of this record does not add up "
                                             "(group offsets, lengths and size disagree); not checked"))
            bad.add(r)
    return bad


def _check_names(store: Store, out: list[Damage]) -> None:
    """Names are sorted and unique (lookups bisect them), and the directory table (names and
    image ranges, which listings and labels come from) is the one they imply."""
    index = store.index
    paths = [store.path(i) for i in range(index.num_images)]
    previous: tuple[str, ...] = ()
    for i, path in enumerate(paths):
        key = fmt.path_sort_key(path)
        if i and key <= previous:
            _index_damage(out, f"image {i}: {path!r} is out of order (names must be sorted and unique)")
        previous = key
    names, ranges = directories_of(paths)
    if [index.dirs[d] for d in range(len(index.dirs))] != names or \
            not np.array_equal(np.asarray(index.dir_ranges, dtype=np.uint64), ranges):
        _index_damage(out, "the directory table (dirs.bin, dir_offsets.npy, dir_ranges.npy) does not match "
                           "the image names")


VERIFY_PIECE = 2 << 20   # bytes per read while verifying a record
VERIFY_BATCH = 4         # pieces asked for at once (a remote store fetches them concurrently)


def _verify_record(store: Store, r: int) -> list[Damage]:
    """Read record ``r`` once, in pieces of at most VERIFY_PIECE (memory stays bounded
    whatever the record's or a group's size), and check its header and every group's CRC-32.

    Its layout has been checked (``_check_record_layout``): the header, then every group
    region in order, each region the groups of the record's images in order, nothing else."""
    index = store.index
    rec = index.records[r]
    size = int(rec["size"])
    images = index.record_images(r)  # in the record's (storage) order
    # (image, group) of every stored group, in file order: group-major
    lengths = np.asarray(index.group_lengths[images], dtype=np.int64)
    order_g, order_j = np.nonzero(lengths.T > 0)
    group_lengths = lengths[order_j, order_g].tolist()
    group_crcs = np.asarray(index.group_crc32[images])[order_j, order_g].tolist()
    out: list[Damage] = []
    at = 0         # which stored group the next byte belongs to
    left = group_lengths[0] if group_lengths else 0
    crc = 0
    header = b""
    pos = 0
    spans = [Span(r, o, min(VERIFY_PIECE, size - o)) for o in range(0, size, VERIFY_PIECE)]
    for b in range(0, len(spans), VERIFY_BATCH):
        try:
            # local: the record's size and header are checked when it is opened (reported below)
            pieces = store.records.read_spans(spans[b:b + VERIFY_BATCH])
        except OSError as e:  # CorruptData (missing, unreadable, wrong size) or StoreUnavailable (unreachable)
            return out + [Damage(r, None, None, e.strerror or str(e))]
        while pieces:
            data = pieces.pop(0)  # dropped once checked: at most one batch is held
            view = memoryview(data)
            if pos < fmt.RECORD_HEADER_SIZE:
                take = fmt.RECORD_HEADER_SIZE - pos
                header += bytes(view[:take])
                view = view[take:]
                if len(header) == fmt.RECORD_HEADER_SIZE and header != fmt.record_header(r):
                    out.append(Damage(r, None, None, "record header is damaged"))
            pos += len(data)
            while len(view) and at < len(group_lengths):
                take = min(left, len(view))
                crc = zlib.crc32(view[:take], crc)
                view, left = view[take:], left - take
                if not left:
                    if crc != group_crcs[at]:
                        i = int(images[order_j[at]])
                        out.append(Damage(r, store.path(i), int(order_g[at]) + 1, "CRC-32 mismatch"))
                    at, crc = at + 1, 0
                    left = group_lengths[at] if at < len(group_lengths) else 0
    if pos < size or at < len(group_lengths):
        out.append(Damage(r, None, None, f"record file is {pos} bytes, index says {size}"))
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
