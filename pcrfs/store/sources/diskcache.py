"""A size-capped cache of byte strings in a local directory (``--disk-cache DIR``).

Each entry is one file, written atomically (temporary file + rename), so a
crash leaves whole entries or none. The directory's total size stays under
``capacity``: least recently used entries are deleted first. The recency order
lives in memory; at start-up it is rebuilt from the files' modification times,
so a cache survives remounts.

The directory is shared with nothing: it must be the mount user's own and not
writable by anyone else (refused otherwise, as ssh refuses a key directory others can
write), and every file in it is reached relative to directory descriptors opened
without following symlinks: temporary files are created ``O_EXCL|O_NOFOLLOW`` and
entries opened ``O_NOFOLLOW|O_NONBLOCK`` and checked to be regular files, so a
symlink, FIFO or device planted in it can neither redirect a write outside it nor
block a read.

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
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ..format.files import kind_of

log = logging.getLogger("pcrfs.store")

_TMP_SUFFIX = ".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under an entry's name must fail or return, never wait
_ENTRY_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def image_entry(image: int) -> str:
    """The disk-cache entry of an image's groups 1..m (the per-image tier)."""
    return str(int(image))


def prefix_entry(record: int) -> str:
    """The disk-cache entry of a record's prefix (the record-prefix tier)."""
    return f"r{int(record)}"


def record_of_entry(name: str) -> int | None:
    """The record whose prefix entry ``name`` is (:func:`prefix_entry`), or None."""
    return int(name[1:]) if name.startswith("r") and name[1:].isdigit() else None


class UnsafeCacheDirectory(OSError):
    """The cache directory (or one inside it) is not private to the user running pcrfs."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


def _open_private_dir(name: str | os.PathLike, dir_fd: int | None = None) -> int:
    """A descriptor of the directory ``name`` (relative to ``dir_fd``), created if missing,
    checked to be a real directory (not a symlink) owned by this user (or root) and not
    writable by group or others: whoever else can write it can plant files in it."""
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeCacheDirectory(f"cache directory {os.fspath(name)} is not a directory "
                                       "(a symlink or a file): refusing to use it") from None
        raise
    st = os.fstat(fd)
    problem = None
    if st.st_uid not in (os.geteuid(), 0):
        problem = f"is owned by uid {st.st_uid}, not by uid {os.geteuid()} running pcrfs"
    elif st.st_mode & 0o022:
        problem = f"is writable by {'others' if st.st_mode & 0o002 else 'its group'} " \
                  f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod go-w {os.fspath(name)}"
    if problem:
        os.close(fd)
        raise UnsafeCacheDirectory(f"cache directory {os.fspath(name)} {problem}; a cache must be private "
                                   "(others could plant files in it)")
    return fd


def open_entry_at(name: str, dir_fd: int) -> tuple[int, int] | None:
    """A read-only descriptor of the regular file ``name`` in the directory ``dir_fd`` and its
    size; None if it is absent, a symlink, a FIFO or anything but a regular file (never
    blocking, never followed)."""
    try:
        fd = os.open(name, _ENTRY_FLAGS, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st.st_size


class DropListeners:
    """Callbacks told of every entry a cache deletes or replaces (a caller that keeps an
    entry's file open lets it go); a listener's failure never fails the cache."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._listeners: list[Callable[[str], None]] = []

    def add(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def __call__(self, keys: list[str]) -> None:
        for key in keys:
            for listener in self._listeners:
                try:
                    listener(key)
                except Exception:  # noqa: BLE001 - a listener's failure must not fail the cache
                    log.exception("%s drop listener failed for %s", self._what, key)


class DiskCache:
    """Keys are short strings of [A-Za-z0-9._-] (they become file names)."""

    def __init__(self, directory: str | os.PathLike, capacity: int) -> None:
        self.directory = Path(directory)
        self.capacity = max(0, int(capacity))
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._dir_fd = _open_private_dir(self.directory)
        # shard directories checked private (files are reached as "shard/key" relative to
        # the cache's descriptor: no one else can replace a shard of a private directory)
        self._shards: set[str] = set()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self._dropped = DropListeners("disk cache")
        self._load()

    # ---- layout ------------------------------------------------------------------

    @staticmethod
    def _shard(key: str) -> str:
        return f"{sum(key.encode()) % 256:02x}"  # keeps directories small; any stable spread would do

    def _name(self, key: str) -> str:
        """The entry's name relative to the cache directory's descriptor."""
        return f"{self._shard(key)}/{key}"

    def _check_shard(self, shard: str) -> None:
        """Make the shard directory (once), checked like the cache's own."""
        if shard not in self._shards:
            os.close(_open_private_dir(shard, self._dir_fd))
            self._shards.add(shard)

    def _load(self) -> None:
        found = []
        for name in os.listdir(self._dir_fd):
            if len(name) != 2 or not all(c in "0123456789abcdef" for c in name):
                continue  # not a shard this cache made
            self._check_shard(name)
            fd = os.open(name, _DIR_FLAGS, dir_fd=self._dir_fd)
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.name.endswith(_TMP_SUFFIX):
                        os.unlink(entry.name, dir_fd=fd)  # left by a crash mid-write
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        log.warning("disk cache %s: ignoring %s/%s (%s, not an entry this cache wrote)",
                                    self.directory, name, entry.name, kind_of(st.st_mode))
                        continue
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
            os.close(fd)
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self._bytes += size
        self._evict()

    # ---- access ---------------------------------------------------------------------

    def on_drop(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` after an entry is deleted or replaced (never with a lock held)."""
        self._dropped.add(listener)

    def open_entry(self, key: str) -> tuple[int, int] | None:
        """A new read-only descriptor of the file holding ``key`` and its size (None if absent
        or not a regular file), for a caller that reads it itself, checks what it reads and
        closes it; the entry may be dropped at any time (see :meth:`on_drop`)."""
        with self._lock:
            if key not in self._sizes:
                return None
        return open_entry_at(self._name(key), self._dir_fd)

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
        opened = self.open_entry(key)
        out = None
        if opened is not None:
            fd = opened[0]
            try:
                out = [os.pread(fd, length, offset) for offset, length in ranges]
            except OSError:
                out = None
            finally:
                os.close(fd)
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
        self._check_shard(self._shard(key))
        tmp = f"{self._name(key)}.{threading.get_ident()}{_TMP_SUFFIX}"
        d = self._dir_fd
        fd = None
        try:
            try:
                fd = self._create(d, tmp)
            except FileExistsError:  # left by a crash of this thread id, or planted: never written through
                self._unlink(d, tmp)
                fd = self._create(d, tmp)
            try:
                size = fill(fd)
            finally:
                os.close(fd)
            if size > self.capacity:
                raise OSError(errno.EFBIG, "larger than the cache")
            os.replace(tmp, self._name(key), src_dir_fd=d, dst_dir_fd=d)
        except OSError:
            if fd is not None:
                self._unlink(d, tmp)
            raise
        return size

    @staticmethod
    def _create(dir_fd: int, name: str) -> int:
        """A new entry's temporary file in the directory ``dir_fd``, open for writing (and
        reading: a writer may map it). O_EXCL|O_NOFOLLOW: never a file that already exists,
        so never the target of a symlink someone planted under this name."""
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                       dir_fd=dir_fd)

    @staticmethod
    def _unlink(dir_fd: int, name: str) -> None:
        """Remove ``name`` (a link, not what it points to) if it is there."""
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass

    def _remove(self, key: str) -> None:
        try:
            self._unlink(self._dir_fd, self._name(key))
        except OSError:
            pass

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
            self._remove(key)
        self._dropped(dropped)
        return bool(dropped)

    def discard(self, key: str) -> None:
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is not None:
                self._bytes -= size
        self._remove(key)
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
            self._remove(key)
        return dropped

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Let go of the directory descriptors (the entries stay for the next start)."""
        with self._lock:
            fd, self._dir_fd = self._dir_fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_dir_fd", -1) >= 0:
            os.close(self._dir_fd)

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "bytes": self._bytes, "entries": len(self._sizes),
                "hits": self.hits, "misses": self.misses, "evicted": self.evicted}
