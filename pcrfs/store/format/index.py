"""The store index: a handful of numpy arrays, read once into private memory on load.

Nothing per image becomes a Python object at load time: 1.28M images load as one
read per file (~170 MB). The arrays are private copies, not mappings of the files:
what was checked at open (sizes, CRCs, shapes, values) is what is served for the
store's whole life, whatever happens to the files afterwards -- a mapping would show
an in-place edit (wrong offsets, wrong CRCs) and die of SIGBUS on a truncation.
Paths are decoded one at a time on demand.
"""
from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .. import format as fmt
from .files import NotRegularFile, open_regular


class IndexFileError(ValueError):
    """The index is missing, damaged or inconsistent."""


class StringTable:
    """Variable-length strings as one blob plus an offsets array."""

    def __init__(self, blob: bytes | np.ndarray, offsets: np.ndarray) -> None:
        self._blob = blob if isinstance(blob, (bytes, bytearray)) else memoryview(blob)
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def raw(self, i: int) -> bytes:
        return bytes(self._blob[int(self.offsets[i]):int(self.offsets[i + 1])])

    def raw_span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the blob: several consecutive strings in one copy."""
        return bytes(self._blob[start:end])

    def __getitem__(self, i: int) -> str:
        return fmt.decode_path(self.raw(i))

    @classmethod
    def from_strings(cls, strings: list[str]) -> "StringTable":
        encoded = [fmt.encode_path(s) for s in strings]
        offsets = np.zeros(len(encoded) + 1, dtype=fmt.OFFSET_DTYPE)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(b"".join(encoded), offsets)

    def blob_bytes(self) -> bytes:
        return bytes(self._blob)

    def blob(self) -> memoryview | bytes:
        """The concatenated strings, without a copy."""
        return self._blob


def directories_of(paths: list[str]) -> tuple[list[str], np.ndarray]:
    """Every directory (root is "") with the [first, end) range of images beneath it.

    ``paths`` must be sorted with ``fmt.path_sort_key``, which makes each range contiguous.
    """
    first: dict[str, int] = {"": 0}
    end: dict[str, int] = {"": len(paths)}
    for i, p in enumerate(paths):
        parts = p.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            d = "/".join(parts[:depth])
            if d not in first:
                first[d] = i
            end[d] = i + 1
    names = sorted(first, key=lambda d: fmt.path_sort_key(d) if d else ())
    ranges = np.array([[first[d], end[d]] for d in names], dtype=fmt.OFFSET_DTYPE).reshape(-1, 2)
    return names, ranges


@dataclass
class Index:
    images: np.ndarray                # IMAGE_DTYPE[n]
    group_lengths: np.ndarray         # u4[n, G]
    group_crc32: np.ndarray           # u4[n, G]
    records: np.ndarray               # RECORD_DTYPE[R]
    record_group_offsets: np.ndarray  # u8[R, G]
    paths: StringTable
    dirs: StringTable
    dir_ranges: np.ndarray            # u8[D, 2]
    # u8[n], format version 2: the image at each storage position (None: the path order,
    # version 1). Records hold ranges of storage positions; images keep their path-order numbers.
    storage_order: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_groups(self) -> int:
        return self.group_lengths.shape[1]

    @cached_property
    def record_starts(self) -> np.ndarray:
        """The storage position of each record's first image."""
        return np.asarray(self.records["first_image"])

    @property
    def shuffled(self) -> bool:
        """True if the storage order is not the path order (format version 2)."""
        return self.storage_order is not None

    @cached_property
    def positions(self) -> np.ndarray | None:
        """i8[n]: the storage position of each image (None: the path order)."""
        if self.storage_order is None:
            return None
        pos = np.empty(len(self.storage_order), dtype=np.int64)
        pos[self.storage_order] = np.arange(len(self.storage_order), dtype=np.int64)
        return pos

    def position(self, i: int) -> int:
        """The storage position of image i."""
        return i if self.storage_order is None else int(self.positions[i])

    def record_of(self, i: int) -> int:
        return int(np.searchsorted(self.record_starts, self.position(i), side="right")) - 1

    def records_of(self, images: np.ndarray) -> np.ndarray:
        """The record of each image id in ``images`` (vectorized :meth:`record_of`): what a
        record-aware sampler groups by, whatever order the store keeps its images in."""
        images = np.asarray(images, dtype=np.int64)
        pos = images if self.storage_order is None else self.positions[images]
        return np.searchsorted(self.record_starts, pos, side="right") - 1

    def record_images(self, r: int) -> np.ndarray:
        """The images of record r, in their order in it (the storage order)."""
        return self.images_at(int(self.records[r]["first_image"]), int(self.records[r]["n_images"]))

    def images_at(self, first: int, count: int) -> np.ndarray:
        """The images at storage positions [first, first + count), in that order."""
        if self.storage_order is None:
            return np.arange(first, first + count, dtype=np.int64)
        return self.storage_order[first:first + count].astype(np.int64)

    def record_offsets(self, r: int) -> np.ndarray:
        """u8[n_images_in_record, G]: absolute offset of every group of record r's images,
        in storage order (row j: the record's j-th image, :meth:`record_images`).

        Group-major layout: group g of image j starts after group g of images before j.
        """
        lengths = self._record_lengths(r).astype(np.uint64)
        offsets = np.cumsum(lengths, axis=0) - lengths
        return offsets + self.record_group_offsets[r]

    def _record_lengths(self, r: int) -> np.ndarray:
        """u4[n_images_in_record, G]: group lengths of record r's images, in storage order."""
        if self.storage_order is None:
            first = int(self.records[r]["first_image"])
            return self.group_lengths[first:first + int(self.records[r]["n_images"])]
        return self.group_lengths[self.record_images(r)]

    # ---- persistence -------------------------------------------------------

    def save(self, directory: Path) -> dict[str, dict[str, int]]:
        """Write the index files; return {file: {size, crc32}} for the manifest."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {
            "images.npy": self.images,
            "group_lengths.npy": self.group_lengths,
            "group_crc32.npy": self.group_crc32,
            "records.npy": self.records,
            "record_group_offsets.npy": self.record_group_offsets,
            "path_offsets.npy": self.paths.offsets,
            "dir_offsets.npy": self.dirs.offsets,
            "dir_ranges.npy": self.dir_ranges,
        }
        if self.storage_order is not None:
            arrays[fmt.STORAGE_ORDER] = self.storage_order
        for name, arr in arrays.items():
            with open(directory / name, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        (directory / "paths.bin").write_bytes(self.paths.blob_bytes())
        (directory / "dirs.bin").write_bytes(self.dirs.blob_bytes())
        checks = {}
        for name in fmt.index_files(2 if self.storage_order is not None else 1):
            p = directory / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            checks[name] = {"size": p.stat().st_size, "crc32": file_crc32(p)}
        return checks

    @classmethod
    def load(cls, directory: Path, checks: dict[str, dict[str, int]] | None = None,
             counts: tuple[int, int, int] | None = None, version: int = 1) -> "Index":
        """Read the index; with ``checks`` (from the manifest) verify sizes and CRCs first.

        ``counts`` (the manifest's num_images, num_groups, num_records) bound every file's
        size and fix the arrays' shapes; both are checked before any file is read, so a
        crafted huge (sparse) index file is refused at once. Every file is opened as a
        regular file (no symlink, FIFO or device) and read once, from the descriptor that
        was checked, into private memory: the CRC, the headers and the arrays all come
        from that one copy."""
        names = fmt.index_files(version)
        files: dict[str, tuple[int, int]] = {}
        try:
            for name in names:
                files[name] = _open_index_file(directory / name)
            sizes = {name: size for name, (_, size) in files.items()}
            _check_sizes(directory, sizes, checks, counts)
            data = {name: _read_private(directory / name, *files[name]) for name in names}
            if checks is not None:
                for name in names:
                    if zlib.crc32(data[name]) != checks[name]["crc32"]:
                        raise IndexFileError(f"index file {directory / name} is damaged (CRC-32 mismatch)")
            headers = {name: _npy_header(directory / name, data[name], _expected(name, counts))
                       for name in names if name.endswith(".npy")}

            def arr(name: str) -> np.ndarray:
                return _view(data[name], *headers[name])

            def blob(name: str) -> np.ndarray:
                return _view(data[name], np.dtype(np.uint8), (sizes[name],), 0)

            try:
                index = cls(
                    images=arr("images.npy"),
                    group_lengths=arr("group_lengths.npy"),
                    group_crc32=arr("group_crc32.npy"),
                    records=arr("records.npy"),
                    record_group_offsets=arr("record_group_offsets.npy"),
                    paths=StringTable(blob("paths.bin"), arr("path_offsets.npy")),
                    dirs=StringTable(blob("dirs.bin"), arr("dir_offsets.npy")),
                    dir_ranges=arr("dir_ranges.npy"),
                    storage_order=arr(fmt.STORAGE_ORDER) if fmt.STORAGE_ORDER in names else None,
                )
            except (ValueError, OSError) as e:
                raise IndexFileError(f"index in {directory} is unreadable: {e}") from e
        finally:
            for fd, _ in files.values():
                os.close(fd)
        index.check_shapes()
        return index

    def check_shapes(self) -> None:
        n, r = len(self.images), len(self.records)
        problems = []
        if self.images.dtype != fmt.IMAGE_DTYPE:
            problems.append("images.npy has the wrong dtype")
        if self.group_lengths.ndim != 2 or self.group_lengths.shape[0] != n:
            problems.append("group_lengths.npy does not match the image count")
        if self.group_crc32.shape != self.group_lengths.shape:
            problems.append("group_crc32.npy does not match group_lengths.npy")
        if self.record_group_offsets.shape != (r, self.group_lengths.shape[1] if self.group_lengths.ndim == 2 else -1):
            problems.append("record_group_offsets.npy does not match the record count")
        if self.group_lengths.ndim == 2 and self.group_lengths.shape[1] > fmt.MAX_GROUPS:
            problems.append(f"{self.group_lengths.shape[1]} scan-group columns (an image has at most {fmt.MAX_GROUPS})")
        for name, a, dtype in (("group_lengths.npy", self.group_lengths, fmt.GROUP_LENGTH_DTYPE),
                               ("group_crc32.npy", self.group_crc32, fmt.GROUP_CRC_DTYPE),
                               ("records.npy", self.records, fmt.RECORD_DTYPE),
                               ("record_group_offsets.npy", self.record_group_offsets, fmt.OFFSET_DTYPE),
                               ("dir_ranges.npy", self.dir_ranges, fmt.OFFSET_DTYPE)):
            if a.dtype != dtype:
                problems.append(f"{name} has dtype {a.dtype}, the format says {dtype}")
        if len(self.paths) != n:
            problems.append("path table does not match the image count")
        if self.dir_ranges.shape != (len(self.dirs), 2):
            problems.append("dir_ranges.npy does not match the directory table")
        if r and (int(self.records["n_images"].sum()) != n or int(self.records[0]["first_image"]) != 0):
            problems.append("records do not cover the images")
        if self.storage_order is not None:
            o = self.storage_order
            if o.dtype != fmt.STORAGE_ORDER_DTYPE or o.shape != (n,):
                problems.append(f"{fmt.STORAGE_ORDER} does not match the image count")
            elif n and (int(o.max()) >= n or not np.all(np.bincount(o.astype(np.int64), minlength=n) == 1)):
                problems.append(f"{fmt.STORAGE_ORDER} is not a permutation of the images")
        if not problems:
            problems = self._value_problems()
        if problems:
            raise IndexFileError("inconsistent index: " + "; ".join(problems))

    def _value_problems(self) -> list[str]:
        """Values a reader relies on (all vectorized or per record/directory, never per image
        in Python): offsets inside their files, ranges inside the image count, canonical names.
        The manifest's CRCs catch accidents; these catch a crafted or mis-written index."""
        n, g_max = self.group_lengths.shape
        problems = []
        for name, table in (("path", self.paths), ("directory", self.dirs)):
            o = table.offsets
            if o.dtype != fmt.OFFSET_DTYPE or o[0] != 0 or o[-1] != len(table.blob()) or np.any(o[1:] < o[:-1]):
                problems.append(f"{name} offsets do not partition the {name} table")
        if np.any(self.images["n_groups"] > g_max):
            problems.append("an image has more scan groups than the index has columns")
        rec = self.records
        first, count, size = (np.asarray(rec[f], dtype=np.uint64) for f in ("first_image", "n_images", "size"))
        if len(rec) and np.any(first[1:] != first[:-1] + count[:-1]):
            problems.append("records are not consecutive")
        if len(rec) and (np.any(size > 1 << 62) or int(first[-1]) + int(count[-1]) != n):
            problems.append("record sizes or image ranges are out of bounds")
        for r in range(len(rec)):
            if problems:
                break
            starts = self.record_group_offsets[r]
            region = self._record_lengths(r).sum(axis=0, dtype=np.uint64)
            # compared without adding, so a crafted huge offset cannot wrap around
            if np.any(starts < fmt.RECORD_HEADER_SIZE) or np.any(starts > size[r]) or np.any(region > size[r] - starts):
                problems.append(f"record {r}: group regions lie outside the record file")
        dr = self.dir_ranges
        if len(dr) and (np.any(dr[:, 0] > dr[:, 1]) or np.any(dr[:, 1] > n)):
            problems.append("a directory range lies outside the images")
        return problems or self._name_problems()

    def _name_problems(self) -> list[str]:
        """Every name must be relative and canonical, component by component: no '', '.',
        '..' components, no NUL, components of at most MAX_NAME_BYTES and paths of at most
        MAX_PATH_BYTES; so no view and no extraction by name can step outside its tree, and
        the mount can list and open every one. The directory table must hold the root
        and every directory's parent, so listings can be built from it."""
        bad = _bad_name(self.paths.blob(), self.paths.offsets, "image path")
        if bad is not None:
            return [bad]
        # lookups by name bisect the paths and listings come from directory ranges: an
        # unsorted table would be listed by the mount yet missed by `get` (and vice versa)
        i = _first_unsorted(self.paths.blob(), self.paths.offsets)
        if i is not None:
            return [f"image paths are not sorted and unique: {self.paths[i]!r} comes before "
                    f"{self.paths[i + 1]!r} (images {i} and {i + 1})"]
        # the root is the empty name, first; every other directory is checked like a path
        if not len(self.dirs) or self.dirs.offsets[1] != 0:
            return ["the directory table does not start with the root"]
        bad = _bad_name(self.dirs.blob(), self.dirs.offsets[1:], "directory")
        if bad is not None:
            return [bad]
        names = {self.dirs.raw(d) for d in range(len(self.dirs))}
        if len(names) != len(self.dirs):
            return ["the directory table lists a directory twice"]
        for d in range(1, len(self.dirs)):
            name = self.dirs.raw(d)
            parent = name.rsplit(b"/", 1)[0] if b"/" in name else b""
            if parent not in names:
                return [f"directory {fmt.decode_path(name)!r} has no parent {fmt.decode_path(parent)!r} "
                        "in the directory table"]
            # its range's first and last images lie under it (verify checks every image)
            first, end = int(self.dir_ranges[d][0]), int(self.dir_ranges[d][1])
            if first >= end or not (self.paths.raw(first).startswith(name + b"/")
                                    and self.paths.raw(end - 1).startswith(name + b"/")):
                return [f"directory {fmt.decode_path(name)!r}: its image range does not match the image names"]
            # an image with a directory's name would sort right before the directory's images
            # ("a" < "a/x"): the mount could list one name twice and open neither as meant
            if first and self.paths.raw(first - 1) == name:
                return [f"{fmt.decode_path(name)!r} is both an image and a directory"]
        if len(self.dir_ranges) and (int(self.dir_ranges[0][0]) != 0 or int(self.dir_ranges[0][1]) != self.num_images):
            return ["the root directory does not cover every image"]
        return []


def _bad_name(blob: bytes | memoryview | np.ndarray, offsets: np.ndarray, what: str) -> str | None:
    """Why one of the names ``blob[offsets[i]:offsets[i+1]]`` is not canonical, or None.

    Vectorized over the whole table in a few linear passes (no Python per name, no sort:
    ~0.15 s for ImageNet's 1.28M paths). Names are contiguous in the blob, so a position
    is "a name's end" exactly when it is in ``offsets[1:]``; each component starts at a
    name's start or after a '/', and ends at the next '/' or its name's end."""
    b = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob
    o = np.asarray(offsets, dtype=np.int64)
    starts, ends = o[:-1], o[1:]
    if not len(starts):
        return None
    lengths = ends - starts
    if np.any(lengths > fmt.MAX_PATH_BYTES):
        i = int(np.argmax(lengths > fmt.MAX_PATH_BYTES))
        return f"{what} {i} is longer than {fmt.MAX_PATH_BYTES} bytes"
    if b.size and not b.all():
        return f"a {what} contains a NUL byte"
    slash_at = np.zeros(b.size + 3, dtype=bool)  # padded: lookups past the blob's end are "no"
    slash_at[:b.size] = b == ord("/")
    dot_at = np.zeros(b.size + 3, dtype=bool)
    dot_at[:b.size] = b == ord(".")
    end_at = np.zeros(b.size + 3, dtype=bool)
    end_at[ends] = True
    slashes = np.flatnonzero(slash_at)
    full = starts[lengths > 0]
    bad_at = [full[slash_at[full]],                  # a leading '/' (positions inside names)
              slashes[slash_at[slashes + 1]],        # '//'
              slashes[end_at[slashes + 1]]]          # a trailing '/'
    # components that start inside their name: at a name's start, or after a '/' that does not end it
    comp = np.concatenate([full, (slashes + 1)[~end_at[slashes + 1]]])
    one = end_at[comp + 1] | slash_at[comp + 1]      # the component is one byte long
    bad_at.append(comp[dot_at[comp] & one])           # '.'
    two = ~one & dot_at[comp + 1] & (end_at[comp + 2] | slash_at[comp + 2])
    bad_at.append(comp[dot_at[comp] & two])           # '..'
    # component lengths: the gap between consecutive separators (a '/' or a name's end)
    # bounds each from above by one; only if a gap is too long, measure exactly
    seps = np.flatnonzero(slash_at[:b.size + 1] | end_at[:b.size + 1])
    if len(seps) > 1 and int(np.diff(seps).max()) > fmt.MAX_NAME_BYTES:
        comp_end = seps[np.searchsorted(seps, comp, side="right")]
        bad_at.append(comp[comp_end - comp > fmt.MAX_NAME_BYTES])
    # the names holding those positions (a position inside name i: starts[i] <= p < ends[i]), and empty names
    bad = np.concatenate([np.searchsorted(ends, np.concatenate(bad_at), side="right"), np.flatnonzero(lengths == 0)])
    if not len(bad):
        return None
    i = int(bad.min())
    name = fmt.decode_path(bytes(b[int(starts[i]):int(ends[i])]))
    long_parts = any(len(part) > fmt.MAX_NAME_BYTES for part in fmt.encode_path(name).split(b"/"))
    reason = (f"has a component longer than {fmt.MAX_NAME_BYTES} bytes" if long_parts
              else "is not a canonical relative path")
    return f"{what} {name[:300]!r} {reason}"


def _first_unsorted(blob: bytes | memoryview | np.ndarray, offsets: np.ndarray) -> int | None:
    """The first i whose name does not sort strictly before name i+1 (``fmt.path_sort_key``
    order: component by component), or None. Names must be canonical (no NUL, no empty or
    trailing component): then mapping '/' to NUL turns the component order into plain byte
    order, a name's end sorting before any byte. Vectorized: compares 8 bytes of every
    adjacent pair at a time, going on only with the pairs still equal (~0.1 s for
    ImageNet's 1.28M paths, which share a ~20-byte class prefix)."""
    b = np.frombuffer(blob, dtype=np.uint8) if not isinstance(blob, np.ndarray) else blob
    o = np.asarray(offsets, dtype=np.int64)
    if len(o) < 3:
        return None
    mapped = np.zeros(b.size + 8, dtype=np.uint8)   # padded: a window may run past the blob
    mapped[:b.size] = b
    mapped[mapped == ord("/")] = 0
    # every 8-byte window of the blob as one big-endian integer (a view, no copy)
    windows = np.ndarray((b.size + 1,), dtype=">u8", buffer=mapped, strides=(1,))
    starts, lengths = o[:-1], o[1:] - o[:-1]
    pairs = np.arange(len(starts) - 1, dtype=np.int64)  # pair p compares names p and p+1
    bad: list[np.ndarray] = []
    pos = 0
    while len(pairs):
        def word(names: np.ndarray) -> np.ndarray:
            w = windows[starts[names] + pos].astype(np.uint64)
            short = np.flatnonzero(lengths[names] < pos + 8)  # zero their bytes past the end
            if len(short):
                shift = ((pos + 8 - lengths[names[short]]) * 8).astype(np.uint64)
                w[short] = (w[short] >> shift) << shift
            return w
        if pos == 0:  # every pair: each name's word once
            w = word(np.arange(len(starts), dtype=np.int64))
            a, c = w[:-1], w[1:]
        else:
            a, c = word(pairs), word(pairs + 1)
        a_done, c_done = lengths[pairs] <= pos + 8, lengths[pairs + 1] <= pos + 8
        # out of order: a larger word, or equal words where name p+1 ends first (or both end)
        bad.append(pairs[(a > c) | ((a == c) & c_done)])
        pairs = pairs[(a == c) & ~a_done & ~c_done]
        pos += 8
    found = np.concatenate(bad)
    return int(found.min()) if len(found) else None


NPY_HEADER_MAX = 1 << 16  # bytes an .npy header may take (numpy writes 128; it reads at most 10,000)
# dtype and number of dimensions of every index array (its exact shape follows from the counts)
_NPY_TYPES = {
    "images.npy": (fmt.IMAGE_DTYPE, 1), "group_lengths.npy": (fmt.GROUP_LENGTH_DTYPE, 2),
    "group_crc32.npy": (fmt.GROUP_CRC_DTYPE, 2), "records.npy": (fmt.RECORD_DTYPE, 1),
    "record_group_offsets.npy": (fmt.OFFSET_DTYPE, 2), "path_offsets.npy": (fmt.OFFSET_DTYPE, 1),
    "dir_offsets.npy": (fmt.OFFSET_DTYPE, 1), "dir_ranges.npy": (fmt.OFFSET_DTYPE, 2),
    fmt.STORAGE_ORDER: (fmt.STORAGE_ORDER_DTYPE, 1),
}


def size_limits(n: int, g: int, r: int, sizes: dict[str, int]) -> dict[str, int]:
    """The most bytes each index file of a store of ``n`` images, ``g`` scan groups and ``r``
    records can hold. Directory files are bounded through the path table: at most one
    directory per '/' (so fewer than len(paths.bin)/2 + 2), each name shorter than a path,
    and all names together at most MAX_PATH_BYTES/4 bytes per byte of paths (a path of
    length L has directory prefixes of total length under L*L/4)."""
    h = NPY_HEADER_MAX
    paths = min(sizes.get("paths.bin", 0), n * fmt.MAX_PATH_BYTES)
    dirs = paths // 2 + 2
    return {
        "images.npy": h + n * fmt.IMAGE_DTYPE.itemsize,
        "group_lengths.npy": h + n * g * fmt.GROUP_LENGTH_DTYPE.itemsize,
        "group_crc32.npy": h + n * g * fmt.GROUP_CRC_DTYPE.itemsize,
        "records.npy": h + r * fmt.RECORD_DTYPE.itemsize,
        "record_group_offsets.npy": h + r * g * fmt.OFFSET_DTYPE.itemsize,
        "path_offsets.npy": h + (n + 1) * fmt.OFFSET_DTYPE.itemsize,
        "paths.bin": n * fmt.MAX_PATH_BYTES,
        fmt.STORAGE_ORDER: h + n * fmt.STORAGE_ORDER_DTYPE.itemsize,
        "dir_offsets.npy": h + (dirs + 1) * fmt.OFFSET_DTYPE.itemsize,
        "dir_ranges.npy": h + dirs * 2 * fmt.OFFSET_DTYPE.itemsize,
        "dirs.bin": min(paths * (fmt.MAX_PATH_BYTES + 1) // 4,
                        max(sizes.get("dir_offsets.npy", 0) // fmt.OFFSET_DTYPE.itemsize, 1) * fmt.MAX_PATH_BYTES),
    }


def _check_sizes(directory: Path, sizes: dict[str, int], checks: dict[str, dict[str, int]] | None,
                 counts: tuple[int, int, int] | None) -> None:
    """IndexFileError unless every file has the manifest's size (``checks``) and fits what the
    manifest's ``counts`` allow: all before a byte of any file is read."""
    for name, size in sizes.items():
        if checks is not None:
            want = checks.get(name)
            if want is None:
                raise IndexFileError(f"manifest has no checksum for index file {name}")
            if size != want["size"]:
                raise IndexFileError(f"index file {directory / name} is {size} bytes, manifest says {want['size']}")
    if counts is not None:
        for name, limit in size_limits(*counts, sizes).items():
            if name in sizes and sizes[name] > limit:
                raise IndexFileError(f"index file {directory / name} is {sizes[name]} bytes, more than "
                                     f"a store of {counts[0]} images, {counts[1]} scan groups and "
                                     f"{counts[2]} records can need ({limit})")


def _expected(name: str, counts: tuple[int, int, int] | None) -> tuple[int, ...] | None:
    """The shape the manifest's counts give ``name`` (None where they do not fix it)."""
    if counts is None:
        return None
    n, g, r = counts
    return {"images.npy": (n,), "group_lengths.npy": (n, g), "group_crc32.npy": (n, g), "records.npy": (r,),
            "record_group_offsets.npy": (r, g), "path_offsets.npy": (n + 1,), fmt.STORAGE_ORDER: (n,)}.get(name)


def _open_index_file(path: Path) -> tuple[int, int]:
    try:
        return open_regular(path)
    except NotRegularFile as e:
        raise IndexFileError(f"index file {e.strerror}") from None
    except FileNotFoundError:
        raise IndexFileError(f"index file missing: {path}") from None
    except OSError as e:
        raise IndexFileError(f"index file {path} cannot be opened: {e.strerror}") from None


def _npy_header(path: Path, data: np.ndarray, shape: tuple[int, ...] | None) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, data offset) of the .npy file whose bytes are ``data``, checked: the
    dtype and number of dimensions the format says, the shape the manifest implies (where
    it does), C order, and a file size of exactly header + data."""
    want_dtype, ndim = _NPY_TYPES[path.name]
    size = len(data)
    with io.BytesIO(memoryview(data)[:NPY_HEADER_MAX + 16]) as f:  # the header's bytes (+ magic, length)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, dtype = read(f, max_header_size=NPY_HEADER_MAX)
        except (ValueError, OSError, SyntaxError) as e:
            raise IndexFileError(f"index file {path} is not a NumPy array file: {e}") from None
        offset = f.tell()
    if dtype != want_dtype or len(got_shape) != ndim or fortran:
        raise IndexFileError(f"index file {path} holds {dtype}{list(got_shape)}{' (Fortran order)' if fortran else ''}, "
                          f"the format says {want_dtype} with {ndim} dimension(s)")
    if shape is not None and tuple(got_shape) != shape:
        raise IndexFileError(f"index and manifest disagree: index file {path} has shape {list(got_shape)}, "
                          f"the manifest's counts imply {list(shape)}")
    count = 1
    for d in got_shape:
        count *= int(d)
    if size != offset + count * dtype.itemsize:  # Python ints: a crafted shape cannot overflow
        raise IndexFileError(f"index file {path} is {size} bytes, its header describes {offset + count * dtype.itemsize}")
    return dtype, tuple(got_shape), offset


def _read_private(path: Path, fd: int, size: int) -> np.ndarray:
    """The ``size`` bytes of the file open at ``fd``, read into private memory (uint8[size]);
    IndexFileError if it holds fewer now (truncated since it was opened)."""
    buf = np.empty(size, dtype=np.uint8)
    view = memoryview(buf)
    pos = 0
    while pos < size:  # one pread returns at most ~2 GiB
        got = os.preadv(fd, [view[pos:]], pos)
        if got <= 0:
            raise IndexFileError(f"index file {path} is {pos} bytes, shorter than when it was opened ({size})")
        pos += got
    return buf


def _view(data: np.ndarray, dtype: np.dtype, shape: tuple, offset: int) -> np.ndarray:
    """The read-only array at ``offset`` of a file's private bytes (no copy)."""
    count = 1
    for d in shape:
        count *= int(d)
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    out = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    out.flags.writeable = False
    return out


def file_crc32(path: Path, chunk: int = 1 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc
