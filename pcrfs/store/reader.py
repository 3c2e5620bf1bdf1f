"""Reading a store: the API the FUSE layer, the CLI and the tests share.

``open_store(path)`` returns a read-only :class:`Store`. An image at fidelity k is
its first k scan groups plus an EOI marker; the store reads exactly those byte
ranges (never a whole record) and checks each group's CRC-32 before returning it,
so damaged data raises :class:`CorruptData` (errno EIO) instead of coming back as
garbage.
"""
from __future__ import annotations

import errno
import os
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import yaml

from ..cache import ByteLRU
from ..jpeg.scans import EOI_BYTES
from . import format as fmt
from .index import Index, IndexError_

ImageRef = Union[int, str]


class StoreError(Exception):
    """The store cannot be opened (missing, incomplete, damaged manifest or index)."""


class CorruptData(OSError):
    """Stored bytes failed their check; maps to EIO on the mount."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


@dataclass(frozen=True)
class GroupRange:
    """Where one scan group of one image lives."""
    group: int     # 1-based scan group number
    record: int
    offset: int    # absolute offset in the record file
    length: int
    crc32: int


class RecordFiles:
    """Positional reads from local record files, one cached descriptor per record."""

    def __init__(self, root: Path, record_sizes: np.ndarray) -> None:
        self.root = root
        self._sizes = record_sizes
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self.requests = 0  # counters for the mount's stats file
        self.bytes_read = 0

    def _fd(self, record: int) -> int:
        fd = self._fds.get(record)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(record)
            if fd is None:
                path = self.root / fmt.record_name(record)
                try:
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as e:
                    raise CorruptData(f"record file {path} cannot be opened: {e.strerror}") from e
                size = os.fstat(fd).st_size
                if size != int(self._sizes[record]):
                    os.close(fd)
                    raise CorruptData(f"record file {path} is {size} bytes, index says {int(self._sizes[record])}")
                self._fds[record] = fd
        return fd

    def read(self, record: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(record), length, offset)
        with self._lock:
            self.requests += 1
            self.bytes_read += len(data)
        if len(data) != length:
            raise CorruptData(f"record {record}: short read at {offset} ({len(data)} of {length} bytes)")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class Store:
    """A read-only PCR store."""

    def __init__(self, root: Path, manifest: dict, index: Index, cache: ByteLRU | None = None) -> None:
        self.root = root
        self.cache = cache  # verified groups, keyed (image, group)
        self.manifest = manifest
        self.index = index
        self.records = RecordFiles(root, np.asarray(index.records["size"]))
        self.classes: list[str] = list(manifest.get("classes", []))
        depth1 = [d for d in range(len(index.dirs)) if (name := index.dirs[d]) and "/" not in name]
        self._class_first = np.array([int(index.dir_ranges[d][0]) for d in depth1], dtype=np.int64)
        self._class_end = np.array([int(index.dir_ranges[d][1]) for d in depth1], dtype=np.int64)
        self._record_offsets = lru_cache(maxsize=256)(index.record_offsets)

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
        return int(self.index.images[self._ref(image)]["src_mtime_ns"])

    def _groups_for(self, i: int, k: int) -> int:
        if not 1 <= k <= max(self.num_groups, 1):
            raise ValueError(f"fidelity k must be in 1..{self.num_groups}, got {k}")
        return min(k, int(self.index.images[i]["n_groups"]))

    # ---- sizes and ranges --------------------------------------------------------

    def size(self, image: ImageRef, k: int) -> int:
        """Bytes of the image at fidelity k: groups 1..k plus the 2-byte EOI."""
        i = self._ref(image)
        kk = self._groups_for(i, k)
        return int(self.index.group_lengths[i, :kk].sum(dtype=np.uint64)) + len(EOI_BYTES)

    def ranges(self, image: ImageRef, k: int) -> list[GroupRange]:
        """The stored byte ranges behind the image at fidelity k."""
        i = self._ref(image)
        kk = self._groups_for(i, k)
        r = self.index.record_of(i)
        row = self._record_offsets(r)[i - int(self.index.records[r]["first_image"])]
        lengths = self.index.group_lengths[i]
        crcs = self.index.group_crc32[i]
        return [GroupRange(g + 1, r, int(row[g]), int(lengths[g]), int(crcs[g])) for g in range(kk)]

    # ---- reading -------------------------------------------------------------

    def _read_group(self, i: int, rng: GroupRange) -> bytes:
        if self.cache is not None:
            data = self.cache.get((i, rng.group))
            if data is not None:
                return data
        data = self.records.read(rng.record, rng.offset, rng.length)
        if zlib.crc32(data) != rng.crc32:
            raise CorruptData(f"{self.path(i)}: scan group {rng.group} fails its CRC-32 check "
                              f"(record {rng.record}, offset {rng.offset})")
        if self.cache is not None:
            self.cache.put((i, rng.group), data)
        return data

    def read(self, image: ImageRef, k: int) -> bytes:
        """The image at fidelity k as a complete JPEG (whole image if it has < k groups)."""
        i = self._ref(image)
        parts = [self._read_group(i, rng) for rng in self.ranges(i, k)]
        parts.append(EOI_BYTES)
        return b"".join(parts)

    def read_at(self, image: ImageRef, k: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the fidelity-k file, reading only the
        groups that overlap the request (each whole, to check its CRC)."""
        i = self._ref(image)
        end = offset + size
        out = []
        pos = 0
        for rng in self.ranges(i, k):
            g_end = pos + rng.length
            if g_end > offset and pos < end:
                data = self._read_group(i, rng)
                out.append(data[max(offset - pos, 0):min(end - pos, rng.length)])
            pos = g_end
            if pos >= end:
                break
        if end > pos:  # the request reaches into the EOI marker
            out.append(EOI_BYTES[max(offset - pos, 0):min(end - pos, len(EOI_BYTES))])
        return b"".join(out)

    def verify_image(self, i: int) -> list[str]:
        """Problems with image i's stored groups (empty if it is intact)."""
        problems = []
        for rng in self.ranges(i, self.num_groups or 1):
            try:
                self._read_group(i, rng)
            except CorruptData as e:
                problems.append(str(e))
        return problems

    def close(self) -> None:
        self.records.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_manifest(root: Path) -> dict:
    path = root / fmt.MANIFEST
    if not path.exists():
        if (root / fmt.PARTIAL_DIR).exists():
            raise StoreError(f"{root} is an unfinished conversion (no {fmt.MANIFEST}); "
                             "run the same `pcrfs convert` again to resume it")
        if not root.exists():
            raise StoreError(f"{root}: no such store")
        raise StoreError(f"{root} is not a PCR store (no {fmt.MANIFEST})")
    try:
        manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StoreError(f"{path} is damaged: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise StoreError(f"{path} is not a PCR manifest")
    if manifest.get("format_version") != fmt.FORMAT_VERSION:
        raise StoreError(f"{path}: format version {manifest.get('format_version')} is not supported "
                         f"(this pcrfs reads version {fmt.FORMAT_VERSION})")
    for key in ("num_images", "num_groups", "num_records", "index_files"):
        if key not in manifest:
            raise StoreError(f"{path} is damaged: no '{key}'")
    files = manifest["index_files"]
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("crc32"), int)
            for v in files.values()):
        raise StoreError(f"{path} is damaged: 'index_files' is not a table of sizes and CRC-32s")
    for key in ("num_images", "num_groups", "num_records"):
        if type(manifest[key]) is not int:
            raise StoreError(f"{path} is damaged: '{key}' is not an integer")
    return manifest


def open_store(location: str | os.PathLike, verify_index: bool = True, cache_bytes: int = 0) -> Store:
    """Open the store at ``location`` read-only.

    With ``verify_index`` (the default) the index files are checked against the
    CRC-32s in the manifest, so a damaged index is refused rather than trusted.
    ``cache_bytes`` > 0 keeps that many bytes of recently read scan groups in memory.
    """
    root = Path(location)
    manifest = read_manifest(root)
    try:
        index = Index.load(root / fmt.INDEX_DIR, manifest["index_files"] if verify_index else None)
    except IndexError_ as e:
        raise StoreError(str(e)) from e
    if index.num_images != manifest["num_images"] or len(index.records) != manifest["num_records"]:
        raise StoreError(f"{root}: index and manifest disagree on the image or record count")
    return Store(root, manifest, index, ByteLRU(cache_bytes) if cache_bytes > 0 else None)
