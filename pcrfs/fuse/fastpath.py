"""The mount's compiled hot path (``pcrfs/fuse/_fastpath.c``), when it was built.

With it, libfuse's worker threads answer an image file's ``getattr`` and ``read``
(and every ``ioctl``: ENOTTY, counted) in C, without the interpreter: the kernel's lookup and read of a file cost the
daemon no Python at all, and several readers are served on several cores at once
(see the C file for what it does and what it leaves to Python). Reads are served
there for a local store read without readahead, disk cache or bandwidth limit
(``Store.pread``, the local pread tier), and for a remote store from the record prefixes its caches
hold (``Store.prefix_holder``: a buffer in memory or a file on disk, taken back
when the cache drops or replaces it); for other stores only attributes are. The Python
callbacks stay installed behind it for everything else and for every failure.

``PCRFS_NO_FASTPATH=1`` in the daemon's environment turns it off (the mount logs
which path it serves with).

The contract: :class:`FastPath` hands ``configure`` the index arrays themselves (the
module holds their buffers), each structured array's fields as ``{name: (dtype string,
offset)}`` and the constants the two sides share (``KEEP_GROUP_BYTES``, the EOI marker);
the C side checks every one against what it reads and raises ``ContractError`` (a
ValueError: the mount then serves in Python and logs why). A module built from another
version of ``_fastpath.c`` than this file expects (``CONTRACT``) is not used at all.
``configure`` returns the mount's own state (descriptors, tables, counters), released
with :meth:`FastPath.release`; no other mount's state is touched.
"""
from __future__ import annotations

import ctypes
import logging
import os
import resource
import threading
from typing import Any

import numpy as np

from ..jpeg.scans import EOI_BYTES
from ..store.read.largegroups import KEEP_GROUP_BYTES
from ..access.views import ViewTree

log = logging.getLogger("pcrfs.fuse")

DISABLE_ENV = "PCRFS_NO_FASTPATH"
CONTRACT = 3  # _fastpath.c's CONTRACT: configure()'s arguments and what they must hold
# The compiled path keeps its own duplicate of each record's descriptor; it takes at
# most this share of the open-file limit, the rest of the records stay on the Python path.
FD_SHARE = 0.5
FD_RESERVE = 64


def load() -> tuple[Any, str]:
    """The compiled module, or None and why not."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None, f"turned off by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    try:
        from . import _fastpath
    except ImportError as e:
        return None, f"not built ({e}); reinstall pcrfs with a C compiler and Python's headers " \
                     "(Debian: apt-get install gcc libc6-dev python3-dev)"
    built = getattr(_fastpath, "CONTRACT", None)
    if built != CONTRACT:
        return None, f"built from another version of _fastpath.c (contract {built}, this pcrfs needs " \
                     f"{CONTRACT}); reinstall pcrfs"
    return _fastpath, ""


def fill_dir_function(stat_size: int) -> Any:
    """The compiled loop that hands a listing's entries to libfuse's filler
    (``_fastpath.fill_dir``), or None: not built, turned off, or built with another
    ``struct stat`` than ``stat_size`` bytes (the size of the listings' stat blocks)."""
    module, _ = load()
    if module is None or module.STAT_SIZE != stat_size:
        return None
    return module.fill_dir


def _address(func: Any) -> int:
    return ctypes.cast(func, ctypes.c_void_p).value or 0


class FastPath:
    """The compiled path configured for one mounted tree."""

    def __init__(self, module: Any, tree: ViewTree, owner: tuple[int, int]) -> None:
        self.module = module
        store = tree.store
        self.store = store
        # local record files read directly: the C side preads descriptors the record source hands it
        self.local = store.reads_direct and store.records.offers_descriptors()
        self._prefixes = not self.local and store.serves_prefixes
        self.reads = self.local or self._prefixes
        # The state this mount's reads use; ContractError (a ValueError) if anything is not
        # what the C side reads.
        self.state = module.configure(**configure_args(tree, owner, self.reads))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_budget = len(store.index.records) if soft == resource.RLIM_INFINITY else \
            max(0, int(soft * FD_SHARE) - FD_RESERVE)
        self._fds_given = 0
        self._lock = threading.Lock()
        self._file_lookups_seen = 0
        self._trampolines: tuple = ()
        self.installed = False

    def install(self, ops_struct: Any) -> None:
        """Put the compiled callbacks into mfusepy's ``fuse_operations`` struct; the
        Python ones it replaces become their fallbacks. ``ioctl`` had no Python
        callback (libfuse answered ENOSYS): the compiled one answers ENOTTY and counts."""
        py = (ops_struct.read, ops_struct.getattr, ops_struct.getxattr)
        *fast, ioctl = self.state.install(*(_address(f) for f in py))
        self._trampolines = py  # the struct no longer references them: keep them alive
        for name, prototype_of, address in zip(("read", "getattr", "getxattr"), py, fast):
            setattr(ops_struct, name, type(prototype_of)(address))
        ops_struct.ioctl = type(ops_struct.ioctl)(ioctl)
        self.installed = True
        if self._prefixes:
            self.store.on_prefix_dropped(self._prefix_dropped)

    def offer_record(self, image: int) -> None:
        """After a Python read of ``image`` succeeded: hand its record's descriptor to
        the compiled path (a duplicate of the one the record source opened and checked, or
        the disk cache's file of the record's prefix)."""
        if not self.reads:
            return
        for g, data in self.store.cut_groups(image):  # what that read cut: its rest is served here
            self.state.adopt_cut(image, g - 1, data)
        if self._fds_given >= self._fd_budget:
            return
        r = self.store.index.record_of(image)
        if self.state.has_fd(r):
            return
        with self._lock:
            if self._fds_given >= self._fd_budget or self.state.has_fd(r):
                return
            if self.local:
                fd = self.store.records.dup_descriptor(r)
                taken = self.state.adopt(r, fd)
            else:
                held = self.store.prefix_holder(r)
                if held is None:
                    return
                fd, base, groups = held  # a descriptor, or a buffer (memory) the module holds on to
                taken = self.state.adopt(r, fd, base, groups, True)
            if taken:
                self._fds_given += 1
            elif isinstance(fd, int):
                os.close(fd)

    def _prefix_dropped(self, r: int) -> None:
        """A cache dropped or replaced record r's prefix: take the descriptor or buffer back."""
        with self._lock:
            if self.state.revoke(r):
                self._fds_given -= 1

    def counters(self) -> dict[str, Any]:
        return self.state.counters()

    def files_looked_up(self) -> bool:
        """Whether the kernel looked up an image file since the last call (see readdir_fuse_3)."""
        n = self.state.counters()["file_lookups"]
        seen, self._file_lookups_seen = self._file_lookups_seen, n
        return n != seen

    def release(self) -> None:
        """After the unmount: take the callbacks out, wait for any still running, close
        the descriptors, free the tables (the counters stay readable)."""
        self.state.release()
        self.installed = False


def configure_args(tree: ViewTree, owner: tuple[int, int], serve_reads: bool) -> dict[str, Any]:
    """``_fastpath.configure``'s arguments for a tree: the index arrays as they are
    (np.ascontiguousarray copies nothing for the memory-mapped index files; the C side
    checks their types and holds them), the views, and the constants both sides share."""
    index = tree.store.index
    images, records = np.ascontiguousarray(index.images), np.ascontiguousarray(index.records)
    file_base = 1 + len(index.dirs)
    views = [(name.encode(), view.k, None if view.ks is None else np.ascontiguousarray(view.ks),
              tree._ino(view, file_base)) for name, view in tree.views.items()]
    blob = index.paths.blob()
    return dict(
        n_images=index.num_images, n_groups=index.num_groups, n_records=len(records),
        lengths=np.ascontiguousarray(index.group_lengths), crcs=np.ascontiguousarray(index.group_crc32),
        images=images, image_fields=_fields(images.dtype), records=records, record_fields=_fields(records.dtype),
        group_offsets=np.ascontiguousarray(index.record_group_offsets),
        blob=blob if len(blob) else b"", path_offsets=np.ascontiguousarray(index.paths.offsets),
        # format version 2: records hold ranges of storage positions
        positions=np.ascontiguousarray(index.positions) if index.shuffled else None,
        storage=np.ascontiguousarray(index.storage_order) if index.shuffled else None,
        views=views, uid=owner[0], gid=owner[1], serve_reads=serve_reads,
        # groups larger than this that a read cuts go to Python, which checks them once
        # (the floor of Store.range_group_bytes: the compiled path keeps no group cache)
        cut_group_limit=KEEP_GROUP_BYTES, eoi=EOI_BYTES)


def _fields(dtype: np.dtype) -> dict[str, tuple[str, int]]:
    """A structured dtype's fields as the C side checks them: name -> (dtype string, offset)."""
    return {name: (spec[0].str, spec[1]) for name, spec in (dtype.fields or {}).items()}
