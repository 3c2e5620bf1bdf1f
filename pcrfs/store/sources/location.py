"""Where a store lives: a local directory or an fsspec URL (``s3://bucket/prefix``).

A :class:`StoreLocation` gives the reader three things: the manifest's bytes, a
local directory holding the (verified) index files, and a record source. For a
remote store the index files are downloaded once into a local cache directory,
checked against the manifest's sizes and CRC-32s, and then memory-mapped like a
local index; only record bytes travel on every read. It also says how its records
are best read when the caller leaves it open (:class:`ReadDefaults`), how to name a
file of it in a message, how to keep other writers out while a small file changes,
and whether worker processes may reopen it. The functions at the end answer the
questions asked of a location the user wrote before anything is opened (is it a
store, where may work on it be kept, how is it named from another directory): the
rest of pcrfs never asks which kind of location it has.

The writing side is :mod:`pcrfs.store.write.sink`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ...fsutil import fsync_dir, write_atomic
from ...imagenames import looks_like_image_tree
from ...remote import deadline as deadlines
from ...remote.bwlimit import TokenBucket
from ...remote.fs import RemoteError, RemoteOptions, explain, is_url
from ...remote.objectprefix import ObjectPrefix
from .. import format as fmt
from .backends import LocalRecords, RecordSource, remote_records
from ..errors import StoreError
from ..format.files import NotRegularFile, kind_of, read_capped
from ..format.index import size_limits
from ..format.manifest import MANIFEST_MAX_BYTES, parse_manifest

DEFAULT_READAHEAD = 16 << 20  # bytes per readahead window (remote stores)


@dataclass(frozen=True)
class ReadDefaults:
    """How a location's records are best read, where the read options leave it open."""
    readahead_bytes: int = 0     # readahead window budget (0: off)
    record_prefix: bool = False  # fetch whole record prefixes (pcrfs.store.read.prefixpolicy)
    # Fetch all of an image's groups 1..k on its first read, not only those a read overlaps:
    # where each request pays a round trip, k concurrent requests beat k sequential ones.
    whole_image: bool = False
    # Reads may bypass the fetcher -- a pread and a CRC per group -- when nothing else
    # (readahead, disk cache, rate limit) is asked for: local files, where the fetcher's
    # futures and span merging cost several times the read itself (pcrfs.store.read.reader)
    direct: bool = False


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pcrfs`` or ``~/.cache/pcrfs``: downloaded indexes, conversion staging."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pcrfs"


def _digest(*parts: bytes | str, n: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogateescape") if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:n]


class StoreLocation(ABC):
    url: str             # as the user wrote it (for messages and stats)
    root: Path | str     # a local Path, or the URL of a remote store
    read_defaults: ReadDefaults = ReadDefaults()

    def describe(self, name: str) -> str:
        """``name`` (relative to the store) as a message should show it."""
        return f"{self.url}/{name}"

    def writer_lock(self) -> contextlib.AbstractContextManager:
        """Held while a small file beside the index changes (the adaptive index): keeps other
        writers of this store out where the location can (see :class:`LocalLocation`)."""
        return contextlib.nullcontext()

    @abstractmethod
    def manifest_bytes(self) -> bytes:
        """The manifest's bytes; StoreError with a clear message if there is none."""

    @abstractmethod
    def index_dir(self, manifest: dict, manifest_bytes: bytes) -> tuple[Path, bool]:
        """A local directory with the index files, and whether they were already checked
        against the manifest (True) or still need checking (False)."""

    @abstractmethod
    def records(self, record_sizes: np.ndarray, bwlimit: TokenBucket | None = None) -> RecordSource: ...

    # Small files beside the index (the optional adaptive index), read and written whole.

    @abstractmethod
    def read_file(self, name: str, max_bytes: int = MANIFEST_MAX_BYTES) -> bytes:
        """The bytes of ``name`` (relative to the store); StoreError if it cannot be read,
        is not a regular file, or holds more than ``max_bytes``."""

    @abstractmethod
    def write_file(self, name: str, data: bytes) -> None:
        """Replace ``name`` atomically: a reader sees the old bytes or all the new ones."""

    @abstractmethod
    def remove_file(self, name: str) -> None:
        """Delete ``name`` if it exists."""

    def identity(self, manifest_bytes: bytes) -> str:
        """A short name for this store's content (caches of different stores never mix)."""
        return _digest(self.url, manifest_bytes)

    def workers_can_reopen(self) -> bool:
        """True if worker processes (the quality table's and index's process pools) may each
        open this store again from ``str(root)``. Not a store at a URL: a worker would need
        the caller's remote options (endpoint, retries) and a client and index cache check
        of its own, so such a store is scored in the calling process."""
        return False


class LocalLocation(StoreLocation):
    # the page cache makes a pread cheap: no readahead, no prefixes, only the groups asked for
    read_defaults = ReadDefaults(direct=True)

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def describe(self, name: str) -> str:
        return str(self.root / name)

    def workers_can_reopen(self) -> bool:
        # a path opens in a forked worker at the cost of reading the index: worth it for
        # the CPU-bound scoring that the pools parallelize
        return True

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """``flock`` on the store's directory, as ``convert`` takes it: a second writer waits."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def manifest_bytes(self) -> bytes:
        path = self.root / fmt.MANIFEST
        if not path.exists():
            if (self.root / fmt.PARTIAL_DIR).exists():
                raise StoreError(f"{self.root} is an unfinished conversion (no {fmt.MANIFEST}); "
                                 "run the same `pcrfs convert` again to resume it")
            if not self.root.exists():
                raise StoreError(f"{self.root}: no such store")
            example = looks_like_image_tree(self.root) if self.root.is_dir() else None
            if example is not None:
                raise StoreError(f"{self.root} is an image tree (it holds {example}), not a PCR store (no "
                                 f"{fmt.MANIFEST}); convert it first: pcrfs convert {self.root} STORE")
            raise StoreError(f"{self.root} is not a PCR store (no {fmt.MANIFEST})")
        try:
            return read_capped(path, MANIFEST_MAX_BYTES)
        except OSError as e:  # NotRegularFile (symlink, FIFO, device, too big) included
            raise StoreError(f"{path}: {e.strerror}") from None

    def index_dir(self, manifest: dict, manifest_bytes: bytes) -> tuple[Path, bool]:
        return self._own_directory(fmt.INDEX_DIR), False

    def records(self, record_sizes: np.ndarray, bwlimit: TokenBucket | None = None) -> RecordSource:
        self._own_directory(fmt.RECORDS_DIR)
        self._check_record_files(len(record_sizes))
        return LocalRecords(self.root, record_sizes, bwlimit)

    def _own_directory(self, name: str) -> Path:
        """``root/name``, refused (StoreError) if it is a symlink or anything but a directory:
        a symlinked index/ or records/ would serve files from outside the store, which the
        checks of the files inside (no symlinks, FIFOs, devices) cannot see. A missing one
        is left to the reads that need it (a missing index file, a missing record)."""
        path = self.root / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path
        except OSError as e:
            raise StoreError(f"{path} cannot be examined: {e.strerror}") from None
        if stat.S_ISLNK(mode):
            raise StoreError(f"{path} is a symlink; a store serves only its own files (symlinks are refused): "
                             f"put the {name} directory itself there, or bind-mount it")
        if not stat.S_ISDIR(mode):
            kind = "a regular file" if stat.S_ISREG(mode) else kind_of(mode)
            raise StoreError(f"{path} is {kind}, not a directory; this store is damaged")
        return path

    def _check_record_files(self, count: int) -> None:
        """Refuse the store if a record file is a symlink, FIFO, device or directory: one
        listing of records/ (the types come with it), no file opened. A missing record is
        not refused here: it is an I/O error for its own images only. Each record is
        checked again whenever it is opened (:class:`LocalRecords`), after this."""
        directory = self.root / fmt.RECORDS_DIR
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"{directory} cannot be listed: {e.strerror}") from None
        for entry in entries:
            stem, dot, suffix = entry.name.partition(".")
            if not (stem.isdigit() and int(stem) < count and dot + suffix == fmt.RECORD_SUFFIX):
                continue
            try:
                if entry.is_file(follow_symlinks=False):  # the listing's d_type: no system call
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as e:
                raise StoreError(f"record file {entry.path} cannot be examined: {e.strerror}") from None
            if not stat.S_ISREG(mode):
                raise StoreError(f"record file {entry.path} is {kind_of(mode)}; a store serves only its own "
                                 "regular files")

    def read_file(self, name: str, max_bytes: int = MANIFEST_MAX_BYTES) -> bytes:
        try:
            return read_capped(self.root / name, max_bytes)
        except NotRegularFile as e:
            raise StoreError(e.strerror) from None
        except OSError as e:
            raise StoreError(f"{self.root / name} cannot be read: {e.strerror}") from None

    def write_file(self, name: str, data: bytes) -> None:
        path = self.root / name
        write_atomic(path, data)
        fsync_dir(path.parent)

    def remove_file(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class RemoteLocation(ObjectPrefix, StoreLocation):
    """A store at an fsspec URL; index files cached under ``cache_dir``.

    Every request costs a round trip, so reads default to readahead, record prefixes
    and whole-image fetches. Concurrent writers of the adaptive index are not locked
    out (:meth:`StoreLocation.writer_lock`): each PUT is atomic, the last one wins."""

    read_defaults = ReadDefaults(readahead_bytes=DEFAULT_READAHEAD, record_prefix=True, whole_image=True)

    error = StoreError                    # a failed call is a StoreError with a readable message
    passthrough = (FileNotFoundError,)    # a missing object is for the caller to explain

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions(), cache_dir: Path | None = None) -> None:
        super().__init__(url, options)
        self.root = self.url
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def manifest_bytes(self) -> bytes:
        # the store's first request says whether the endpoint answers at all: within the read
        # deadline, all retries included (an endpoint that accepts connections and never
        # answers took attempts x read timeout, 2.5 minutes, before this)
        with deadlines.scope(self.options.read_deadline):
            return self._manifest_bytes()

    def _manifest_bytes(self) -> bytes:
        try:
            data = self._call(lambda: self.fs.cat_file(self._path(fmt.MANIFEST), start=0, end=MANIFEST_MAX_BYTES + 1),
                              f"GET {self.url}/{fmt.MANIFEST}")
            if len(data) > MANIFEST_MAX_BYTES:
                raise StoreError(f"{self.url}/{fmt.MANIFEST} holds more than a manifest can "
                                 f"({MANIFEST_MAX_BYTES} bytes)")
            return data
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise StoreError(explain(e, self.url, self.options)) from None
        try:
            has_records = bool(self._call(lambda: self.fs.exists(self._path(fmt.RECORDS_DIR)), f"LIST {self.url}"))
        except FileNotFoundError as e:
            raise StoreError(explain(e, self.url, self.options)) from None
        if has_records:
            raise StoreError(f"{self.url} is an unfinished conversion (no {fmt.MANIFEST}); run the same "
                             "`pcrfs convert` again to resume it")
        raise StoreError(f"{self.url}: no such store (no {fmt.MANIFEST})")

    def index_dir(self, manifest: dict, manifest_bytes: bytes) -> tuple[Path, bool]:
        directory = self.cache_dir / "index" / self.identity(manifest_bytes)
        directory.mkdir(parents=True, exist_ok=True)
        checks = manifest["index_files"]
        names = fmt.index_files(manifest["format_version"])
        for name in names:
            if name not in checks:
                raise StoreError(f"{self.url}/{fmt.MANIFEST} has no checksum for index file {name}")
        # sizes the manifest's counts allow, checked before anything is downloaded
        limits = size_limits(manifest["num_images"], manifest["num_groups"], manifest["num_records"],
                             {name: checks[name]["size"] for name in names})
        for name in names:
            if checks[name]["size"] > limits[name]:
                raise StoreError(f"{self.url}/{fmt.MANIFEST} gives index file {name} {checks[name]['size']} bytes, "
                                 f"more than a store of its counts can need ({limits[name]})")
        for name in names:
            want = checks[name]
            local = directory / name
            if _matches(local, want):
                continue
            try:
                data = self._call(lambda: self.fs.cat_file(self._path(f"{fmt.INDEX_DIR}/{name}")),
                                  f"GET {self.url}/{fmt.INDEX_DIR}/{name}")
            except FileNotFoundError:
                raise StoreError(f"index file missing: {self.url}/{fmt.INDEX_DIR}/{name}") from None
            if len(data) != want["size"]:
                raise StoreError(f"index file {self.url}/{fmt.INDEX_DIR}/{name} is {len(data)} bytes, "
                                 f"manifest says {want['size']}")
            if zlib.crc32(data) != want["crc32"]:
                raise StoreError(f"index file {self.url}/{fmt.INDEX_DIR}/{name} is damaged (CRC-32 mismatch)")
            tmp = local.with_name(f"{name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, local)
        return directory, True

    def records(self, record_sizes: np.ndarray, bwlimit: TokenBucket | None = None) -> RecordSource:
        return remote_records(self.fs, self.base, self.url, self.options, bwlimit)

    def read_file(self, name: str, max_bytes: int = MANIFEST_MAX_BYTES) -> bytes:
        try:
            # a ranged GET: one byte past the cap tells "too big" without fetching it all
            data = self._call(lambda: self.fs.cat_file(self._path(name), start=0, end=max_bytes + 1),
                              f"GET {self.url}/{name}")
        except FileNotFoundError:
            raise StoreError(f"{self.url}/{name} does not exist") from None
        if len(data) > max_bytes:
            raise StoreError(f"{self.url}/{name} holds more than the {max_bytes} bytes it may hold")
        return data

    def write_file(self, name: str, data: bytes) -> None:
        # one PUT: an object store shows the old object or the whole new one
        self._call(lambda: self.fs.pipe_file(self._path(name), data), f"PUT {self.url}/{name}")

    def remove_file(self, name: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass
        self._call(rm, f"DELETE {self.url}/{name}")


def _matches(path: Path, want: dict) -> bool:
    """True if ``path`` exists with the manifest's size and CRC-32."""
    try:
        if path.stat().st_size != want["size"]:
            return False
    except OSError:
        return False
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc == want["crc32"]


def open_location(location: str | os.PathLike, options: RemoteOptions = RemoteOptions(),
                  cache_dir: Path | None = None) -> StoreLocation:
    """The location for a path or URL (``file://`` URLs are local paths)."""
    text = os.fspath(location)
    if is_url(text):
        try:
            return RemoteLocation(text, options, cache_dir)
        except RemoteError as e:
            raise StoreError(str(e)) from None
    if text.startswith("file://"):
        text = text[len("file://"):]
    return LocalLocation(text)


# ---- questions about a location as the user wrote it, answered without opening it ------------
# Whether a string names a local directory or a URL is decided here (and in
# pcrfs.store.write.sink for writers); callers ask for what they need instead.

def names_a_store(location: str | os.PathLike) -> bool:
    """True if ``location`` is to be read as a store, not as an image tree: a URL (only
    stores live at URLs) or a directory holding a manifest."""
    text = os.fspath(location)
    return is_url(text) or os.path.exists(os.path.join(text, fmt.MANIFEST))


def local_directory(location: str | os.PathLike) -> Path | None:
    """The directory on this machine a store at ``location`` is (the path as given), or
    None for a URL: checks that look at files (a store overlapping its source, an image
    tree given as the store) have nothing to look at then."""
    text = os.fspath(location)
    return None if is_url(text) else Path(text)


def image_tree_example(location: str | os.PathLike) -> str | None:
    """An image file in ``location`` (see :func:`~pcrfs.imagenames.looks_like_image_tree`)
    if it is an existing local directory without a manifest that holds images: an image
    tree where a store was expected. None otherwise (a URL, a store, nothing there)."""
    text = os.fspath(location)  # os.path on the text: "" is no directory (Path("") would be ".")
    if is_url(text) or not os.path.isdir(text) or os.path.exists(os.path.join(text, fmt.MANIFEST)):
        return None
    return looks_like_image_tree(text)


def absolute_location(location: str | os.PathLike, make_absolute: Callable[[str], str] = os.path.abspath) -> str:
    """``location`` as a process in another working directory (a Dask worker) finds the
    same store: a local path through ``make_absolute``, a URL as it is."""
    text = os.fspath(location)
    return text if is_url(text) else make_absolute(text)


def canonical_location(location: str | os.PathLike, make_absolute: Callable[[str], str] = os.path.abspath) -> str:
    """Like :func:`absolute_location`, with a URL named as its location names itself (no
    trailing slash): the one name a mount is recorded and reported under."""
    text = absolute_location(location, make_absolute)
    return text.rstrip("/") if is_url(text) else text


def join_location(location: str | os.PathLike, name: str) -> str:
    """The file ``name`` of the store at ``location``, as a user finds it (``report.json``)."""
    text = os.fspath(location)
    return f"{text.rstrip('/')}/{name}" if is_url(text) else str(Path(text) / name)


def local_work_dir(location: str | os.PathLike, name: str, cache_area: str) -> Path:
    """A directory on this machine for work on the store at ``location`` that must survive
    an interruption (the quality build's scored parts): ``name`` inside a local store;
    for a store at a URL, which has no directory of its own here, one per URL under
    ``cache_area`` in :func:`default_cache_dir` (the digest is part of where earlier runs'
    work is found: changing it would lose their parts)."""
    text = os.fspath(location)
    if not is_url(text):
        return Path(text) / name
    key = hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:16]
    return default_cache_dir() / cache_area / key


def read_manifest(root: Path) -> dict:
    """The manifest of the local store at ``root``."""
    return parse_manifest(LocalLocation(root).manifest_bytes(), str(Path(root) / fmt.MANIFEST))
