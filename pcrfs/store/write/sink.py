"""Where a conversion's records go: a local store directory or an object-store prefix.

A :class:`RecordSink` is the one way a record reaches a store, whoever writes it: the
:class:`~pcrfs.store.write.writer.StoreWriter` of a local conversion and a Dask task on a
worker (:mod:`pcrfs.convert.dask`) alike. :meth:`~RecordSink.put` is atomic either way:
on a filesystem through a temporary name unique to the attempt, fsync and rename (two
attempts of one Dask task, even on two machines, each rename a whole record); at an
object store as one PUT (an object appears whole or not at all; s3fs makes large ones
multipart), retried by the store's :class:`~pcrfs.remote.retry.RetryPolicy`.

The writer keeps its resume state, index, report and manifest in a local working
directory: the store itself for a local sink, a staging directory for an object store,
whose :meth:`~RecordSink.publish` then uploads each file once it is final there (the
manifest last, so a half-written remote store is never taken as complete).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterable

from ...fsutil import write_atomic
from ...remote.fs import RemoteError, RemoteOptions, explain, is_url
from ...remote.objectprefix import ObjectPrefix
from .. import format as fmt
from ..sources.location import _digest, default_cache_dir

Data = bytes | Iterable[bytes | memoryview]  # a record's chunks are written in order, never joined locally


class RecordSink(ABC):
    """The store being written: names are relative to it (``records/00000.pcr``)."""

    url: str  # for messages

    @abstractmethod
    def put(self, name: str, data: Data) -> None:
        """Store ``data`` at ``name`` atomically: the old object or the whole new one, never a torn one."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The size of ``name``, or None if it is not there."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """True if ``name`` (a file, or a directory/prefix such as ``records``) is there."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete ``name`` if it is there."""

    @abstractmethod
    def publish(self, name: str, local: Path) -> None:
        """Make the finished local file ``local`` the store's ``name`` (index, report, manifest)."""

    def where(self, name: str) -> str:
        """``name`` as a user finds it (for messages)."""
        return f"{self.url}/{name}"

    def staging_dir(self, cache_dir: Path | None = None) -> Path | None:
        """The local directory where a writer keeps its resume state, index, report and
        manifest until :meth:`publish` (``cache_dir``: the cache to put it in, default
        :func:`~pcrfs.store.sources.location.default_cache_dir`), or None where the writer works
        in the store itself (a local directory)."""
        return None

    def record_ids(self) -> list[int]:
        """The ids of the record files there, sorted."""
        return sorted(int(stem) for stem in (n.split(".")[0] for n in self._record_names()) if stem.isdigit())

    @abstractmethod
    def _record_names(self) -> list[str]:
        """The names of the files under ``records/``."""


class LocalSink(RecordSink):
    """A store directory on a filesystem (shared with the workers on a cluster).

    ``fsync`` makes each record durable before its rename; tools/bench_convert.py passes a
    timed one to tell the disk's share of writing a record from the rest."""

    def __init__(self, root: str | os.PathLike, fsync: Callable[[int], None] = os.fsync) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.fsync = fsync

    def put(self, name: str, data: Data) -> None:
        # a temporary name unique to the attempt: a retried or duplicated attempt (possibly on
        # another machine) never writes into this one's file, and each renames a whole record
        write_atomic(self.root / name, data, unique_tmp=True, fsync=self.fsync)

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def publish(self, name: str, local: Path) -> None:
        if Path(local) != self.root / name:  # the writer works in the store itself: nothing to do then
            with open(local, "rb") as f:
                self.put(name, iter(lambda: f.read(1 << 20), b""))

    def where(self, name: str) -> str:
        return str(self.root / name)

    def _record_names(self) -> list[str]:
        try:
            return os.listdir(self.root / fmt.RECORDS_DIR)
        except FileNotFoundError:
            return []


class ObjectSink(ObjectPrefix, RecordSink):
    """A store at an object-store URL; every call retried, failures a RemoteError."""

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions()) -> None:
        super().__init__(url, options)
        self.bucket = self.base.split("/", 1)[0]

    def staging_dir(self, cache_dir: Path | None = None) -> Path | None:
        # an object store has no directory to work in, nor rename to make a file final
        return staging_path(self.url, cache_dir)

    def put(self, name: str, data: Data) -> None:
        body = data if isinstance(data, bytes) else b"".join(data)
        self._call(lambda: self.fs.pipe_file(self._path(name), body), f"PUT {self.url}/{name}")

    def size(self, name: str) -> int | None:
        def info() -> int | None:
            try:
                return int(self.fs.size(self._path(name)))
            except FileNotFoundError:
                return None
        return self._call(info, f"HEAD {self.url}/{name}")

    def exists(self, name: str) -> bool:
        return bool(self._call(lambda: self.fs.exists(self._path(name)), f"HEAD {self.url}/{name}"))

    def remove(self, name: str) -> None:
        self._call(lambda: self.fs.rm(self._path(name)), f"DELETE {self.url}/{name}")

    def publish(self, name: str, local: Path) -> None:
        # put_file, not put: s3fs uploads a large file (an index) in parts from disk
        self._call(lambda: self.fs.put_file(str(local), self._path(name)), f"PUT {self.url}/{name}")

    def _record_names(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for p in self._list(fmt.RECORDS_DIR)]

    def _list(self, name: str | None = None) -> list[str]:
        def listing() -> list:
            try:
                return self.fs.ls(self._path(name) if name else self.base, detail=False)
            except FileNotFoundError:
                return []
        return self._call(listing, f"LIST {self.where(name) if name else self.url}")

    # ---- before a conversion starts (``convert``'s checks) ----

    def check(self) -> None:
        """RemoteError now, before any work, if the bucket is missing or unusable."""
        try:
            self.retry.call(lambda: self.fs.ls(self.bucket), what=f"LIST {self.bucket}")
        except FileNotFoundError:  # listing the bucket itself: only the bucket can be missing
            raise RemoteError(explain(FileNotFoundError("no such bucket"), self.url, self.options)) from None
        except Exception as e:  # noqa: BLE001
            raise RemoteError(explain(e, self.url, self.options)) from None

    def is_empty(self) -> bool:
        return not self._list()

    def remove_store(self) -> None:
        """Delete every object under the prefix (``--overwrite``), never the bucket itself."""
        def rm() -> None:
            try:
                paths = self.fs.find(self.base)
            except FileNotFoundError:
                return
            if paths:
                self.fs.rm(paths)
        self._call(rm, f"DELETE {self.url}")


def staging_path(url: str, cache_dir: Path | None = None) -> Path:
    """The local working directory of a conversion to ``url`` (one per store URL)."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / "staging" / _digest(url.rstrip("/"))


def open_sink(store: str | os.PathLike, options: RemoteOptions = RemoteOptions()) -> RecordSink:
    """The sink for a store path or URL."""
    text = os.fspath(store)
    return ObjectSink(text, options) if is_url(text) else LocalSink(text)

