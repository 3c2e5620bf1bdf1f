"""Reading a store: the API the FUSE layer, the CLI and the tests share.

``open_store(path)`` returns a read-only :class:`Store`. An image at fidelity k is
its first k scan groups plus an EOI marker; the store reads only those byte
ranges (never a whole record; with readahead, also the same groups of the images
that follow) and checks each group's CRC-32 before returning it, so damaged data
raises :class:`CorruptData` (errno EIO) instead of coming back as garbage.

A store lives at a local path or at an fsspec URL such as ``s3://bucket/prefix``
(:mod:`pcrfs.store.sources.location`); the same :class:`Store` serves both. Which bytes
are requested when (caches, coalescing, readahead) is :mod:`pcrfs.store.read.fetch`'s
business; where they come from is a record source's (:mod:`pcrfs.store.sources.backends`).
"""
from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np

from ..sources.cache import ByteLRU
from ..sources.diskcache import DiskCache
from ..sources.sharedcache import SharedDiskCache
from ...jpeg.scans import EOI_BYTES
from .readahead import Readahead
from ...remote.bwlimit import TokenBucket
from ...remote.fs import RemoteOptions
from .. import format as fmt
from ..sources.backends import RecordSource
from ..errors import CorruptData, StoreError, StoreUnavailable  # noqa: F401 - part of this module's API
from .fetch import GroupFetcher
from ..format.groups import GroupRange, GroupTable
from .prefixpolicy import group_bounds, store_policy
from .prefixtier import PrefixFetcher
from .tiers import Declined
from ..format.index import Index, IndexFileError
from .largegroups import RANGE_GROUP_BYTES, LargeGroups
from .pread import LocalPread
from ..format.manifest import parse_manifest
from ..sources.location import DEFAULT_READAHEAD, MANIFEST_MAX_BYTES, LocalLocation, StoreLocation, open_location, read_manifest  # noqa: F401

ImageRef = Union[int, str]


@dataclass(frozen=True)
class ReadOptions:
    """How a store is read (everything but the location itself)."""
    cache_bytes: int = 0                  # memory for verified scan groups (0: none)
    remote: RemoteOptions = RemoteOptions()
    bwlimit: int | None = None            # bytes per second taken from the store, all requests together
    disk_cache: str | None = None         # directory for a size-capped on-disk group cache
    disk_cache_bytes: int = 10 << 30
    readahead_bytes: int | None = None    # window budget; None: the location's default; 0: off
    record_prefix: bool | None = None     # whole-record prefixes (pcrfs.store.read.prefixpolicy); None: the location's default
    # A record-prefix cache in a directory the processes of one node share (DataLoader workers:
    # pcrfs.store.sources.sharedcache), capped at shared_cache_bytes for all of them together; it takes
    # the place of disk_cache (which still holds the index copy)
    shared_cache: str | None = None
    shared_cache_bytes: int = 0
    # processes that split one pass over the store between them (DataLoader workers sharing
    # shared_cache): each sees 1/readers of a record's reads, so a mixed record's prefix is
    # fetched after 1/readers of the reads one process would wait for (pcrfs.store.read.prefixpolicy)
    prefix_readers: int = 1

    def readahead_for(self, location: StoreLocation) -> int:
        if self.readahead_bytes is None:
            return location.read_defaults.readahead_bytes
        return max(0, int(self.readahead_bytes))


class Store:
    """A read-only PCR store."""

    def __init__(self, location: StoreLocation, manifest: dict, index: Index, cache: ByteLRU | None = None,
                 options: ReadOptions = ReadOptions(), disk: DiskCache | None = None,
                 index_dir: Path | None = None) -> None:
        self.location = location
        self.index_dir = index_dir  # the local directory the index was read from (a remote store's copy)
        self.cache = cache  # verified groups (GroupKey) and record prefixes (PrefixKey)
        self.manifest = manifest
        self.index = index
        self.groups = GroupTable(index)
        self.options = options
        defaults = location.read_defaults
        bwlimit = TokenBucket(options.bwlimit) if options.bwlimit else None
        self.records: RecordSource = location.records(np.asarray(index.records["size"]), bwlimit)
        self.range_group_bytes = max(RANGE_GROUP_BYTES, cache.capacity // 8 if cache is not None else 0)
        readahead_bytes = options.readahead_for(location)
        prefixes = self._prefix_fetcher(cache, disk)
        if index.shuffled and prefixes is not None:
            # records that mix the dataset: the images after one in path order lie all over
            # the store, so readahead would fetch them one by one and their record prefixes
            # again; a path-order pass is served by record prefixes (see store/read/prefixpolicy.py)
            readahead_bytes = 0
        # a shared disk cache holds record prefixes only (an entry per image would be a file
        # per image, counted by every writer of every process)
        image_disk = None if getattr(disk, "shared", False) else disk
        # The read tiers, in the order a read tries them (_fetch_groups): record prefixes,
        # which serve or decline, then per-image groups, which always serve.
        self.prefixes: PrefixFetcher | None = prefixes
        self.images = GroupFetcher(self.groups, self.records, cache, image_disk,
                                   Readahead() if readahead_bytes else None, readahead_bytes,
                                   whole_image=defaults.whole_image, large_group_bytes=self.range_group_bytes)
        self.large = LargeGroups(self.records, self.groups)  # large groups reads cut, on every path
        # Local files without readahead, disk cache or rate limit: the "local pread" tier alone
        direct = defaults.direct and not readahead_bytes and disk is None and bwlimit is None
        self.pread: LocalPread | None = LocalPread(self.records, self.groups, cache, self.large) if direct else None
        self.classes: list[str] = list(manifest.get("classes", []))
        depth1 = _class_dirs(index)
        self._class_first = np.array([int(index.dir_ranges[d][0]) for d in depth1], dtype=np.int64)
        self._class_end = np.array([int(index.dir_ranges[d][1]) for d in depth1], dtype=np.int64)
        self._mtime_col = index.images["src_mtime_ns"]  # a plain column: cheaper to index than a row's field
        self._class_of_dir = {d: c for c, d in enumerate(depth1)}  # a class directory's class number

    def _prefix_fetcher(self, cache: ByteLRU | None, disk: DiskCache | None) -> PrefixFetcher | None:
        """Record-prefix fetching, by default where the location says (the policy falls back to
        per-image reads when the caches are too small)."""
        on = self.options.record_prefix
        if not (self.location.read_defaults.record_prefix if on is None else on):
            return None
        bounds = group_bounds(self.index.record_group_offsets, self.index.records["size"])
        # records that mix the dataset: a prefix only once reads of the record look like an epoch
        policy = store_policy(bounds, cache.capacity if cache is not None else 0,
                              disk.capacity if disk is not None else 0,
                              classes_of=_classes_of(self.index) if self.index.shuffled else None,
                              readers=self.options.prefix_readers)
        return PrefixFetcher(self.groups, self.records, policy, cache, disk)

    @property
    def serves_prefixes(self) -> bool:
        """True if record prefixes are fetched and cached (:meth:`prefix_holder`)."""
        return self.prefixes is not None

    def prefix_holder(self, record: int) -> tuple[Any, int, int] | None:
        """What holds ``record``'s cached prefix -- its bytes (a buffer) or a new read-only
        descriptor of its disk cache file (the caller closes it) -- the record offset at
        its byte 0 and how many groups of every image it holds; None if no cache does.
        Only the disk's bytes may have changed since they were checked: the caller
        checks every group's CRC-32 as it reads (see :meth:`on_prefix_dropped`)."""
        prefixes = self.prefixes
        return prefixes.prefix_holder(record) if prefixes is not None else None

    def fetch_prefix_ahead(self, record: int, k: int) -> Future | None:
        """Fetch ``record``'s prefix at fidelity ``k`` in the background, ahead of any read (a
        caller that knows the order records will be read in); None if this store does not
        read record prefixes."""
        prefixes = self.prefixes
        return prefixes.fetch_ahead(record, k) if prefixes is not None else None

    def announce(self) -> None:
        """A reader that knows its order (a ``RecordShuffleSampler``, whose window fits the
        cache) reads this store: from now on a read of a record whose prefix is not held
        fetches it at once, without waiting for evidence of an epoch or of locality (see
        :meth:`~pcrfs.store.read.prefixpolicy.RecordPrefixPolicy.announce`). Nothing where record
        prefixes are not read."""
        if self.prefixes is not None:
            self.prefixes.announce()

    def note_listed(self, dir_id: int) -> None:
        """A reader listed directory ``dir_id`` of a view. On a store whose records mix the
        dataset, a listing of every class directory is how a dataset loader starts an epoch
        (see :meth:`~pcrfs.store.read.prefixpolicy.EpochGate.listed`); anything else is ignored."""
        c = self._class_of_dir.get(dir_id)
        if c is not None and self.prefixes is not None and self.index.shuffled:
            self.prefixes.listed(c)

    def note_walk(self) -> None:
        """A reader holds a listing of the whole tree (a dataset over a view): as a listing of
        every class directory (:meth:`note_listed`)."""
        for d in self._class_of_dir:
            self.note_listed(d)

    def on_prefix_dropped(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(record)`` when a record's cached prefix is dropped or replaced."""
        if self.prefixes is not None:
            self.prefixes.on_dropped(listener)

    @property
    def tiers(self) -> tuple[str, ...]:
        """The read tiers this store chose when it opened, in the order a read tries them
        (every tier checks each group's CRC-32 before serving it)."""
        if self.pread is not None:
            return self.pread.names
        return (("record prefixes",) if self.prefixes is not None else ()) + ("per-image groups",)

    def _fetch_groups(self, i: int, k: int, wanted: list[GroupRange]) -> list[bytes]:
        """Verified bytes of ``wanted`` (groups of image i at fidelity k) through the tiers, in
        order, within one deadline for the whole read: record prefixes serve them or decline
        (:class:`~pcrfs.store.read.tiers.Declined`), per-image groups always serve."""
        with self.records.deadline() as deadline:
            if self.prefixes is not None:
                out = self.prefixes.serve(i, k, wanted, deadline)
                if not isinstance(out, Declined):
                    return out
            return self.images.serve(i, k, wanted, deadline)

    @property
    def reads_direct(self) -> bool:
        """True if reads are a pread and a CRC per group (a local store without readahead,
        disk cache or bandwidth limit): what the mount's compiled read path may do itself."""
        return self.pread is not None

    @property
    def root(self) -> Path | str:
        """The store's directory (a Path) or, for a remote store, its URL."""
        return self.location.root

    @property
    def url(self) -> str:
        return self.location.url

    # ---- catalogue -------------------------------------------------------------

    @property
    def num_images(self) -> int:
        return self.index.num_images

    def __len__(self) -> int:
        return self.index.num_images

    @property
    def num_groups(self) -> int:
        """The store's largest group count N (views scan1..scanN)."""
        return self.index.num_groups

    def path(self, i: int) -> str:
        return self.index.paths[i]

    def paths(self) -> Iterator[str]:
        for i in range(self.num_images):
            yield self.index.paths[i]

    def label(self, i: int) -> int:
        """Class index (ImageFolder convention: sorted top-level directories), -1 at the root."""
        c = int(np.searchsorted(self._class_first, i, side="right")) - 1
        return c if c >= 0 and i < self._class_end[c] else -1

    def find(self, path: str) -> int:
        """Index of the image stored at relative ``path``; KeyError if there is none."""
        key = fmt.path_sort_key(path.strip("/"))
        lo, hi = 0, self.num_images
        while lo < hi:
            mid = (lo + hi) // 2
            if fmt.path_sort_key(self.index.paths[mid]) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.num_images and self.index.paths[lo] == path.strip("/"):
            return lo
        raise KeyError(path)

    def _ref(self, image: ImageRef) -> int:
        if isinstance(image, str):
            return self.find(image)
        i = int(image)
        if not 0 <= i < self.num_images:
            raise IndexError(f"image {i} out of range")
        return i

    def n_groups(self, image: ImageRef) -> int:
        return int(self.index.images[self._ref(image)]["n_groups"])

    def is_reencoded(self, image: ImageRef) -> bool:
        return bool(self.index.images[self._ref(image)]["flags"] & fmt.FLAG_REENCODED)

    def source_mtime_ns(self, image: ImageRef) -> int:
        return int(self._mtime_col[self._ref(image)])

    # ---- sizes and ranges --------------------------------------------------------

    def size(self, image: ImageRef, k: int) -> int:
        """Bytes of the image at fidelity k: groups 1..k plus the 2-byte EOI."""
        i = self._ref(image)
        kk = self.groups.groups_for(i, k)
        # a row of at most a few dozen lengths: summed in Python, cheaper than a numpy reduction
        return sum(self.index.group_lengths[i].tolist()[:kk]) + len(EOI_BYTES)

    def ranges(self, image: ImageRef, k: int) -> list[GroupRange]:
        """The stored byte ranges behind the image at fidelity k."""
        return self.groups.ranges(self._ref(image), k)

    # ---- reading -------------------------------------------------------------

    def read(self, image: ImageRef, k: int) -> bytes:
        """The image at fidelity k as a complete JPEG (whole image if it has < k groups)."""
        i = self._ref(image)
        table = self.groups.table(i, k)
        r, offsets, lengths, crcs = table
        if self.pread is not None:  # every group kept in the memory cache (no page cache holds this file)
            parts = self.pread.groups_of(i, table)
        else:
            parts = self._fetch_groups(i, k, [GroupRange(g + 1, r, offsets[g], lengths[g], crcs[g])
                                              for g in range(len(lengths))])
        parts.append(EOI_BYTES)
        return b"".join(parts)

    def read_groups(self, image: ImageRef) -> list[bytes]:
        """Every scan group of the image as stored, each checked against its CRC-32 (what a
        migration to another layout copies; :meth:`read` joins them into a file)."""
        i = self._ref(image)
        k = self.num_groups or 1
        return self._fetch_groups(i, k, self.groups.ranges(i, k))

    def read_at(self, image: ImageRef, k: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the fidelity-k file, reading only the
        groups that overlap the request (each whole, to check its CRC, except a large
        group the request cuts: :class:`~pcrfs.store.read.largegroups.LargeGroups`)."""
        i = self._ref(image)
        table = self.groups.table(i, k)  # (record, offsets, lengths, crcs)
        lengths = table[2]
        end = offset + size
        pread = self.pread
        if pread is not None and offset == 0 and end >= sum(lengths) + len(EOI_BYTES):
            return pread.whole(i, table)  # the whole file: the mount's common case
        cuts, pos = _overlaps(lengths, offset, end)
        if pread is not None:
            out = [pread.piece(i, table, g, lo, hi) for g, lo, hi in cuts]
        else:
            out = self._fetched_pieces(i, k, table, cuts)
        if end > pos:  # the request reaches into the EOI marker
            out.append(EOI_BYTES[max(offset - pos, 0):min(end - pos, len(EOI_BYTES))])
        return b"".join(out)

    def _fetched_pieces(self, i: int, k: int, table: tuple[int, list[int], list[int], list[int]],
                        cuts: list[tuple[int, int, int]]) -> list[bytes]:
        """The pieces ``cuts`` of image i's groups through the tiers: the groups they need
        in one request to it, except a large group a piece cuts (:class:`~pcrfs.store.read.largegroups.LargeGroups`)."""
        r, offsets, lengths, crcs = table
        big = self.range_group_bytes
        ranged = {g for g, lo, hi in cuts if lengths[g] > big and hi - lo < lengths[g]}
        fetched = iter(self._fetch_groups(i, k, [GroupRange(g + 1, r, offsets[g], lengths[g], crcs[g])
                                                 for g, _, _ in cuts if g not in ranged]))
        return [self.large.read(i, r, g, offsets[g], lengths[g], crcs[g], lo, hi) if g in ranged
                else next(fetched)[lo:hi] for g, lo, hi in cuts]

    def cut_groups(self, image: int) -> list[tuple[int, bytearray]]:
        """(1-based group, checked bytes) of the image's groups that reads cut and whose private
        copies are kept (:class:`~pcrfs.store.read.largegroups.LargeGroups`): for the mount's compiled
        path, which then serves the rest of the file without reading them again."""
        return self.large.cut_groups(image, int(self.index.images["n_groups"][image]))

    def verify_image(self, i: int) -> list[str]:
        """Problems with image i's stored groups (empty if it is intact)."""
        problems = []
        k = self.num_groups or 1
        for rng in self.ranges(i, k):
            try:
                self._fetch_groups(i, k, [rng])
            except CorruptData as e:
                problems.append(str(e))
        return problems

    def read_record(self, r: int) -> bytes:
        """The whole record file ``r`` (for verification)."""
        return self.records.read_record(r)

    def io_stats(self) -> dict[str, Any]:
        """Counters of the read path: requests and bytes from the store, retries,
        bandwidth limit, readahead and disk cache."""
        out: dict[str, Any] = {"source": self.records.stats(), "tiers": list(self.tiers)}
        out.update(self.images.stats())
        if self.prefixes is not None:
            out["record_prefix"] = self.prefixes.stats()
        return out

    def close(self) -> None:
        if self.prefixes is not None:
            self.prefixes.close()
        self.images.close()
        self.records.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _class_dirs(index: Index) -> list[int]:
    """The top-level directories (classes), in class-number order: their directory ids."""
    return [d for d in range(len(index.dirs)) if (name := index.dirs[d]) and "/" not in name]


def _classes_of(index: Index) -> np.ndarray:
    """i8[n]: each image's class (its top-level directory's number), -1 for images at the root."""
    depth1 = _class_dirs(index)
    first = np.array([int(index.dir_ranges[d][0]) for d in depth1], dtype=np.int64)
    end = np.array([int(index.dir_ranges[d][1]) for d in depth1], dtype=np.int64)
    images = np.arange(index.num_images, dtype=np.int64)
    c = np.searchsorted(first, images, side="right") - 1
    inside = (c >= 0) & (images < end[np.maximum(c, 0)]) if len(first) else np.zeros(len(images), bool)
    return np.where(inside, c, -1)


def _overlaps(lengths: list[int], offset: int, end: int) -> tuple[list[tuple[int, int, int]], int]:
    """The groups (0-based) a read of [offset, end) of the file overlaps, each with the
    range [lo, hi) of its own bytes the read takes; and where the last of them ends."""
    cuts = []
    pos = 0
    for g, length in enumerate(lengths):
        g_end = pos + length
        if g_end > offset and pos < end:
            cuts.append((g, max(offset - pos, 0), min(end - pos, length)))
        pos = g_end
        if pos >= end:
            break
    return cuts, pos


def open_store(location: str | os.PathLike, verify_index: bool = True, cache_bytes: int = 0,
               options: ReadOptions | None = None) -> Store:
    """Open the store at ``location`` (a directory, or a URL such as ``s3://bucket/prefix``) read-only.

    With ``verify_index`` (the default) the index files are checked against the
    CRC-32s in the manifest, so a damaged index is refused rather than trusted.
    ``cache_bytes`` > 0 keeps that many bytes of recently read scan groups in memory
    (``options.cache_bytes`` says the same). A remote store's index is downloaded
    once into the local cache directory (``options.disk_cache``, else
    ``~/.cache/pcrfs``) and read from there afterwards.
    """
    options = options or ReadOptions()
    cache_dir = Path(options.disk_cache) if options.disk_cache else None
    loc = open_location(location, options.remote, cache_dir)
    raw = loc.manifest_bytes()
    manifest = parse_manifest(raw, loc.describe(fmt.MANIFEST))
    index_dir, checked = loc.index_dir(manifest, raw)
    try:
        index = Index.load(index_dir, manifest["index_files"] if verify_index and not checked else None,
                           (manifest["num_images"], manifest["num_groups"], manifest["num_records"]),
                           manifest["format_version"])
    except IndexFileError as e:
        raise StoreError(str(e)) from e
    if index.num_images != manifest["num_images"] or len(index.records) != manifest["num_records"] \
            or index.num_groups != manifest["num_groups"]:
        raise StoreError(f"{loc.url}: index and manifest disagree on the image, scan group or record count")
    cache_bytes = max(cache_bytes, options.cache_bytes)
    readahead = options.readahead_for(loc)
    if readahead:  # prefetched groups wait in the memory cache until they are read
        cache_bytes = max(cache_bytes, 4 * readahead)
    disk: DiskCache | SharedDiskCache | None = None
    if options.shared_cache and options.shared_cache_bytes > 0:
        disk = SharedDiskCache(Path(options.shared_cache) / loc.identity(raw), options.shared_cache_bytes)
    elif options.disk_cache and options.disk_cache_bytes > 0:
        disk = DiskCache(Path(options.disk_cache) / "groups" / loc.identity(raw), options.disk_cache_bytes)
    return Store(loc, manifest, index, ByteLRU(cache_bytes) if cache_bytes > 0 else None, options, disk, index_dir)
