"""mfusepy ``Operations`` over a :class:`~pcrfs.access.views.ViewTree`: the whole FUSE adapter.

Semantics (what the kernel sees):

* **Read-only and immutable.** The mount is made ``ro`` (the kernel refuses most
  writes itself) and every write-type callback answers EROFS as well.
* **Kernel caching, and no ``open``.** A store never changes while mounted, so
  attributes, directory entries and negative lookups are cached for an hour and
  directories are opened with ``cache_readdir`` (honoured by libfuse >= 3.15).
  ``open`` answers the kernel's first OPEN with ENOSYS, after which the kernel
  sends no OPEN (nor RELEASE) for any file of the connection and treats every
  file as opened with ``FOPEN_KEEP_CACHE``: pages of a file survive close and
  reopen, so a re-read of a file the kernel holds never reaches the daemon
  (measured warm: ~8 us per os.open+read+close against ~120 us when ``open`` was
  answered). A read at offset 0 (the first read of a file) is what the per-view
  counters count. ``release`` and ``flush`` have no callback: libfuse answers
  FLUSH ENOSYS once and the kernel sends no more.
* **What still reaches the daemon** (counted per opcode, tests/test_fastpath.py):
  a first read is LOOKUP + READ, a re-read nothing, except that Python's
  ``open()`` (up to 3.13; not with ``buffering=0``, not ``os.open``) asks
  ``isatty`` of every file it opens: an ioctl (TCGETS) the kernel forwards every
  time whatever the filesystem answered before (fs/fuse/ioctl.c keeps no ENOSYS
  flag, unlike open/flush). It is answered in C, never in Python (the compiled
  path's ``ioctl`` answers ENOTTY and counts it; without it libfuse answers
  ENOSYS, which the kernel turns into ENOTTY); its daemon cost is the FUSE round
  trip itself, ~73% kernel time (wake-up, context switch, /dev/fuse read and
  reply): 4.6 us at load 1.9 on 2 cores, 10-15 us at load 6-9.
* **The counters.** ``getxattr(MNT, "user.pcrfs.stats")`` answers a fresh JSON
  document on every call (the kernel caches no extended attributes); ``pcrfs
  stats`` reads that. ``/.pcrfs/stats`` holds the same document: without ``open``
  it cannot be ``direct_io``, so after each read of it the daemon invalidates its
  attributes and pages (``fuse_invalidate_path``, from a thread of its own: doing
  it inside the read would wait on the very pages being read), and the next read
  gets a new snapshot (padded with spaces to the size last told to the kernel).
  That invalidation runs just after the reply, so a read racing it may see the
  snapshot before; the attribute is exact.
* **A compiled hot path.** When ``pcrfs.fuse._fastpath`` is built, serve() puts its
  C ``read``/``getattr``/``getxattr`` into the struct libfuse calls, in front of the
  Python ones here (see :mod:`pcrfs.fuse.fastpath`): image files are looked up and
  read on libfuse's threads without the GIL; the rest, and every failure, comes
  here. Measured first pass (tools/bench_read.py kernel): ~50 us of daemon CPU per
  43 kB file against ~190 us all in Python.
* **Listings carry attributes.** ``readdir`` returns entries with their full
  stat; under libfuse 3 they are handed to the kernel as *readdirplus* entries,
  so ``ls -l``/``os.scandir``/``find -size`` need no ``getattr`` per file. Each
  such entry costs the kernel an inode, wasted on a bare walk (``os.walk``,
  ImageFolder: names and d_type only; 0.5 s of a 1.28M-file walk), so after a
  listing whose attributes went unused (the kernel asked for its later chunks
  without them) listings are names only, handed to libfuse whole, until a
  lookup of a file shows that callers stat what they list again. A names-only
  listing builds no sizes and no complete stats (only inode and mode: d_ino and
  d_type), and the compiled path hands the entries to libfuse's filler in one C
  loop (``_fastpath.fill_dir``): a walk costs the daemon ~0.4-0.5 us of CPU per
  entry at 1.28M entries (~1.1 us with a ctypes call per entry).
* **Errors.** A missing path is ENOENT; stored bytes that fail their checksum
  (or a missing/changed record file) are EIO with one log line naming the file
  (the kernel retries a failed readahead READ with one-page READs, so one failing
  read() arrives two or three times: a repeat of the same file within EIO_REPEAT_S
  is counted as a request but neither logged nor counted as another error); the
  daemon keeps serving everything else. A read of a remote store that runs past its
  deadline (``--read-deadline``: an endpoint that stops answering) is EIO as well,
  and the kernel's retry of it within EIO_REPEAT_S fails at once instead of waiting
  a second deadline. A read whose process gets a signal meaning "stop" (Ctrl-C,
  SIGTERM, SIGKILL) while it waits on the store is answered EINTR within 0.1 s
  (:func:`_interrupt_probe`), so the reader, held by the kernel until it has an
  answer, is let go. ``ioctl`` (Python's ``open()``
  asks ``isatty``) is ENOTTY (see above).

Names of attributes on the Operations class matter: mfusepy registers any
attribute named like a FUSE callback (``lock``, ``flush``, ``access`` ...) as
that callback, so helpers here are underscored or clearly not FUSE names.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np

from ..remote import deadline
from ..remote.deadline import DeadlineExceeded
from ..store.read.reader import CorruptData
from ..access.views import FILE_MODE, Attr, DirEntries, DirNode, FileNode, StatsNode, ViewTree
from . import fastpath, load_mfusepy, mfuse_compat
from .fastpath import FastPath

mf = load_mfusepy()
log = logging.getLogger("pcrfs.fuse")

CACHE_TIMEOUT = 3600.0  # seconds the kernel may trust attributes, entries and negative lookups
FUSE_THREADS = 16       # libfuse worker threads (store reads release the GIL)

# libfuse 3 flags (fuse.h, fuse_common.h)
FUSE_READDIR_PLUS = 1 << 0          # readdir flags: the kernel asked for entries with attributes
FUSE_FILL_DIR_PLUS = 1 << 1         # filler flags: this entry's stat is complete
FUSE_CAP_READDIRPLUS = 1 << 13      # conn capability: readdirplus supported
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # conn capability: kernel decides per call (we want "always")

_TABLE_HANDLES = 1 << 62  # directory listing handles come from a counter from here
_DOTS = (".", "..")
STATS_XATTR = "user.pcrfs.stats"  # getxattr(MNT, STATS_XATTR): the counters as JSON, always fresh
STATS_FILE_PATH = "/.pcrfs/stats"
# getxattr(MNT, AHEAD_XATTR + "R.K,R.K,..."): fetch records R's prefixes at fidelity K in the
# background now -- a hint from a reader that knows its order (RecordShuffleSampler over a
# mount); answers how many fetches were started (0 where the store fetches no prefixes)
AHEAD_XATTR = "user.pcrfs.fetch_ahead."
AHEAD_MAX_RECORDS = 64  # records one hint may name
STATS_FILE_PAD = 4096  # the stats file's size is a multiple of this (see _stats_file_size)
STATS_FILE_HEADROOM = 2048  # bytes the document may grow by before a read outgrows the size told
EIO_REPEAT_S = 1.0   # a failure of the same file again within this is the kernel's retry (see Errors)
EIO_REMEMBERED = 256  # failing paths remembered for that


def _errors_mapped(fn: Callable) -> Callable:
    """Turn view/store exceptions into FUSE errnos; log the ones worth a line."""

    @functools.wraps(fn)
    def wrapper(self: "PcrfsOperations", path, *args):
        try:
            return fn(self, path, *args)
        except mf.FuseOSError:
            raise
        except FileNotFoundError:
            raise mf.FuseOSError(errno.ENOENT) from None
        except NotADirectoryError:
            raise mf.FuseOSError(errno.ENOTDIR) from None
        except IsADirectoryError:
            raise mf.FuseOSError(errno.EISDIR) from None
        except InterruptedError:  # the reader got a signal (see _interrupt_probe)
            raise mf.FuseOSError(errno.EINTR) from None
        except DeadlineExceeded as e:  # the read's deadline passed (a store that does not answer)
            self._note_timeout(path)
            if self._note_error(path):
                log.error("EIO on %s: %s", path, e.strerror)
            raise mf.FuseOSError(errno.EIO) from None
        except CorruptData as e:
            if self._note_error(path):
                log.error("EIO on %s: %s", path, e.strerror)
            raise mf.FuseOSError(errno.EIO) from None
        except OSError as e:
            if self._note_error(path):
                log.error("EIO on %s: %s", path, e)
            raise mf.FuseOSError(errno.EIO) from None
        except Exception:
            if self._note_error(path):
                log.exception("EIO on %s: unexpected error in %s", path, fn.__name__)
            raise mf.FuseOSError(errno.EIO) from None

    return wrapper


def _read_only(self, *_args) -> int:
    """Every write-type operation: the filesystem is read-only."""
    return -errno.EROFS


class PcrfsOperations(mf.Operations):
    """FUSE callbacks for one mounted store (use with :class:`PcrfsFUSE`, ``raw_fi=True``)."""

    use_ns = True  # mfusepy: times are integer nanoseconds

    def __init__(self, tree: ViewTree, *, cache_timeout: float = CACHE_TIMEOUT,
                 extra_stats: dict[str, Any] | None = None) -> None:
        self.tree = tree
        self.cache_timeout = float(cache_timeout)
        self.extra_stats = dict(extra_stats or {})
        self.owner = (os.getuid(), os.getgid())
        self._view_list = list(tree.views.values())
        self._table: dict[int, FuseListing] = {}  # fh -> open directory's listing
        self._table_ids = itertools.count(_TABLE_HANDLES)
        self._mutex = threading.Lock()
        self.eio_count = 0      # failing files (a kernel retry of the same file is not another)
        self.eio_requests = 0   # failing requests
        self._eio_recent: OrderedDict[str, float] = OrderedDict()  # path -> when it last failed
        self._timed_out: OrderedDict[str, float] = OrderedDict()  # path -> when a read of it ran out of time
        self._stats_doc = b""   # the stats file's last snapshot (made by a read at offset 0)
        self._stats_size_told = 0  # the stats file's size last given to the kernel
        self._stats_refresher: StatsFileRefresher | None = None
        self.fast: FastPath | None = None  # the compiled hot path, when serve() installs it
        self.fill_dir: Callable[..., int] | None = None  # the compiled listing loop (_fastpath.fill_dir), from serve()
        # calls that reached PcrfsFUSE's overrides of mfusepy internals (a silent fallback
        # to mfusepy's own, slower, methods after an mfusepy change shows up as zeros)
        self.dispatched = {"getattr_fuse_3": 0, "readdir_fuse_3": 0, "pinned_workers": 0}
        self.attr_requests = 0  # getattr calls: attributes the kernel did not have cached
        self.ahead_hints = 0    # records named by fetch-ahead hints (AHEAD_XATTR)
        self._listing_attrs_used = True  # were readdirplus attributes used lately? (readdir_fuse_3)
        self._slot = {v.name: slot for slot, v in enumerate(self._view_list)}
        store = tree.store
        total = store.manifest.get("total_bytes")
        if total is None:
            records = store.index.records
            total = int(records["size"].sum()) if len(records) else 0
        self._stored_bytes = int(total)
        self._inodes = 3 + len(self._view_list) * (1 + len(store.index.dirs) + store.num_images)
        self._index_copy = index_copy(store)  # the stats' "index" (see index_copy), found once

    # ---- helpers (not FUSE callbacks) --------------------------------------------------

    def _note_error(self, path: str) -> bool:
        """Count a failing request; True if it deserves a log line (not a repeat, see Errors)."""
        now = time.monotonic()
        with self._mutex:
            self.eio_requests += 1
            last = self._eio_recent.pop(path, None)
            self._eio_recent[path] = now
            while len(self._eio_recent) > EIO_REMEMBERED:
                self._eio_recent.popitem(last=False)
            if last is not None and now - last < EIO_REPEAT_S:
                return False
            self.eio_count += 1
            return True

    def _note_timeout(self, path: str) -> None:
        with self._mutex:
            self._timed_out.pop(path, None)
            self._timed_out[path] = time.monotonic()
            while len(self._timed_out) > EIO_REMEMBERED:
                self._timed_out.popitem(last=False)

    def _just_timed_out(self, path: str) -> bool:
        """True if a read of ``path`` ran out of time less than EIO_REPEAT_S ago: this is the
        kernel retrying the failed read (see Errors), and it fails at once rather than
        waiting a whole deadline again."""
        with self._mutex:
            when = self._timed_out.get(path)
        return when is not None and time.monotonic() - when < EIO_REPEAT_S

    def _stat(self, a: Attr) -> dict[str, int]:
        # mfusepy's dict form of a stat, for its generic getattr/readdir (libfuse 2 only:
        # under libfuse 3 PcrfsFUSE fills the kernel's structs with encode_stats)
        return {
            "st_mode": a.mode, "st_ino": a.ino, "st_nlink": a.nlink, "st_size": a.size,
            "st_blocks": (a.size + 511) // 512, "st_blksize": 4096,
            "st_uid": self.owner[0], "st_gid": self.owner[1],
            "st_atime": a.mtime_ns, "st_mtime": a.mtime_ns, "st_ctime": a.mtime_ns,
        }

    def stats_document(self) -> bytes:
        """The bytes of ``/.pcrfs/stats``: the view tree's counters plus the daemon's."""
        doc = self.tree.stats()
        cache = self.tree.store.cache
        if cache is not None:  # ViewTree.stats tests the cache for truth: an empty ByteLRU reads as none
            doc["cache"] = {"capacity": cache.capacity, "bytes": cache.nbytes,
                            "hits": cache.hits, "misses": cache.misses}
        fast = self.fast
        if fast is not None and fast.installed:  # what the compiled path served never passed through here
            c = fast.counters()
            for name, (first_reads, served) in c["views"].items():
                doc["views"][name]["first_reads"] += first_reads
                doc["views"][name]["bytes_served"] += served
            for section in (doc["store_reads"], doc["io"]["source"]):
                section["requests"] += c["store_requests"]
                section["bytes"] += c["store_bytes"]
            doc["fastpath"] = {"reads": c["fast_reads"], "python_reads": c["fallback_reads"],
                               "file_lookups": c["file_lookups"], "ioctls": c["ioctls"],
                               "prefix_reads": c["cache_reads"], "prefix_bytes": c["cache_bytes"],
                               "serves_reads": fast.reads, "crc32": c["crc32"]}
        doc["pid"] = os.getpid()
        doc["errors"] = {"eio": self.eio_count, "eio_requests": self.eio_requests}
        doc["attr_requests"] = self.attr_requests + (c["file_lookups"] if "fastpath" in doc else 0)
        doc["dispatched"] = dict(self.dispatched)
        doc["fetch_ahead_hints"] = self.ahead_hints
        doc["index"] = self._index_copy
        doc.update(self.extra_stats)
        return (json.dumps(doc, indent=1) + "\n").encode()

    def _put(self, value: Any) -> int:
        fh = next(self._table_ids)
        with self._mutex:
            self._table[fh] = value
        return fh

    # ---- lifecycle -------------------------------------------------------------------

    def init_with_config(self, conn_info, config_3) -> None:
        if config_3 is not None:  # libfuse 3: the same settings the -o options carry under libfuse 2
            config_3.attr_timeout = self.cache_timeout
            config_3.entry_timeout = self.cache_timeout
            config_3.negative_timeout = self.cache_timeout
            config_3.use_ino = 1
        if conn_info is not None and mf.fuse_version_major == 3:
            # Readdirplus in the kernel's "auto" mode: entries carry attributes when the
            # caller goes on to stat them (ls -l, find -size), plain names for a bare walk
            # (os.walk, ImageFolder). Forcing "always" made libfuse keep a node per listed
            # entry: daemon RSS grew to 433 MiB after one os.walk of 1.28M entries.
            if conn_info.capable & FUSE_CAP_READDIRPLUS:
                conn_info.want = conn_info.want | FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO
        if mf.fuse_version_major == 3:
            fuse = mfuse_compat.context_fuse()
            if fuse:
                self._stats_refresher = StatsFileRefresher(fuse)
        log.info("serving %s (%d images, views %s) with libfuse %d.%d", self.tree.store.root,
                 self.tree.store.num_images, ", ".join(self.tree.views) or "none",
                 mf.fuse_version_major, mf.fuse_version_minor)

    # ---- metadata ----------------------------------------------------------------------

    @_errors_mapped
    def getattr(self, path: str, fh=None) -> dict[str, int]:
        return self._stat(self._attr_of(path))

    @_errors_mapped
    def _attr_of(self, path: str) -> Attr:
        """What ``getattr`` answers, as an Attr (PcrfsFUSE fills the kernel's struct from it)."""
        with self._mutex:
            self.attr_requests += 1
        node = self.tree.resolve(path)
        if isinstance(node, FileNode):
            # the kernel lacks this file's attributes: callers do stat what they list
            self._listing_attrs_used = True
        a = self.tree.attr(node)
        if isinstance(node, StatsNode):
            a = a._replace(size=self._stats_file_size())
        return a

    def _stats_file_size(self) -> int:
        """The stats file's size as the kernel is told it: the document plus headroom,
        padded to whole pages. The kernel keeps that size until the file is next
        invalidated (after a read of it), so a read must fit a document that has grown
        since: it is padded to this size (see _stats_file_bytes)."""
        size = _pages(len(self.stats_document()) + STATS_FILE_HEADROOM)
        self._stats_size_told = size
        return size

    def _stats_file_bytes(self) -> bytes:
        doc = self.stats_document()
        size = max(self._stats_size_told, _pages(len(doc)))
        return doc[:-1] + b" " * (size - len(doc)) + b"\n"  # JSON allows trailing whitespace

    @_errors_mapped
    def opendir(self, path: str) -> int:
        return self._put(self._fuse_listing(path))

    def _fuse_listing(self, path: str) -> "FuseListing":
        node = self.tree.resolve(path)
        if not isinstance(node, DirNode):
            raise NotADirectoryError(path)
        # "..": glibc's readdir hides entries with inode 0, so it needs its real one
        me, parent = self.tree.attr(node), self.tree.getattr(path.rstrip("/").rsplit("/", 1)[0] or "/")
        listed = self.tree.readdir(path)
        entries = DirEntries()
        named = [(n, a._replace(size=self._stats_file_size()) if a.mode == FILE_MODE else a)
                 for n, a in listed.named]  # the stats file (the only file among named entries)
        entries.named = [(".", me), ("..", parent)] + named
        entries.set_files_of(listed)
        return FuseListing(entries, self.owner)

    @_errors_mapped
    def _listing_for(self, fh: int, path: str) -> "FuseListing":
        listing = self._table.get(fh)
        if listing is None:  # not opened through opendir (should not happen): list afresh
            listing = self._fuse_listing(path)
        return listing

    def readdir_with_offset(self, path: str, offset: int, fh: int) -> Iterator[tuple[str, Any, int]]:
        entries = self._listing_for(fh, path).entries
        for pos in range(offset, len(entries)):
            name, a = entries[pos]
            yield name, self._stat(a), pos + 1

    def releasedir(self, path: str, fh: int) -> int:
        with self._mutex:
            self._table.pop(fh, None)
        return 0

    @_errors_mapped
    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": (self._stored_bytes + 4095) // 4096,
                "f_bfree": 0, "f_bavail": 0, "f_files": self._inodes, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}

    # ---- files -------------------------------------------------------------------------

    def open(self, path: str, fi) -> int:
        # ENOSYS (once: the kernel then stops sending OPEN for the connection) and not
        # "no callback": without one, libfuse's high-level API answers every open with 0.
        return -errno.ENOSYS

    # No `release`, `ioctl` or `flush` (see the module docstring): libfuse answers them
    # itself without a Python callback.

    @_errors_mapped
    def read(self, path: str, size: int, offset: int, fi) -> bytes:
        node = self.tree.resolve(path)
        if isinstance(node, FileNode):
            if self._timed_out and self._just_timed_out(path):
                self._note_error(path)
                raise mf.FuseOSError(errno.EIO)
            records = self.tree.store.records
            if records.read_deadline is None:
                data = self.tree.read(node, offset, size)
            else:
                with records.deadline():  # one for the whole request, whatever the store does inside
                    data = self.tree.read(node, offset, size)
            if self.fast is not None:  # read and checked: the compiled path can take this record
                self.fast.offer_record(node.image)
            return data
        if isinstance(node, StatsNode):
            if offset == 0 or not self._stats_doc:
                self._stats_doc = self._stats_file_bytes()
            if self._stats_refresher is not None:
                self._stats_refresher.poke()
            return self._stats_doc[offset:offset + size]
        raise IsADirectoryError(path)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if name == STATS_XATTR and path in ("/", STATS_FILE_PATH):
            return self.stats_document()
        if name.startswith(AHEAD_XATTR) and path == "/":
            return self._fetch_ahead(name[len(AHEAD_XATTR):])
        raise mf.FuseOSError(errno.ENODATA)

    def _fetch_ahead(self, spec: str) -> bytes:
        """Hand a reader's fetch-ahead hint ("R.K,R.K,...") to the store; EINVAL if malformed."""
        store = self.tree.store
        try:
            pairs = [tuple(int(x) for x in item.split(".")) for item in spec.split(",")]
        except ValueError:
            raise mf.FuseOSError(errno.EINVAL) from None
        n_records = len(store.index.records)
        if not 0 < len(pairs) <= AHEAD_MAX_RECORDS or any(
                len(p) != 2 or not (0 <= p[0] < n_records and 1 <= p[1] <= store.num_groups) for p in pairs):
            raise mf.FuseOSError(errno.EINVAL)
        started = sum(store.fetch_prefix_ahead(r, k) is not None for r, k in pairs)
        with self._mutex:
            self.ahead_hints += len(pairs)
        return str(started).encode()

    def destroy(self, path: str) -> None:
        if self._stats_refresher is not None:
            self._stats_refresher.stop()

    # ---- everything that would change the tree ---------------------------------------------

    write = create = mknod = mkdir = rmdir = unlink = rename = link = symlink = _read_only
    chmod = chown = truncate = utimens = setxattr = removexattr = fallocate = _read_only


def index_copy(store: Any) -> dict[str, Any]:
    """The stats' ``"index"``: where this machine holds the index files of the mounted
    store, so a reader of the mount that needs the catalogue but no image
    (:class:`pcrfs.sampling.RecordShuffleSampler`) opens it with no network and no
    credentials. ``dir``: the store's ``index/`` directory, or for a remote store the copy
    downloaded into the cache directory (``StoreLocation.index_dir``); None if none is
    found. ``files`` (the manifest's sizes and CRC-32s), ``counts`` (images, scan groups,
    records) and ``format_version`` let the reader load and check that copy as
    ``open_store`` would."""
    manifest = store.manifest
    files = manifest["index_files"]
    found = store.index_dir  # where open_store read (and checked) the index files
    return {"dir": None if found is None else str(found), "files": files,
            "counts": [manifest["num_images"], manifest["num_groups"], manifest["num_records"]],
            "format_version": manifest.get("format_version", 1)}


def _pages(n: int) -> int:
    """``n`` rounded up to whole STATS_FILE_PAD pages."""
    return -(-n // STATS_FILE_PAD) * STATS_FILE_PAD


class StatsFileRefresher:
    """Drops the kernel's copy of ``/.pcrfs/stats`` after each read of it, so the next
    read asks the daemon again (``fuse_invalidate_path``: attributes and pages).

    Runs in a thread of its own: an invalidation waits for the pages it drops, and
    the pages of a read in progress are released only by that read's reply."""

    def __init__(self, fuse: int) -> None:
        self._invalidate = mfuse_compat.invalidate_path()
        self._fuse = ctypes.c_void_p(fuse)
        self._wanted = threading.Event()
        self._stopped = False
        threading.Thread(target=self._run, name="pcrfs-stats-refresh", daemon=True).start()

    def poke(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopped = True
        self._wanted.set()

    def _run(self) -> None:
        path = STATS_FILE_PATH.encode()
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopped:
                return
            self._invalidate(self._fuse, path)  # ENOENT when the kernel no longer holds it: fine


class PcrfsFUSE(mfuse_compat.FUSE):
    """mfusepy's FUSE with libfuse 3 readdirplus and cached directory listings.

    mfusepy always fills directory entries without FUSE_FILL_DIR_PLUS, so the
    kernel would look every entry up again; here complete stats go with the
    entries when the kernel asks for them.
    """

    def __init__(self, operations: PcrfsOperations, mountpoint: str, **kwargs: Any) -> None:
        # the compiled callbacks go into mfusepy's fuse_operations struct before libfuse starts
        fast = operations.fast
        super().__init__(operations, mountpoint, install=None if fast is None else fast.install, **kwargs)

    def worker_pinned(self) -> None:
        self.operations.dispatched["pinned_workers"] += 1

    def getattr_fuse_3(self, path: bytes | None, buf, fip) -> int:
        # Every lookup the kernel cannot answer from readdirplus (and the compiled path
        # does not answer) lands here: the struct comes from the one stat encoder,
        # instead of mfusepy's dict + setattr-per-key round.
        ops = self.operations
        ops.dispatched["getattr_fuse_3"] += 1
        try:
            a = ops._attr_of(path.decode(self.encoding, self.errors))
        except mf.FuseOSError as e:
            return -e.errno
        st = encode_stats([a.mode], [a.ino], [a.nlink], [a.size], [a.mtime_ns], ops.owner)
        ctypes.memmove(buf, st.ctypes.data, STAT_SIZE)
        return 0

    def opendir(self, path: bytes, fip) -> int:
        fi = fip.contents
        fi.fh = self.operations.opendir(path.decode(self.encoding, self.errors))
        if hasattr(fi, "cache_readdir"):  # libfuse 3 passes these on from 3.15 (ignored before)
            fi.cache_readdir = 1
            fi.keep_cache = 1
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf, filler, offset: int, fip, flags: int) -> int:
        # Hot path of every directory walk: per entry, one foreign call with a name
        # that is already bytes and a pointer into the listing's block of ready-made
        # stat structs. The filler is called through a prototype without argtypes
        # and with reused argument objects: ctypes' per-call argument conversion
        # cost more than the call itself.
        try:
            listing = self.operations._listing_for(
                fip.contents.fh, None if path is None else path.decode(self.encoding, self.errors))
        except mf.FuseOSError as e:
            return -e.errno
        ops = self.operations
        ops.dispatched["readdir_fuse_3"] += 1
        if ops.fast is not None and ops.fast.files_looked_up():
            ops._listing_attrs_used = True  # the compiled getattr's part of _attr_of
        plus = FUSE_FILL_DIR_PLUS if flags & FUSE_READDIR_PLUS else 0
        fill = _Filler(filler, buf, listing, ops.fill_dir)
        n = len(listing.names)
        if offset:
            # The kernel asks for attributes past the first chunk only if the caller
            # used the ones it got (stat after readdir, like `ls -l`): remember that.
            ops._listing_attrs_used = bool(plus)
        if offset or ops._listing_attrs_used:
            start = offset
            if start < len(_DOTS):  # "." and ".." never carry attributes (libfuse would look them up)
                if not fill.paged(start, len(_DOTS), 0):
                    return 0
                start = len(_DOTS)
            fill.paged(start, n, plus)
        else:
            # A bare walk (os.walk, ImageFolder: names and d_type only) is what came
            # last, and attributes cost the kernel an inode each: names only, and the
            # whole listing at once (offset 0: libfuse keeps it and answers the kernel's
            # next chunks itself, without a callback).
            fill.whole(n)
        return 0


class _Filler:
    """Calls libfuse's filler for a range of a listing's entries (see readdir_fuse_3): in one
    compiled loop when the compiled path is built (``_fastpath.fill_dir``), else entry by
    entry through ctypes."""

    __slots__ = ("call", "buf", "names", "listing", "stat", "offset", "compiled", "filler")

    def __init__(self, filler, buf: int, listing: "FuseListing", compiled: Callable[..., int] | None = None) -> None:
        self.names, self.listing = listing.names, listing
        self.compiled = compiled
        if compiled is not None:
            self.filler, self.buf = ctypes.cast(filler, ctypes.c_void_p).value, buf
            return
        self.call = _raw_filler(filler)
        self.buf, self.stat, self.offset = ctypes.c_void_p(buf), ctypes.c_void_p(), ctypes.c_int64()

    def paged(self, start: int, end: int, flag: int) -> bool:
        """Entries start..end-1 with their positions as offsets, until libfuse's buffer
        for this request is full; False if it filled up."""
        stats = self.listing.stats
        if self.compiled is not None:
            return self.compiled(self.filler, self.buf, self.names, stats.ctypes.data, start, end, flag, False) == end
        call, buf, stat, off, names = self.call, self.buf, self.stat, self.offset, self.names
        first = stats.ctypes.data + start * STAT_SIZE
        for pos, address in zip(range(start, end), range(first, 1 << 62, STAT_SIZE)):
            stat.value = address
            off.value = pos + 1
            if call(buf, names[pos], stat, off, flag):
                return False
        return True

    def whole(self, end: int) -> None:
        """Entries 0..end-1, without attributes, at offset 0: libfuse buffers the whole listing
        (its filler fails only when it cannot: no more entries then)."""
        kinds = self.listing.kinds  # what a names-only entry carries: d_ino and d_type
        if self.compiled is not None:
            self.compiled(self.filler, self.buf, self.names, kinds.ctypes.data, 0, end, 0, True)
            return
        call, buf, stat, off = self.call, self.buf, self.stat, self.offset
        for name, address in zip(self.names[:end], range(kinds.ctypes.data, 1 << 62, STAT_SIZE)):
            stat.value = address
            if call(buf, name, stat, off, 0):
                return


STAT_DTYPE = np.dtype(mfuse_compat.c_stat)  # numpy's view of the platform's struct stat, as mfusepy declares it
STAT_SIZE = STAT_DTYPE.itemsize
_NS = 1_000_000_000


class FuseListing:
    """A directory as the kernel receives it: raw names and blocks of ``struct stat``s
    built with a few vectorized assignments, each on first use: ``kinds`` (inode and
    mode only: all a names-only listing hands over, as d_ino and d_type) and ``stats``
    (complete, for readdirplus). A racing second build of either gives the same block."""

    __slots__ = ("entries", "names", "owner", "_kinds", "_stats")

    def __init__(self, entries: DirEntries, owner: tuple[int, int]) -> None:
        self.entries = entries
        self.names = entries.raw_names()
        self.owner = owner
        self._kinds: np.ndarray | None = None
        self._stats: np.ndarray | None = None

    def _column(self, field: str, files: np.ndarray | int) -> np.ndarray:
        """One attribute of every entry: the named entries' from their Attrs, then the files'."""
        named = [getattr(a, field) for _, a in self.entries.named]
        files = np.full(len(self.entries.file_names), files, np.int64) if isinstance(files, int) else files
        return np.concatenate([np.array(named, np.int64), files])

    @property
    def kinds(self) -> np.ndarray:
        """``struct stat``s with only st_ino and st_mode set."""
        kinds = self._kinds
        if kinds is None:
            kinds = np.zeros(len(self.names), STAT_DTYPE)
            kinds["st_mode"] = self._column("mode", FILE_MODE)
            kinds["st_ino"] = self._column("ino", self.entries.file_inos)
            self._kinds = kinds
        return kinds

    @property
    def stats(self) -> np.ndarray:
        """Complete ``struct stat``s."""
        stats = self._stats
        if stats is None:
            e = self.entries
            stats = self._stats = encode_stats(
                self._column("mode", FILE_MODE), self._column("ino", e.file_inos), self._column("nlink", 1),
                self._column("size", e.file_sizes), self._column("mtime_ns", e.file_mtimes), self.owner)
        return stats


def encode_stats(modes, inos, nlinks, sizes, mtimes_ns, owner: tuple[int, int]) -> np.ndarray:
    """Complete ``struct stat``s, one per entry of the equal-length columns (the one
    encoder of the mount's attributes: listings, getattr; the compiled path fills the
    same fields in C, see _fastpath.c fast_getattr)."""
    sizes = np.asarray(sizes, np.int64)
    st = np.zeros(len(sizes), STAT_DTYPE)
    st["st_mode"] = modes
    st["st_ino"] = inos
    st["st_nlink"] = nlinks
    st["st_size"] = sizes
    st["st_blocks"] = (sizes + 511) >> 9
    st["st_blksize"] = 4096
    st["st_uid"], st["st_gid"] = owner
    sec, nsec = np.divmod(np.asarray(mtimes_ns, np.int64), _NS)
    for field in ("st_atimespec", "st_mtimespec", "st_ctimespec"):
        st[field]["tv_sec"], st[field]["tv_nsec"] = sec, nsec
    return st


def _raw_filler(filler) -> Callable[..., int]:
    """libfuse's filler (``fill_dir``/``fill_dir_plus``) as a foreign function without
    argtypes; its arguments must then be passed as ctypes objects of the right types."""
    return _filler_at(ctypes.cast(filler, ctypes.c_void_p).value)


@functools.lru_cache(maxsize=8)  # libfuse hands out the same two fillers all the time
def _filler_at(address: int) -> Callable[..., int]:
    return ctypes.CFUNCTYPE(ctypes.c_int)(address)


def escape_option(value: str) -> str:
    """Escape a value for a libfuse ``-o`` list (commas and backslashes)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


# fuse_main() exit statuses (lib/helper.c): 8 means the session loop ended with an
# error, which is also how libfuse 3 reports a stop by SIGTERM/SIGINT/SIGHUP.
FUSE_MAIN_FAILURES = {1: "parse the mount options", 2: "use the mount point", 3: "set up FUSE",
                      4: "mount", 5: "daemonize", 6: "install signal handlers", 7: "configure threads"}
FUSE_MAIN_LOOP_ENDED = 8


def serve(ops: PcrfsOperations, mountpoint: str, *, fsname: str, options: dict[str, Any] | None = None) -> int:
    """Mount and serve until unmounted or signalled (SIGINT/SIGTERM/SIGHUP unmount cleanly).

    Returns fuse_main()'s status: 0 after an unmount, 8 after a signal, another
    value (see FUSE_MAIN_FAILURES) if libfuse could not mount at all."""
    kwargs: dict[str, Any] = {
        "ro": True, "default_permissions": True, "fsname": escape_option(fsname), "subtype": "pcrfs",
        "use_ino": True, "attr_timeout": ops.cache_timeout, "entry_timeout": ops.cache_timeout,
        "negative_timeout": ops.cache_timeout,
    }
    if mf.fuse_version_major == 3 and mf.fuse_version_minor >= 12:
        kwargs.update(max_threads=FUSE_THREADS, max_idle_threads=FUSE_THREADS)
    kwargs.update(options or {})
    mfuse_compat.check()  # every mfusepy internal used here is there
    ops.fast = _compiled_path(ops)
    ops.fill_dir = fastpath.fill_dir_function(STAT_SIZE) if mf.fuse_version_major == 3 else None
    deadline.set_interrupt_probe(_interrupt_probe())
    try:
        PcrfsFUSE(ops, mountpoint, raw_fi=True, foreground=True, **kwargs)
    except RuntimeError as e:  # mfusepy raises fuse_main()'s non-zero status
        if len(e.args) == 1 and isinstance(e.args[0], int):
            return e.args[0]
        raise
    finally:
        deadline.set_interrupt_probe(None)
        if ops.fast is not None:
            ops.fast.release()
    return 0


# Signals that mean "stop" (SIGHUP, SIGINT, SIGQUIT, SIGKILL, SIGTERM), as a /proc SigPnd mask
_STOP_SIGNALS = sum(1 << (s - 1) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGKILL,
                                           signal.SIGTERM))


def _interrupt_probe() -> Callable[[], bool] | None:
    """Whether the process whose request is served on the calling thread wants it to end; a
    read waiting on the store polls this (:mod:`pcrfs.remote.deadline`) and then answers
    EINTR at once. Two ways to know:

    * the kernel interrupted the request (libfuse's ``fuse_interrupted``): it does so when the
      reader gets a signal during a synchronous READ -- the one-page read with which the kernel
      retries a failed readahead is one;
    * the reader has a signal that means "stop" pending (/proc/PID/status), or is gone: the
      kernel sends no interrupt for a readahead READ, and a reader waiting on its pages sits in
      D state with the signal pending -- Ctrl-C included -- until the answer comes.

    False on a thread that serves no request."""
    found = mfuse_compat.interrupt_functions()
    if found is None:
        return None
    interrupted, context = found

    def probe() -> bool:
        if interrupted():
            return True
        ctx = context()
        pid = ctx.contents.pid if ctx else 0
        return pid > 0 and _stopping(pid)
    return probe


def _stopping(pid: int) -> bool:
    """True if thread/process ``pid`` is gone or has a "stop" signal pending and not blocked."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:  # gone (killed while its request waited) -- or hidden from us (hidepid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False
    fields = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
    try:
        if fields[b"State"].split()[0] in (b"Z", b"X"):
            return True
        pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
        return bool(pending & ~int(fields[b"SigBlk"], 16) & _STOP_SIGNALS)
    except (KeyError, ValueError, IndexError):
        return False


def _compiled_path(ops: PcrfsOperations) -> FastPath | None:
    """The compiled hot path for this mount, or None (logged either way)."""
    module, why_not = fastpath.load()
    if module is not None and mf.fuse_version_major != 3:
        module, why_not = None, f"it needs libfuse 3 (mfusepy uses libfuse {mf.fuse_version_major})"
    if module is not None:
        try:
            fast = FastPath(module, ops.tree, ops.owner)
        except (OSError, ValueError, MemoryError) as e:
            why_not = str(e)
        else:
            log.info("compiled path: lookups%s in C%s", " and reads" if fast.reads else "",
                     " (from cached record prefixes)" if fast.reads and not fast.local else
                     "" if fast.reads else " (reads in Python: remote store, readahead, disk cache or bwlimit)")
            return fast
    log.info("compiled path off: every callback in Python (%s)", why_not)
    return None
