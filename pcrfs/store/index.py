"""The store index: a handful of numpy arrays, memory-mapped on load.

Nothing per image becomes a Python object at load time: 1.28M images load as
a few ``np.load(mmap_mode="r")`` calls. Paths are decoded one at a time on demand.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import format as fmt


class IndexError_(ValueError):
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

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_groups(self) -> int:
        return self.group_lengths.shape[1]

    @cached_property
    def record_starts(self) -> np.ndarray:
        return np.asarray(self.records["first_image"])

    def record_of(self, i: int) -> int:
        return int(np.searchsorted(self.record_starts, i, side="right")) - 1

    def record_offsets(self, r: int) -> np.ndarray:
        """u8[n_images_in_record, G]: absolute offset of every group of record r's images.

        Group-major layout: group g of image j starts after group g of images before j.
        """
        first = int(self.records[r]["first_image"])
        n = int(self.records[r]["n_images"])
        lengths = self.group_lengths[first:first + n].astype(np.uint64)
        offsets = np.cumsum(lengths, axis=0) - lengths
        return offsets + self.record_group_offsets[r]

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
        for name, arr in arrays.items():
            with open(directory / name, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        (directory / "paths.bin").write_bytes(self.paths.blob_bytes())
        (directory / "dirs.bin").write_bytes(self.dirs.blob_bytes())
        checks = {}
        for name in fmt.INDEX_FILES:
            p = directory / name
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            checks[name] = {"size": p.stat().st_size, "crc32": file_crc32(p)}
        return checks

    @classmethod
    def load(cls, directory: Path, checks: dict[str, dict[str, int]] | None = None) -> "Index":
        """Memory-map the index; with ``checks`` (from the manifest) verify sizes and CRCs first."""
        for name in fmt.INDEX_FILES:
            p = directory / name
            if not p.is_file():
                raise IndexError_(f"index file missing: {p}")
            if checks is not None:
                want = checks.get(name)
                if want is None:
                    raise IndexError_(f"manifest has no checksum for index file {name}")
                size = p.stat().st_size
                if size != want["size"]:
                    raise IndexError_(f"index file {p} is {size} bytes, manifest says {want['size']}")
                if file_crc32(p) != want["crc32"]:
                    raise IndexError_(f"index file {p} is damaged (CRC-32 mismatch)")
        try:
            # np.asarray drops the np.memmap subclass but keeps the mapping: indexing a
            # plain ndarray is ~4x cheaper, and the read path indexes on every request.
            def arr(name: str) -> np.ndarray:
                return np.asarray(np.load(directory / name, mmap_mode="r", allow_pickle=False))

            def blob(name: str) -> np.ndarray:
                p = directory / name
                if p.stat().st_size == 0:
                    return np.zeros(0, dtype=np.uint8)
                return np.asarray(np.memmap(p, dtype=np.uint8, mode="r"))

            index = cls(
                images=arr("images.npy"),
                group_lengths=arr("group_lengths.npy"),
                group_crc32=arr("group_crc32.npy"),
                records=arr("records.npy"),
                record_group_offsets=arr("record_group_offsets.npy"),
                paths=StringTable(blob("paths.bin"), arr("path_offsets.npy")),
                dirs=StringTable(blob("dirs.bin"), arr("dir_offsets.npy")),
                dir_ranges=arr("dir_ranges.npy"),
            )
        except (ValueError, OSError) as e:
            raise IndexError_(f"index in {directory} is unreadable: {e}") from e
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
        if len(self.paths) != n:
            problems.append("path table does not match the image count")
        if self.dir_ranges.shape != (len(self.dirs), 2):
            problems.append("dir_ranges.npy does not match the directory table")
        if r and (int(self.records["n_images"].sum()) != n or int(self.records[0]["first_image"]) != 0):
            problems.append("records do not cover the images")
        if not problems:
            problems = self._value_problems()
        if problems:
            raise IndexError_("inconsistent index: " + "; ".join(problems))

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
            a, b = int(first[r]), int(first[r]) + int(count[r])
            starts = self.record_group_offsets[r]
            region = self.group_lengths[a:b].sum(axis=0, dtype=np.uint64)
            # compared without adding, so a crafted huge offset cannot wrap around
            if np.any(starts < fmt.RECORD_HEADER_SIZE) or np.any(starts > size[r]) or np.any(region > size[r] - starts):
                problems.append(f"record {r}: group regions lie outside the record file")
        dr = self.dir_ranges
        if len(dr) and (np.any(dr[:, 0] > dr[:, 1]) or np.any(dr[:, 1] > n)):
            problems.append("a directory range lies outside the images")
        return problems or self._name_problems()

    def _name_problems(self) -> list[str]:
        """Every path must be relative and canonical: no '', '.', '..' components, no NUL,
        so no view and no extraction by name can step outside its tree."""
        blob = np.frombuffer(self.paths.blob(), dtype=np.uint8)
        if blob.size and np.any(blob == 0):
            return ["a path contains a NUL byte"]
        for d in range(len(self.dirs)):
            name = self.dirs[d]
            if name and (not _canonical(name) or "\0" in name):
                return [f"directory {name!r} is not a canonical relative path"]
        o = self.paths.offsets.astype(np.int64)
        starts, ends = o[:-1], o[1:]
        lengths = ends - starts
        if np.any(lengths == 0):
            return ["an image has an empty path"]
        slash, dot = ord("/"), ord(".")
        at = lambda pos: np.where(pos >= starts, blob[np.clip(pos, 0, max(blob.size - 1, 0))], -1)  # noqa: E731
        last, prev, prev2 = at(ends - 1), at(ends - 2), at(ends - 3)
        bad = (blob[starts] == slash) | (last == slash)
        bad |= (last == dot) & ((prev == slash) | (lengths == 1))
        bad |= (last == dot) & (prev == dot) & ((prev2 == slash) | (lengths == 2))
        if np.any(bad):
            i = int(np.argmax(bad))
            return [f"image path {self.paths[i]!r} is not a canonical relative path"]
        return []


def _canonical(path: str) -> bool:
    return all(part not in ("", ".", "..") for part in path.split("/"))


def file_crc32(path: Path, chunk: int = 1 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc
