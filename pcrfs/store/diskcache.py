"""A size-capped cache of byte strings in a local directory (``--disk-cache DIR``).

Each entry is one file, written atomically (temporary file + rename), so a
crash leaves whole entries or none. The directory's total size stays under
``capacity``: least recently used entries are deleted first. The recency order
lives in memory; at start-up it is rebuilt from the files' modification times,
so a cache survives remounts.

The cache stores what it is given and checks nothing: callers verify what they
read back (the store checks every scan group's CRC-32) and :meth:`discard`
entries that fail.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from pathlib import Path

_TMP_SUFFIX = ".tmp"


class DiskCache:
    """Keys are short strings of [A-Za-z0-9._-] (they become file names)."""

    def __init__(self, directory: str | os.PathLike, capacity: int) -> None:
        self.directory = Path(directory)
        self.capacity = max(0, int(capacity))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self._load()

    # ---- layout ------------------------------------------------------------------

    @staticmethod
    def _shard(key: str) -> str:
        return f"{sum(key.encode()) % 256:02x}"  # keeps directories small; any stable spread would do

    def _path(self, key: str) -> Path:
        return self.directory / self._shard(key) / key

    def _load(self) -> None:
        found = []
        for shard in self.directory.iterdir() if self.directory.is_dir() else ():
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard):
                if entry.name.endswith(_TMP_SUFFIX):
                    os.unlink(entry.path)  # left by a crash mid-write
                    continue
                st = entry.stat()
                found.append((st.st_mtime_ns, entry.name, st.st_size))
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self._bytes += size
        self._evict()

    # ---- access ---------------------------------------------------------------------

    def size(self, key: str) -> int | None:
        """Bytes stored under ``key`` (None if absent); does not count as a use."""
        with self._lock:
            return self._sizes.get(key)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """``length`` bytes at ``offset`` of the entry (all of it by default), or None if it
        is absent or too short."""
        with self._lock:
            size = self._sizes.get(key)
            if size is None or (length is not None and offset + length > size):
                self.misses += 1
                return None
            self._sizes.move_to_end(key)
        try:
            with open(self._path(key), "rb") as f:
                data = os.pread(f.fileno(), size - offset if length is None else length, offset)
        except OSError:
            self.discard(key)
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` (replacing it); False if it cannot be kept.

        A file system that runs out of space before ``capacity`` is reached (shared
        with other data) costs the least recently used entries, not the write."""
        if len(data) > self.capacity:
            return False
        for attempt in range(2):
            try:
                self._write(key, data)
                break
            except OSError as e:
                if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT) or not self._make_room(len(data)):
                    return False
        with self._lock:
            self._bytes += len(data) - self._sizes.pop(key, 0)
            self._sizes[key] = len(data)
            self._evict()
        return True

    def _write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{key}.{threading.get_ident()}{_TMP_SUFFIX}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _make_room(self, nbytes: int) -> bool:
        """Drop least recently used entries of at least ``nbytes`` in all; False if there were none."""
        with self._lock:
            freed, dropped = 0, []
            while freed < nbytes and self._sizes:
                key, size = self._sizes.popitem(last=False)
                self._bytes -= size
                self.evicted += 1
                freed += size
                dropped.append(key)
        for key in dropped:
            self._path(key).unlink(missing_ok=True)
        return bool(dropped)

    def discard(self, key: str) -> None:
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is not None:
                self._bytes -= size
        self._path(key).unlink(missing_ok=True)

    def _evict(self) -> None:
        """Drop least recently used entries until the total fits (lock held)."""
        while self._bytes > self.capacity and self._sizes:
            key, size = self._sizes.popitem(last=False)
            self._bytes -= size
            self.evicted += 1
            try:
                self._path(key).unlink()
            except OSError:
                pass

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "bytes": self._bytes, "entries": len(self._sizes),
                "hits": self.hits, "misses": self.misses, "evicted": self.evicted}
