"""A record-prefix cache on disk shared by the processes of one node that read one store.

``pcrfs.torch.ImageFolder`` opens one store per DataLoader worker process. With a
cache of its own, each worker downloaded every record prefix the others downloaded
(2 workers: 2.00x the view's bytes an epoch). :class:`SharedDiskCache` is one
directory that all of them use, with the properties of
:class:`~pcrfs.store.sources.diskcache.DiskCache` (private directory, files reached through
directory descriptors without following links, ``O_EXCL|O_NOFOLLOW`` temporary files,
entries renamed into place whole) and, across processes:

* **single flight** -- a process fetches an entry only while it holds the entry's
  lock, an ``flock`` on ``locks/<key>`` (:meth:`SharedDiskCache.fetching`). Another
  process that wants the same record waits for the lock (polling, within its read's
  deadline), finds the entry and reads it from the file. The kernel releases an
  ``flock`` when its holder dies, so a worker killed mid-download wedges no one: the
  next one takes the lock, finds no entry and fetches it itself.
* **one size cap** -- the cap holds for the directory, not per process: a writer
  takes the directory's lock (``flock`` on ``lock``, held for a directory scan),
  counts every entry and every temporary file in progress, deletes least recently
  used entries until its entry fits, and *reserves* its size by creating the
  temporary file at that length before it writes; it waits (a few seconds) when only
  writes in progress fill the cap, and gives up (the entry is not cached) after that.
  A temporary file whose writer died (its key's lock is free) is deleted by the next
  scan. Recency is the files' modification time: a read touches the entry (at most
  every 10 ms per process and entry: coarser, a record still read could look older
  than one just finished, and be evicted first), a write sets it.
* **no shared memory, no coordinator** -- only files and ``flock``s, which the
  kernel cleans up: nothing left by a crash can break the next start (MosaicML
  Streaming's shared-memory leftovers do, ../shared/PEERS.md). A temporary file left
  by a crash costs disk space until the next scan; the directory itself is the
  caller's to remove.

The cache checks nothing it stores: callers check every group's CRC-32 in what they
read back (:class:`~pcrfs.store.read.prefixtier.PrefixFetcher` does) and :meth:`discard`
an entry that fails. Every entry is read through a descriptor of one file, which a
rename or an eviction by another process cannot change under the reader. Listeners
(:meth:`on_drop`) hear of the drops this process makes, not of other processes'.

Each process must open its own (a forked child opens another; the one it inherited
is left alone and never unlocks what its parent holds).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .diskcache import _DIR_FLAGS, _TMP_SUFFIX, DiskCache, DropListeners, _open_private_dir, open_entry_at

log = logging.getLogger("pcrfs.store")

_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
POLL_MIN_S = 0.002     # first sleep of a process waiting for a lock another one holds
POLL_MAX_S = 0.02      # ... doubling up to this
ROOM_WAIT_S = 10.0     # how long a writer waits for writes in progress to leave room under the cap
TOUCH_EVERY_S = 0.01   # an entry's recency is refreshed at most this often per process


class _NoLock(OSError):
    """A key's lock file cannot be used (something not a regular file is in its place)."""


class SharedDiskCache:
    """Keys are short strings of [A-Za-z0-9._-] (file names); see the module doc."""

    shared = True  # what PrefixFetcher asks: fetch under fetching(), write to this tier first

    def __init__(self, directory: str | os.PathLike, capacity: int) -> None:
        self.directory = Path(directory)
        self.capacity = max(0, int(capacity))
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._dir_fd = _open_private_dir(self.directory)
        try:
            self._entries = _open_private_dir("entries", self._dir_fd)
            self._locks = _open_private_dir("locks", self._dir_fd)
            self._global = self._open_lock("lock", self._dir_fd)
        except BaseException:
            os.close(self._dir_fd)
            raise
        self._mutex = threading.Lock()
        self._dir_mutex = threading.Lock()  # the directory's flock is per open file: threads take this first
        self._held: dict[str, list[int]] = {}   # key -> [lock fd, holding thread, depth] (this process)
        self._touched: dict[str, float] = {}
        self._dropped = DropListeners("shared cache")
        self.hits = self.misses = self.evicted = self.stale = 0
        self.waits = 0        # fetches that waited for another process's
        self.refused = 0      # entries not kept: no room under the cap in time, or too large

    # ---- locks ----------------------------------------------------------------------------

    @staticmethod
    def _open_lock(name: str, dir_fd: int) -> int:
        fd = os.open(name, _LOCK_FLAGS, 0o600, dir_fd=dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device planted under the name
            os.close(fd)
            raise OSError(errno.EINVAL, f"lock file {name} is not a regular file")
        return fd

    def _try_lock(self, key: str) -> int | None:
        """A descriptor of key's lock file, locked by it; None if another holds the lock;
        _NoLock if the lock file cannot be used."""
        try:
            fd = self._open_lock(key, self._locks)
        except OSError as e:  # a symlink (ELOOP), FIFO or device planted under its name
            raise _NoLock(e.errno, f"shared cache {self.directory}: lock of {key} unusable: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _acquire(self, key: str, until: float | None) -> bool:
        """Take key's lock for this thread (again, if it holds it), waiting until ``until``
        (``time.monotonic()``; None: not at all, math.inf: for ever)."""
        me, delay, waited = threading.get_ident(), POLL_MIN_S, False
        while True:
            with self._mutex:
                held = self._held.get(key)
                if held is not None and held[1] == me:
                    held[2] += 1
                    return True
                fd = self._try_lock(key) if held is None else None
                if fd is not None:
                    self._held[key] = [fd, me, 1]
                    return True
            if until is None or time.monotonic() >= until:
                return False
            if not waited:
                waited = True
                self.waits += 1
            time.sleep(min(delay, max(0.0, until - time.monotonic())))
            delay = min(2 * delay, POLL_MAX_S)

    def _release(self, key: str) -> None:
        with self._mutex:
            held = self._held[key]
            held[2] -= 1
            if held[2]:
                return
            del self._held[key]
        fcntl.flock(held[0], fcntl.LOCK_UN)  # explicitly: a forked child may share the descriptor
        os.close(held[0])

    @contextmanager
    def fetching(self, key: str, deadline: Any = None) -> Iterator[bool]:
        """Hold key's lock while fetching its entry: True once held (check for the entry again:
        another process may have written it meanwhile). With ``deadline`` (a
        :class:`~pcrfs.remote.deadline.Deadline`) wait for another process's fetch until it
        passes, then raise its error; without one, False at once if another holds it."""
        if not _KEY.match(key):
            raise ValueError(f"not a cache key: {key!r}")
        until = None if deadline is None else deadline.expires
        try:
            got = self._acquire(key, until)
        except _NoLock as e:  # fetch without the others (each for itself); nothing is stored
            log.warning("%s; fetching without it", e)
            yield True
            return
        if not got and deadline is not None:
            raise deadline.exceeded(f"waiting for another process's fetch of {key} ({self.directory})")
        try:
            yield got
        finally:
            if got:
                self._release(key)

    def wait_for_other(self, key: str, deadline: Any) -> bool:
        """If another process holds key's lock (it is fetching the entry), wait until it lets go
        (within ``deadline``, else raise its error) and return True: look for the entry again.
        False at once if nobody else holds it."""
        with self._mutex:
            if key in self._held:
                return False  # this process's own fetch: its readers wait on it in memory
        try:
            fd = self._try_lock(key)
        except _NoLock:
            return False
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return False
        with self.fetching(key, deadline):
            return True

    def _writer_alive(self, key: str) -> bool:
        """Whether a process holds key's lock (so a temporary file of key may be its write)."""
        with self._mutex:
            if key in self._held:
                return True
        try:
            fd = self._try_lock(key)
        except _NoLock:
            return True  # cannot tell: its file stays (counted)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    @contextmanager
    def _directory_lock(self, until: float) -> Iterator[bool]:
        """The directory's lock (counting and evicting), polled until ``until``."""
        if not self._dir_mutex.acquire(timeout=max(0.0, until - time.monotonic())):
            yield False
            return
        try:
            delay = POLL_MIN_S
            while True:
                try:
                    fcntl.flock(self._global, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= until:
                        yield False
                        return
                    time.sleep(delay)
                    delay = min(2 * delay, POLL_MAX_S)
            try:
                yield True
            finally:
                fcntl.flock(self._global, fcntl.LOCK_UN)
        finally:
            self._dir_mutex.release()

    # ---- reading --------------------------------------------------------------------------

    def open_entry(self, key: str) -> tuple[int, int] | None:
        """A new read-only descriptor of key's file and its size (None if absent or not a
        regular file); the caller checks what it reads and closes it."""
        if not _KEY.match(key) or key.endswith(_TMP_SUFFIX):
            return None
        return open_entry_at(key, self._entries)

    def size(self, key: str) -> int | None:
        """Bytes stored under ``key`` now (None if absent); does not count as a use."""
        if not _KEY.match(key) or key.endswith(_TMP_SUFFIX):
            return None
        try:
            st = os.stat(key, dir_fd=self._entries, follow_symlinks=False)
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes | None:
        """``length`` bytes at ``offset`` of the entry (the rest of it by default), or None."""
        if length is None:
            length = max(0, (self.size(key) or 0) - offset)
        out = self.read_ranges(key, [(offset, length)])
        return out[0] if out is not None else None

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """The bytes of each (offset, length) of the entry, from one file; None if it is
        absent or too short for any of them (another process may have evicted it, or
        written a shorter one: not damage, so nothing is discarded here)."""
        opened = self.open_entry(key)
        out = None
        if opened is not None:
            fd, size = opened
            try:
                if all(offset + length <= size for offset, length in ranges):
                    out = [os.pread(fd, length, offset) for offset, length in ranges]
                    if any(len(data) != length for data, (_, length) in zip(out, ranges)):
                        out = None
                    else:
                        self._touch(key, fd)
            except OSError:
                out = None
            finally:
                os.close(fd)
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out

    def _touch(self, key: str, fd: int) -> None:
        """Mark the entry used (its modification time: the recency every process sees)."""
        now = time.monotonic()
        if now - self._touched.get(key, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            self._touched[key] = now
            try:
                os.utime(fd)
            except OSError:
                pass

    # ---- writing --------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` (replacing it); False if it cannot be kept."""
        def fill(fd: int) -> int:
            with memoryview(data) as view:
                pos = 0
                while pos < len(view):
                    pos += os.pwrite(fd, view[pos:], pos)
            return pos
        return self.put_file(key, fill, len(data))

    def put_file(self, key: str, fill: Callable[[int], int], size_hint: int | None = None) -> bool:
        """Store under ``key`` what ``fill(fd)`` writes into a new file (it returns the size),
        under key's lock (taken here unless this thread holds it: a caller that fetched
        under :meth:`fetching` does). ``size_hint`` is reserved under the cap before
        ``fill`` runs (without it, the size is reserved afterwards, while the file exists);
        ``fill`` may be called a second time after a full file system made room."""
        if not _KEY.match(key) or key.endswith(_TMP_SUFFIX):
            return False
        if size_hint is not None and size_hint > self.capacity or not self.capacity:
            self.refused += 1
            return False
        try:
            if not self._acquire(key, None):
                return False  # another process is writing it: theirs will do
        except _NoLock:
            self.refused += 1
            return False
        try:
            for attempt in range(2):
                try:
                    self._write(key, fill, size_hint or 0)
                    return True
                except OSError as e:
                    if attempt or e.errno not in (errno.ENOSPC, errno.EDQUOT) or \
                            not self._evict_for(size_hint or self.capacity // 8):
                        if e.errno != errno.EFBIG:
                            log.debug("shared cache %s: %s not kept: %s", self.directory, key, e)
                        return False
            return False
        finally:
            self._release(key)

    def _write(self, key: str, fill: Callable[[int], int], reserve: int) -> None:
        """A temporary file reserved under the cap, filled, renamed to key's name."""
        tmp = f"{key}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}"
        d = self._entries
        fd = self._reserve(key, tmp, reserve)
        try:
            try:
                size = fill(fd)
                if size > reserve and not self._grow(tmp, size):
                    raise OSError(errno.EFBIG, "no room under the shared cache's cap")
                if size < reserve:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
            os.replace(tmp, key, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            DiskCache._unlink(d, tmp)
            raise
        self._touched[key] = time.monotonic()
        self._dropped([key])  # a listener lets go of an old file of the key (if there was one)

    def _reserve(self, key: str, tmp: str, nbytes: int) -> int:
        """The temporary file ``tmp``, created at ``nbytes`` once that fits under the cap with
        every other file of the directory (evicting the least recently used entries)."""
        until = time.monotonic() + ROOM_WAIT_S
        while True:
            with self._directory_lock(until) as locked:
                if locked and self._make_room(nbytes, exclude=None):
                    try:
                        fd = DiskCache._create(self._entries, tmp)
                    except FileExistsError:  # left by a crash of this thread id: never written through
                        DiskCache._unlink(self._entries, tmp)
                        fd = DiskCache._create(self._entries, tmp)
                    try:
                        os.ftruncate(fd, nbytes)  # the reservation every other writer counts
                    except OSError:
                        os.close(fd)
                        DiskCache._unlink(self._entries, tmp)
                        raise
                    return fd
            if time.monotonic() >= until:  # the cap is full of other writes in progress
                self.refused += 1
                raise OSError(errno.EFBIG, f"no room for {key} under the shared cache's cap in {ROOM_WAIT_S:g} s")
            time.sleep(POLL_MAX_S)

    def _grow(self, tmp: str, size: int) -> bool:
        """Room for the temporary file ``tmp`` (already counted at its size on disk) to be
        ``size`` bytes: it is now, so only what else is there must fit beside it."""
        with self._directory_lock(time.monotonic() + ROOM_WAIT_S) as locked:
            return locked and self._make_room(size, exclude=tmp)

    def _make_room(self, nbytes: int, exclude: str | None) -> bool:
        """With the directory's lock held: delete least recently used entries until ``nbytes``
        more fit under the cap beside everything else (``exclude`` not counted); False if
        writes in progress leave too little even with every entry gone."""
        entries, in_progress = self._scan(exclude)
        total = in_progress + sum(size for _, _, size in entries)
        dropped = []
        for _, key, size in sorted(entries):
            if total + nbytes <= self.capacity:
                break
            DiskCache._unlink(self._entries, key)
            total -= size
            dropped.append(key)
        self.evicted += len(dropped)
        self._dropped(dropped)
        return total + nbytes <= self.capacity

    def _evict_for(self, nbytes: int) -> bool:
        """Delete least recently used entries of ``nbytes`` in all (a full file system)."""
        with self._directory_lock(time.monotonic() + ROOM_WAIT_S) as locked:
            if not locked:
                return False
            entries, _ = self._scan(None)
            freed, dropped = 0, []
            for _, key, size in sorted(entries):
                if freed >= nbytes:
                    break
                DiskCache._unlink(self._entries, key)
                freed += size
                dropped.append(key)
        self.evicted += len(dropped)
        self._dropped(dropped)
        return bool(dropped)

    def _scan(self, exclude: str | None, sweep: bool = True) -> tuple[list[tuple[int, str, int]], int]:
        """(mtime, key, size) of every entry, and the bytes of temporary files being written;
        with ``sweep``, a temporary file whose writer is gone (its key's lock is free) is
        deleted."""
        entries, in_progress = [], 0
        # a descriptor of its own: scandir shares the position of the one it is given
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._entries)
        try:
            with os.scandir(fd) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode) or e.name == exclude:
                        continue
                    if not e.name.endswith(_TMP_SUFFIX):
                        entries.append((st.st_mtime_ns, e.name, st.st_size))
                    elif not sweep or self._writer_alive(e.name.rsplit(".", 3)[0]):
                        in_progress += st.st_size
                    else:
                        DiskCache._unlink(self._entries, e.name)
                        self.stale += 1
        finally:
            os.close(fd)
        return entries, in_progress

    # ---- dropping ---------------------------------------------------------------------------

    def on_drop(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(key)`` after this process deletes or replaces an entry."""
        self._dropped.add(listener)

    def discard(self, key: str) -> None:
        """Delete the entry (it failed a check)."""
        if not _KEY.match(key) or key.endswith(_TMP_SUFFIX):
            return
        try:
            os.unlink(key, dir_fd=self._entries)
        except OSError:
            return
        self._dropped([key])

    # ---- bookkeeping ------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes in the directory now (entries and writes in progress, every process's)."""
        entries, in_progress = self._scan(None, sweep=False)
        return in_progress + sum(size for _, _, size in entries)

    def __len__(self) -> int:
        return len(self._scan(None, sweep=False)[0])

    def stats(self) -> dict[str, Any]:
        entries, in_progress = self._scan(None, sweep=False)
        return {"capacity": self.capacity, "bytes": in_progress + sum(size for _, _, size in entries),
                "entries": len(entries), "hits": self.hits, "misses": self.misses, "evicted": self.evicted,
                "waits": self.waits, "refused": self.refused, "stale": self.stale, "shared": True}

    def close(self) -> None:
        """Let go of the directory (the entries stay). In a process that did not open this
        cache (a forked child) the descriptors are closed and no lock is touched."""
        mine = os.getpid() == self._pid
        with self._mutex:
            held, self._held = self._held, {}
            fds, self._dir_fd = [self._entries, self._locks, self._global, self._dir_fd], -1
        if fds[-1] < 0:
            return
        for fd, _, _ in held.values():
            if mine:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        for fd in fds:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_dir_fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit, anything may be gone
                pass
