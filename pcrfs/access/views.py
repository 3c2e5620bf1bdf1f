"""Fidelity views over a store: the filesystem tree the mount serves.

``/scan1`` ... ``/scanN`` mirror the source tree with each image cut after k scan
groups; ``/full`` is the full-fidelity view; ``/.pcrfs/stats`` holds counters (and an empty
hidden directory, :data:`ROOT_HINT_DIR`, tells a loader given the root to take a view).
A store with an adaptive index (``pcrfs quality --write-index``) also gets
``/ssim90``, ``/ssim95``, ``/ssim98``: the same tree, each image cut at its own k.
This layer is plain Python (no FUSE): the FUSE adapter, tests and tools use it.

Directory listings are built once per directory from the index's directory
ranges and kept in a small LRU, so nothing per image is created at mount time.
"""
from __future__ import annotations

import functools
import json
import logging
import stat as st
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import numpy as np

from ..jpeg.scans import EOI_BYTES
from ..store import format as fmt
from ..store.format.adaptiveindex import AdaptiveIndexError, load as load_adaptive_index
from ..store.read.reader import Store

STATS_DIR = ".pcrfs"
STATS_FILE = "stats"
# An empty directory in the mount root whose name is the advice: a loader given the mount
# root instead of a view (torchvision's ImageFolder(MNT)) takes each root directory for a
# class; one without images makes it fail, naming the classes without images. Without this
# one that name would be only ".pcrfs"; without either, ImageFolder(MNT) would train on
# the views as classes. Listed by the mount only (fsspec's pcr:// root lists the views).
ROOT_HINT_DIR = ".mount-root-of-pcrfs--point-the-loader-at-a-view-such-as-full-or-scan5"
FULL_VIEW = "full"
FILE_MODE = st.S_IFREG | 0o444
DIR_MODE = st.S_IFDIR | 0o555

log = logging.getLogger("pcrfs.access.views")


@dataclass(frozen=True)
class View:
    """A fidelity view: every image at ``k`` scan groups, or, for an adaptive
    view, image i at ``ks[i]`` groups (``k`` is then the store's group count)."""
    name: str
    k: int  # scan groups served (fixed-k views)
    ks: np.ndarray | None = field(default=None, compare=False, repr=False)  # u1[n]: per-image k

    def k_of(self, image: int) -> int:
        """Scan groups served for ``image`` in this view."""
        return self.k if self.ks is None else int(self.ks[image])

    def sizes(self, listing: "DirListing") -> np.ndarray:
        """Sizes of a listing's files in this view (one vectorized gather)."""
        if self.ks is None:
            return listing.sizes[:, self.k - 1]
        cols = self.ks[listing.images].astype(np.intp) - 1
        return listing.sizes[np.arange(len(cols)), cols]


class Attr(NamedTuple):
    """A file's attributes (a tuple: listings build one per entry, so it must be cheap)."""
    mode: int
    size: int
    mtime_ns: int
    ino: int
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return st.S_ISDIR(self.mode)


class DirEntries(Sequence):
    """A directory's entries: a few named ones (subdirectories, the views) as
    ``(name, Attr)`` rows, then its files as columns, so a listing of thousands
    of files costs no Python object per file until someone asks for one.
    Indexing gives ``(name, Attr)`` for every entry alike."""

    __slots__ = ("named", "file_names", "_file_sizes", "file_mtimes", "file_inos")

    def __init__(self) -> None:
        self.named: list[tuple[str, Attr]] = []
        self.file_names: list[bytes] = []  # raw (encoded) names, as the kernel gets them
        self._file_sizes: np.ndarray | Callable[[], np.ndarray] = _EMPTY
        self.file_mtimes = _EMPTY
        self.file_inos = _EMPTY

    def add(self, name: str, a: Attr) -> None:
        self.named.append((name, a))

    def set_files(self, names: list[bytes], sizes: np.ndarray | Callable[[], np.ndarray], mtimes: np.ndarray,
                  inos: np.ndarray) -> None:
        """The files' columns; ``sizes`` may be a function that computes them, called on first
        use (a bare walk lists names and kinds only, and never pays for the sizes)."""
        self.file_names, self._file_sizes, self.file_mtimes, self.file_inos = names, sizes, mtimes, inos

    def set_files_of(self, other: "DirEntries") -> None:
        """The files of ``other`` (their sizes still uncomputed if they were)."""
        self.file_names, self._file_sizes = other.file_names, other._file_sizes
        self.file_mtimes, self.file_inos = other.file_mtimes, other.file_inos

    @property
    def file_sizes(self) -> np.ndarray:
        sizes = self._file_sizes
        if callable(sizes):  # computed once (a racing second computation gives the same array)
            sizes = self._file_sizes = sizes()
        return sizes

    def raw_names(self) -> list[bytes]:
        """Every entry's name as bytes, in order."""
        return [fmt.encode_path(name) for name, _ in self.named] + self.file_names

    def __len__(self) -> int:
        return len(self.named) + len(self.file_names)

    def __getitem__(self, pos):
        if isinstance(pos, slice):
            return [self[j] for j in range(*pos.indices(len(self)))]
        if pos < 0:
            pos += len(self)
        if pos < len(self.named):
            return self.named[pos]
        j = pos - len(self.named)
        return fmt.decode_path(self.file_names[j]), Attr(FILE_MODE, int(self.file_sizes[j]),
                                                         int(self.file_mtimes[j]), int(self.file_inos[j]))


_EMPTY = np.zeros(0, np.int64)


@dataclass(frozen=True)
class DirNode:
    view: View | None  # None for the root and the stats directory
    dir_id: int        # index into the store's directory table (-1: root, -2: stats dir, -4: the hint)


@dataclass(frozen=True)
class FileNode:
    view: View
    image: int


@dataclass(frozen=True)
class StatsNode:
    pass


Node = Union[DirNode, FileNode, StatsNode]


class DirListing:
    """One source directory: subdirectories, files and, for ``readdir``, the
    files' sizes at every fidelity computed in one vectorized step.

    File names are kept as the raw bytes the kernel wants; the ``name -> image``
    map that path lookups need is built on the first lookup, so a bare walk
    (``os.walk``, ImageFolder) never pays for it."""

    __slots__ = ("subdirs", "raw_names", "images", "mtimes", "_lengths", "_sizes", "_files")

    def __init__(self, subdirs: dict[str, int], raw_names: list[bytes], images: np.ndarray,
                 lengths: Callable[[], np.ndarray], mtimes: np.ndarray) -> None:
        self.subdirs = subdirs
        self.raw_names = raw_names
        self.images = images          # image index of each file, in name order
        self.mtimes = mtimes          # int64[n_files]
        self._lengths = lengths       # () -> the files' group lengths, [n_files, G]
        self._sizes: np.ndarray | None = None
        self._files: dict[str, int] | None = None

    @property
    def sizes(self) -> np.ndarray:
        """int64[n_files, G]: size of the file in view scanK at [:, K-1] (computed on first use:
        a bare walk never asks; a racing second computation gives the same array)."""
        sizes = self._sizes
        if sizes is None:
            sizes = self._sizes = np.cumsum(np.asarray(self._lengths(), dtype=np.int64), axis=1) + len(EOI_BYTES)
        return sizes

    @property
    def names(self) -> list[str]:
        return [fmt.decode_path(raw) for raw in self.raw_names]

    @property
    def files(self) -> dict[str, int]:
        """name -> image index (built once, on first use; a racing second build is harmless)."""
        files = self._files
        if files is None:
            files = self._files = dict(zip(self.names, self.images.tolist()))
        return files


def split_names(blob: bytes, rel: list[int], prefix: bytes) -> list[bytes]:
    """The names of consecutive paths ``prefix + name`` stored back to back in ``blob``
    (path j is ``blob[rel[j]:rel[j+1]]``), all direct children of one directory.

    The fast way is one ``split`` at the prefix: names contain no ``/`` and the prefix
    contains one, so the leftmost match after a name is the next path's prefix (a match
    starting inside the name would need a ``/`` before the next path's first one). The
    slicing fallback covers the root directory (no prefix) and double-checks the count."""
    n = len(rel) - 1
    if prefix:
        names = blob.split(prefix)
        if len(names) == n + 1 and not names[0]:
            del names[0]
            return names
    p = len(prefix)
    return [blob[rel[j] + p:rel[j + 1]] for j in range(n)]


class ViewCounters:
    """Per-view counters for the stats: first reads and bytes served.

    A *first read* is a read at offset 0, which every whole-file read starts with:
    the mount answers no ``open`` (see :mod:`pcrfs.fuse.ops`), so files read are
    counted by their first bytes. Re-reads the kernel serves from its page cache
    never reach the daemon and are not counted."""

    def __init__(self, names: list[str]) -> None:
        self._lock = threading.Lock()
        self.first_reads = {n: 0 for n in names}
        self.served = {n: 0 for n in names}

    def serve(self, view: str, offset: int, n: int) -> None:
        with self._lock:
            self.served[view] += n
            if offset == 0:
                self.first_reads[view] += 1


class ViewTree:
    """Resolve, list, stat and read paths of the mounted tree."""

    def __init__(self, store: Store, listing_cache: int = 128) -> None:
        self.store = store
        n = store.num_groups
        self.views: dict[str, View] = {f"scan{k}": View(f"scan{k}", k) for k in range(1, n + 1)}
        if n:
            self.views[FULL_VIEW] = View(FULL_VIEW, n)
            self.views.update(adaptive_views(store))
        self._view_slot = {name: slot for slot, name in enumerate(self.views)}
        index = store.index
        self._dir_names = [index.dirs[d] for d in range(len(index.dirs))]
        self._dir_ids = {name: d for d, name in enumerate(self._dir_names)}
        self._ranges = [(int(a), int(b)) for a, b in index.dir_ranges]
        self._children: dict[int, list[int]] = {}
        for d, name in enumerate(self._dir_names):
            if name:
                parent = name.rsplit("/", 1)[0] if "/" in name else ""
                self._children.setdefault(self._dir_ids[parent], []).append(d)
        self._listings: OrderedDict[int, DirListing] = OrderedDict()
        self._listing_cap = listing_cache
        self._lock = threading.Lock()
        self.counters = ViewCounters(list(self.views))
        # directory path -> (its view, name -> image): file()'s memo, as large as the listing cache
        self._file_dirs: dict[str, tuple[View, dict[str, int]]] = {}
        self.mtime_ns = int(time.time_ns())
        self._per_view = 2 + len(self._dir_names) + store.num_images
        self.started = time.time()

    # ---- directory listings ----------------------------------------------------

    def file(self, path: str) -> tuple[int, int]:
        """``(image, k)`` of the file at ``path`` in a view (``scan5/c/x.jpg``, leading '/'
        optional): what the store reads for it -- the one lookup behind every door that names
        files by path (the mount's ``resolve`` is its slow path, the pcr:// filesystem calls
        it per read). Its directory and name, memoized per directory, not a walk of the path;
        FileNotFoundError / IsADirectoryError as :meth:`resolve` says."""
        head, _, name = path.strip("/").rpartition("/")
        known = self._file_dirs.get(head)
        if known is None:
            known = self._file_directory(head)
        image = known[1].get(name) if known is not None else None
        if image is None:  # not a plain path to a file: the full walk says what it is
            node = self.resolve("/" + path.strip("/"))
            if not isinstance(node, FileNode):
                raise IsADirectoryError(path)
            return node.image, node.view.k_of(node.image)
        return image, known[0].k_of(image)

    def _file_directory(self, path: str) -> tuple[View, dict[str, int]] | None:
        """The view and ``name -> image`` map of the view directory at ``path`` (None if not one)."""
        try:
            node = self.resolve("/" + path)
        except FileNotFoundError:
            return None
        if not isinstance(node, DirNode) or node.view is None or node.dir_id < 0:
            return None
        if len(self._file_dirs) >= self._listing_cap:
            self._file_dirs.clear()  # as many directories as the listing cache; then start over
        known = self._file_dirs[path] = (node.view, self.listing(node.dir_id).files)
        return known

    def listing(self, dir_id: int) -> DirListing:
        with self._lock:
            hit = self._listings.get(dir_id)
            if hit is not None:
                self._listings.move_to_end(dir_id)
                return hit
        listing = self._build_listing(dir_id)
        with self._lock:
            self._listings[dir_id] = listing
            while len(self._listings) > self._listing_cap:
                self._listings.popitem(last=False)
        return listing

    def _build_listing(self, dir_id: int) -> DirListing:
        name = self._dir_names[dir_id]
        subdirs = {}
        covered = []
        for child in self._children.get(dir_id, []):
            subdirs[self._dir_names[child].rsplit("/", 1)[-1]] = child
            covered.append(self._ranges[child])
        covered.sort()
        first, end = self._ranges[dir_id]
        # the directory's own files: its image range minus its subdirectories' ranges
        spans, pos = [], first
        for a, b in covered + [(end, end)]:
            if a > pos:
                spans.append((pos, a))
            pos = max(pos, b)
        prefix = fmt.encode_path(name) + b"/" if name else b""
        index = self.store.index
        names: list[bytes] = []
        for a, b in spans:
            # one slice of the path blob per span, split in C: no per-file numpy access
            offs = index.paths.offsets[a:b + 1]
            base = int(offs[0])
            names += split_names(index.paths.raw_span(base, int(offs[-1])), (offs - base).tolist(), prefix)
        if len(spans) == 1:  # the usual directory (files only, or files before or after its subdirectories)
            a, b = spans[0]
            images, rows = np.arange(a, b), slice(a, b)
        else:
            images = np.concatenate([np.arange(a, b) for a, b in spans]) if spans else np.zeros(0, np.int64)
            rows = images
        mtimes = np.asarray(index.images["src_mtime_ns"][rows], dtype=np.int64)
        return DirListing(subdirs, names, images, lambda: index.group_lengths[rows], mtimes)

    # ---- resolution ------------------------------------------------------------

    def resolve(self, path: str) -> Node:
        """The node at an absolute mount path; FileNotFoundError if none."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return DirNode(None, -1)
        if parts[0] == STATS_DIR:
            if len(parts) == 1:
                return DirNode(None, -2)
            if len(parts) == 2 and parts[1] == STATS_FILE:
                return StatsNode()
            raise FileNotFoundError(path)
        if parts[0] == ROOT_HINT_DIR and len(parts) == 1:
            return DirNode(None, -4)
        view = self.views.get(parts[0])
        if view is None:
            raise FileNotFoundError(path)
        dir_id = self._dir_ids.get("")
        if dir_id is None:  # empty store
            if len(parts) == 1:
                return DirNode(view, -3)
            raise FileNotFoundError(path)
        for depth, part in enumerate(parts[1:], start=1):
            listing = self.listing(dir_id)
            sub = listing.subdirs.get(part)
            if sub is not None:
                dir_id = sub
                continue
            image = listing.files.get(part)
            if image is not None and depth == len(parts) - 1:
                return FileNode(view, image)
            raise FileNotFoundError(path)
        return DirNode(view, dir_id)

    # ---- attributes --------------------------------------------------------------

    def _ino(self, view: View | None, offset: int) -> int:
        if view is None:
            return 1 + offset
        return 16 + self._view_slot[view.name] * self._per_view + offset

    def attr(self, node: Node) -> Attr:
        if isinstance(node, FileNode):
            s = self.store
            return Attr(FILE_MODE, s.size(node.image, node.view.k_of(node.image)), s.source_mtime_ns(node.image),
                        self._ino(node.view, 1 + len(self._dir_names) + node.image))
        if isinstance(node, StatsNode):
            return Attr(FILE_MODE, len(self.stats_bytes()), time.time_ns(), self._ino(None, 2))
        if node.view is None:  # the root, .pcrfs (the stats file is offset 2), the hint
            ino = self._ino(None, {-1: 0, -2: 1, -4: 3}[node.dir_id])
        else:
            ino = self._ino(node.view, max(node.dir_id, 0))
        return Attr(DIR_MODE, 0, self.mtime_ns, ino, nlink=2 + self._subdir_count(node))

    def _subdir_count(self, node: DirNode) -> int:
        """Subdirectories of a directory: a directory's link count is 2 + this (its own
        '.', its entry in the parent, and each child's '..'), and tools such as Perl's
        File::Find stop looking for subdirectories once they have seen that many."""
        if node.view is None:
            return len(self.views) + 2 if node.dir_id == -1 else 0  # the root: the views, .pcrfs, the hint
        if node.dir_id < 0:
            return 0  # the root of an empty store's view
        return len(self._children.get(node.dir_id, ()))

    def getattr(self, path: str) -> Attr:
        return self.attr(self.resolve(path))

    def readdir(self, path: str) -> DirEntries:
        """Entries of a directory with their attributes (one call serves `ls -l`)."""
        node = self.resolve(path)
        if not isinstance(node, DirNode):
            raise NotADirectoryError(path)
        out = DirEntries()
        if node.view is None and node.dir_id == -1:
            for name, v in self.views.items():
                out.add(name, self.attr(DirNode(v, max(self._dir_ids.get("", 0), 0))))
            out.add(STATS_DIR, self.attr(DirNode(None, -2)))
            out.add(ROOT_HINT_DIR, self.attr(DirNode(None, -4)))
            return out
        if node.view is None:
            if node.dir_id == -2:
                out.add(STATS_FILE, self.attr(StatsNode()))
            return out
        if node.dir_id < 0:
            return out
        listing = self.listing(node.dir_id)
        view = node.view
        self.store.note_listed(node.dir_id)  # a walk of every class says an epoch starts
        for name, d in listing.subdirs.items():
            out.add(name, self.attr(DirNode(view, d)))
        base = self._ino(view, 1 + len(self._dir_names))
        out.set_files(listing.raw_names, functools.partial(view.sizes, listing), listing.mtimes, listing.images + base)
        return out

    # ---- reading -----------------------------------------------------------------

    def read(self, node: FileNode | StatsNode, offset: int, size: int) -> bytes:
        if isinstance(node, StatsNode):
            return self.stats_bytes()[offset:offset + size]
        data = self.store.read_at(node.image, node.view.k_of(node.image), offset, size)
        self.counters.serve(node.view.name, offset, len(data))
        return data

    # ---- stats -----------------------------------------------------------------------

    def stats(self) -> dict:
        rec = self.store.records
        cache = self.store.cache
        return {
            "store": str(self.store.root),
            "uptime_s": round(time.time() - self.started, 3),
            "views": {name: {"first_reads": self.counters.first_reads[name],
                             "bytes_served": self.counters.served[name]}
                      for name in self.views},
            "store_reads": {"requests": rec.requests, "bytes": rec.bytes_read},
            "cache": {"capacity": cache.capacity if cache is not None else 0, "bytes": cache.nbytes if cache is not None else 0,
                      "hits": cache.hits if cache is not None else 0, "misses": cache.misses if cache is not None else 0},
            "listings_cached": len(self._listings),
            "io": self.store.io_stats(),
        }

    def stats_bytes(self) -> bytes:
        return (json.dumps(self.stats(), indent=1) + "\n").encode()


def adaptive_views(store: Store) -> dict[str, View]:
    """The ``ssimNN`` views of a store with an adaptive index (none otherwise).

    The index is optional: if it is damaged or stale the mount goes on without
    these views and says why in its log.
    """
    try:
        index = load_adaptive_index(store)
    except AdaptiveIndexError as e:
        log.warning("no adaptive views: %s", e)
        return {}
    if index is None:
        return {}
    n = store.num_groups
    return {name: View(name, n, index.column(name, n)) for name in index.views}
