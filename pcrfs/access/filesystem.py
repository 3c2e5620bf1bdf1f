"""The store as an fsspec filesystem (protocol ``pcr``): the mount's tree without FUSE.

    fs = fsspec.filesystem("pcr", fo="/data/train.pcr")
    fs.ls("")                            # the views: scan1 .. scanN, full, ssimNN
    fs.cat_file("scan3/n01440764/x.JPEG")
    fsspec.open("pcr://scan3/n01440764/x.JPEG::s3://bucket/train.pcr", s3={"endpoint_url": ...})

Paths are the mount's paths without the mount point: ``<view>/<path in the store>``;
every file's bytes, size and mtime are the mount's (this adapts the same
:class:`~pcrfs.access.views.ViewTree` the FUSE layer adapts). The mount's ``.pcrfs/stats``
file is not shown: it reports on a mount daemon. Like fsspec's zip and tar
filesystems, the store is named by ``fo`` plus ``target_protocol``/``target_options``
(which chained URLs fill in). Everything is read-only: a write, delete, copy or
mkdir raises :class:`ReadOnlyError` (a PermissionError with errno EROFS).

The package's entry point (``fsspec.specs``) registers the protocol once pcrfs is
installed; :func:`register` does it by hand.
"""
from __future__ import annotations

import errno
import os
from datetime import datetime, timezone
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .. import access
from . import open_with_options
from ..store.read.reader import Store
from .views import ROOT_HINT_DIR, STATS_DIR, DirNode, Node, ViewTree

PROTOCOL = "pcr"
_LOCAL_PROTOCOLS = (None, "", "file", "local")


class ReadOnlyError(PermissionError):
    """A write to a pcr filesystem (stores are immutable)."""

    def __init__(self, what: str, path: str) -> None:
        super().__init__(errno.EROFS, f"pcr:// is read-only (a PCR store is immutable): cannot {what}", path)


def store_location(fo: str | os.PathLike, target_protocol: str | None) -> str:
    """The store's path or URL from ``fo`` and ``target_protocol`` (as a chained URL hands them over:
    ``pcr://...::s3://bucket/train.pcr`` gives ``fo="bucket/train.pcr", target_protocol="s3"``)."""
    text = os.fspath(fo)
    if target_protocol in _LOCAL_PROTOCOLS:
        return text[len("file://"):] if text.startswith("file://") else text
    if "://" in text:
        return text
    return f"{target_protocol}://{text}"


class PCRFileSystem(AbstractFileSystem):
    """A PCR store's views as a read-only fsspec filesystem."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, fo: str | os.PathLike = "", target_protocol: str | None = None,
                 target_options: dict | None = None, **kwargs: Any) -> None:
        super().__init__(fo=fo, target_protocol=target_protocol, target_options=target_options, **kwargs)
        if not os.fspath(fo):
            raise ValueError("pcr:// needs the store: fsspec.filesystem('pcr', fo='/path/to/store.pcr') "
                             "or a chained URL pcr://VIEW/PATH::s3://bucket/store.pcr")
        self.location = store_location(fo, target_protocol)
        self.target_options = dict(target_options or {})
        self._store: Store | None = None
        self._forks = -1
        self._view_tree()  # fail now, with the store's own message, not at the first read

    def _view_tree(self) -> ViewTree:
        if self._store is None or self._forks != access.forks:
            # a store inherited through fork keeps the parent's descriptors and threads: open our own
            self._store = open_with_options(self.location, self.target_options)
            self._forks = access.forks
            self._tree = ViewTree(self._store)
        return self._tree

    @property
    def store(self) -> Store:
        self._view_tree()
        return self._store

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        if not isinstance(path, str):
            return super()._strip_protocol(path).strip("/")
        if path.startswith("pcr://"):
            path = path[6:]
        elif path.startswith("pcr::"):
            path = path[5:]
        return path.strip("/")

    # ---- the tree --------------------------------------------------------------------

    def _resolve(self, path: str) -> tuple[ViewTree, Node]:
        tree = self._view_tree()
        path = self._strip_protocol(path)
        top = path.split("/", 1)[0]
        if top in (STATS_DIR, ROOT_HINT_DIR):
            raise FileNotFoundError(path)
        if top and top not in tree.views:  # say which views there are (scan11 of 10 groups, no ssim95 ...)
            try:
                access.find_view(tree.views, top, tree.store)
            except access.StoreError as e:
                raise FileNotFoundError(errno.ENOENT, str(e), path) from None
        return tree, tree.resolve("/" + path)

    def _file(self, path: str) -> tuple[int, int]:
        """``(image, k)`` of the file at ``path``: what the store reads (``ViewTree.file``)."""
        # This runs per read: the common case skips fsspec's general path cleaning.
        tree = self._view_tree()
        if not isinstance(path, str):
            path = self._strip_protocol(path)
        elif path.startswith("pcr://"):
            path = path[6:]
        try:
            return tree.file(path)
        except FileNotFoundError:
            self._resolve(path)  # says which views there are, or what is missing
            raise

    def info(self, path: str, **kwargs: Any) -> dict:
        tree, node = self._resolve(path)
        a = tree.attr(node)
        return {"name": self._strip_protocol(path), "size": a.size,
                "type": "directory" if a.is_dir else "file", "mtime": a.mtime_ns / 1e9}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list:
        path = self._strip_protocol(path)
        tree, node = self._resolve(path)
        if not isinstance(node, DirNode):
            return [self.info(path)] if detail else [path]
        prefix = f"{path}/" if path else ""
        out = []
        for name, a in tree.readdir("/" + path):
            if not path and name in (STATS_DIR, ROOT_HINT_DIR):
                continue
            if detail:
                out.append({"name": prefix + name, "size": a.size,
                            "type": "directory" if a.is_dir else "file", "mtime": a.mtime_ns / 1e9})
            else:
                out.append(prefix + name)
        return out

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], tz=timezone.utc)

    # ---- reading ---------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        i, k = self._file(path)
        store = self._store
        if start is None and end is None:
            return store.read(i, k)
        size = store.size(i, k)
        start, end = _clip(start, end, size)
        return store.read_at(i, k, start, end - start) if end > start else b""

    def _open(self, path: str, mode: str = "rb", block_size: int | str | None = None, autocommit: bool = True,
              cache_options: dict | None = None, **kwargs: Any) -> "PCRFile":
        if mode != "rb":
            raise ReadOnlyError(f"open for {mode!r}", path)
        i, k = self._file(path)
        return PCRFile(self, self._strip_protocol(path), i, k, self._store.size(i, k), block_size=block_size,
                       cache_options=cache_options, **kwargs)

    # ---- refusals: every way fsspec writes -------------------------------------------------

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        raise ReadOnlyError("mkdir", path)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        raise ReadOnlyError("makedirs", path)

    def rmdir(self, path: str) -> None:
        raise ReadOnlyError("rmdir", path)

    def rm_file(self, path: str) -> None:
        raise ReadOnlyError("remove", path)

    def _rm(self, path: str) -> None:
        raise ReadOnlyError("remove", path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        raise ReadOnlyError("remove", str(path))

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        raise ReadOnlyError("touch", path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        raise ReadOnlyError("write", path)

    def put_file(self, lpath: str, rpath: str, callback: Any = None, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        raise ReadOnlyError("put a file", rpath)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        raise ReadOnlyError("copy into the store", path2)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> None:
        raise ReadOnlyError("move", str(path1))

    def setxattr(self, path: str, attr: str, value: Any) -> None:
        raise ReadOnlyError("set attributes", path)


class PCRFile(AbstractBufferedFile):
    """A file of a view, read in ranges (each range reads only the scan groups it overlaps)."""

    def __init__(self, fs: PCRFileSystem, path: str, image: int, k: int, size: int, **kwargs: Any) -> None:
        self.image, self.k = image, k
        super().__init__(fs, path, mode="rb", size=size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        start, end = _clip(start, end, self.size)
        if end <= start:
            return b""
        return self.fs.store.read_at(self.image, self.k, start, end - start)


def _clip(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec's start/end (None, negative = from the end) as offsets within ``size``."""
    start = 0 if start is None else (max(size + start, 0) if start < 0 else min(start, size))
    end = size if end is None else (max(size + end, 0) if end < 0 else min(end, size))
    return start, end


def register() -> None:
    """Register ``pcr://`` with fsspec in this process (the installed entry point does it for good)."""
    import fsspec

    fsspec.register_implementation(PROTOCOL, PCRFileSystem, clobber=True)
