"""A size-capped cache of byte strings in a local directory (``--disk-cache DIR``).

Each entry is one file, written atomically (temporary file + rename), so a
crash leaves whole entries or none. The directory's total size stays under
``capacity``: least recently used entries are deleted first. The recency order
lives in memory; at start-up it is rebuilt from the files' modification times,
so a cache survives remounts.

The cache stores what it is given and checks nothing: callers verify what they
read back (the store checks every scan group's CRC-32) and :meth:`discard`
entries that fail. A caller that keeps an entry's file open past a read (the
mount's compiled path) hears of every entry that is dropped or replaced
(:meth:`on_drop`), so it can let go of the old file.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

log = logging.getLogger("pcrfs.store")

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
        self._drop_listeners: list[Callable[[str], None]] = []
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

    def on_drop(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` after an entry is deleted or replaced (never with a lock held)."""
        self._drop_listeners.append(listener)

    def _dropped(self, keys: list[str]) -> None:
        for key in keys:
            for listener in self._drop_listeners:
                try:
                    listener(key)
                except Exception:  # noqa: BLE001 - a listener's failure must not fail the cache
                    log.exception("disk cache drop listener failed for %s", key)

    def path_of(self, key: str) -> Path | None:
        """The file holding ``key`` (None if absent), for a caller that reads it itself and
        checks what it reads; it may be deleted at any time (see :meth:`on_drop`)."""
        with self._lock:
            return self._path(key) if key in self._sizes else None

    def size(self, key: str) -> int | None:
        """Bytes stored under ``key`` (None if absent); does not count as a use."""
        with self._lock:
            return self._sizes.get(key)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """``length`` bytes at ``offset`` of the entry (all of it by default), or None if it
        is absent or too short."""
        if length is None:
            length = max(0, (self.size(key) or 0) - offset)
        out = self.read_ranges(key, [(offset, length)])
        return out[0] if out is not None else None

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """The bytes of each (offset, length) of the entry, from one open of its file; None if
        it is absent or too short for any of them."""
        with self._lock:
            size = self._sizes.get(key)
            if size is None or any(offset + length > size for offset, length in ranges):
                self.misses += 1
                return None
            self._sizes.move_to_end(key)
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
            try:
                out = [os.pread(fd, length, offset) for offset, length in ranges]
            finally:
                os.close(fd)
        except OSError:
            out = None
        if out is None or any(len(data) != length for data, (_, length) in zip(out, ranges)):
            self.discard(key)
            with self._lock:
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
        return out

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` (replacing it); False if it cannot be kept."""
        if len(data) > self.capacity:
            return False

        def fill(fd: int) -> int:
            with memoryview(data) as view:
                pos = 0
                while pos < len(view):
                    pos += os.write(fd, view[pos:])
            return pos
        return self.put_file(key, fill, len(data))

    def put_file(self, key: str, fill: Callable[[int], int], size_hint: int | None = None) -> bool:
        """Store under ``key`` what ``fill(fd)`` writes into a new file (it returns the size);
        False if it cannot be kept (nothing is stored then). For entries written in pieces
        straight from network buffers, with no copy of the whole in memory.

        A file system that runs out of space before ``capacity`` is reached (shared with
        other data) costs the least recently used entries, not the write: ``fill`` is
        called a second time after room was made (``size_hint`` bytes, or an eighth of
        the capacity), so it must be able to write its data again."""
        for attempt in range(2):
            try:
                size = self._write(key, fill)
                break
            except OSError as e:
                if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT) or \
                        not self._make_room(size_hint or self.capacity // 8):
                    return False
        self._account(key, size)
        return True

    def _account(self, key: str, size: int) -> None:
        with self._lock:
            old = self._sizes.pop(key, None)
            self._bytes += size - (old or 0)
            self._sizes[key] = size
            dropped = self._evict()
        self._dropped(([key] if old is not None else []) + dropped)

    def _write(self, key: str, fill: Callable[[int], int]) -> int:
        """A temporary file filled by ``fill``, renamed to the entry's name; its size."""
        path = self._path(key)
        tmp = path.with_name(f"{key}.{threading.get_ident()}{_TMP_SUFFIX}")
        try:
            path.parent.mkdir(exist_ok=True)
            fd = self._create(tmp)
            try:
                size = fill(fd)
            finally:
                os.close(fd)
            if size > self.capacity:
                raise OSError(errno.EFBIG, "larger than the cache")
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return size

    @staticmethod
    def _create(tmp: Path) -> int:
        """A new entry's temporary file, open for writing (and reading: a writer may map it)."""
        return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

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
        self._dropped(dropped)
        return bool(dropped)

    def discard(self, key: str) -> None:
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is not None:
                self._bytes -= size
        self._path(key).unlink(missing_ok=True)
        if size is not None:
            self._dropped([key])

    def _evict(self) -> list[str]:
        """Drop least recently used entries until the total fits (lock held); their keys."""
        dropped = []
        while self._bytes > self.capacity and self._sizes:
            key, size = self._sizes.popitem(last=False)
            self._bytes -= size
            self.evicted += 1
            dropped.append(key)
            try:
                self._path(key).unlink()
            except OSError:
                pass
        return dropped

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "bytes": self._bytes, "entries": len(self._sizes),
                "hits": self.hits, "misses": self.misses, "evicted": self.evicted}
