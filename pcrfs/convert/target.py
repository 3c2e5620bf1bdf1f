"""The store a conversion writes: chosen from the path or URL, locked against a second
conversion, checked (never clobber a finished store; ``--overwrite`` empties one) and
handed to a :class:`~pcrfs.store.write.writer.StoreWriter`.

The sink (:func:`~pcrfs.store.write.sink.open_sink`) says where the writer works: in a local
store itself, or, for a store at a URL, in a local staging directory (under
``~/.cache/pcrfs/staging`` by default) whose resume state, index, report and manifest
wait there until the sink uploads them.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from ..fsutil import LockHeld, lock_exclusive
from ..remote.fs import RemoteOptions
from ..store import format as fmt
from ..store.sources.location import local_directory
from ..store.write.sink import LocalSink, RecordSink, open_sink, staging_path  # noqa: F401 (staging_path: re-exported)
from ..store.write.writer import StoreWriter
from .plan import refuse_overlap, refuse_swapped


class StoreExists(RuntimeError):
    pass


class StoreBusy(StoreExists):
    """Another conversion holds the store's lock."""


class FinishedButNotCleaned(Exception):
    """The manifest (written last) is there but the resume state is not yet removed:
    the conversion was complete when it was interrupted."""


def check_arguments(src: Path, store: Path | str) -> None:
    """ValueError if a local ``store`` overlaps the source ``src``, or if the arguments look
    swapped (``src`` a store or a mount, ``store`` an image tree). Nothing is read or written."""
    directory = local_directory(store)
    if directory is None:  # a URL: nothing here can overlap it, nor be an image tree given as it
        refuse_swapped(src, None)
    else:
        refuse_overlap(src, directory)
        refuse_swapped(src, directory)


@dataclass(frozen=True)
class StoreTarget:
    location: str     # the store's path or URL, as workers and the adaptive index are given it
    sink: RecordSink  # where records go
    work_dir: Path    # the writer's working directory: the store itself, or a remote store's staging
    staged: bool      # True for a store at a URL (work_dir is then its staging directory)

    @classmethod
    def open(cls, src: Path, store: Path | str, remote: RemoteOptions, staging_dir: Path | None) -> "StoreTarget":
        """The target for ``store``; ValueError as :func:`check_arguments` says."""
        check_arguments(src, store)
        return cls.for_store(store, remote, staging_dir)

    @classmethod
    def for_store(cls, store: Path | str, remote: RemoteOptions, staging_dir: Path | None) -> "StoreTarget":
        """The target for ``store``, with no source tree to check it against (a migration)."""
        sink = open_sink(store, remote)
        staging = sink.staging_dir(staging_dir)
        if staging is not None:
            return cls(sink.url, sink, staging, True)
        # the writer works in the store's own directory, named as the user gave it
        return cls(str(store), sink, Path(store), False)

    def absolute(self) -> "StoreTarget":
        """The same target with an absolute path: Dask workers open it from their own directories."""
        if self.staged:
            return self
        path = Path(os.path.abspath(self.work_dir))
        return StoreTarget(str(path), LocalSink(path), path, False)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store against a second conversion; StoreBusy if one holds it.

        A local store is locked with ``flock`` on its directory. A store at a URL is locked
        on its staging directory's lock file: that keeps out a second conversion on this
        machine (object stores have no lock that pcrfs could take for conversions on other
        machines)."""
        if self.staged:
            path = self.work_dir.parent / (self.work_dir.name + ".lock")
            fd = self._lock_file(path)
        else:
            if self.work_dir.exists() and not self.work_dir.is_dir():
                raise StoreExists(f"{self.work_dir} exists and is not a directory")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            path = self.work_dir
            try:
                fd = lock_exclusive(path)
            except LockHeld:
                raise self._busy() from None
        try:
            yield
        finally:
            if fd is not None:
                if self.staged:  # nothing left behind: the lock file goes while still held
                    _remove_lock_file(path)
                os.close(fd)

    def _busy(self) -> "StoreBusy":
        return StoreBusy(f"another convert is writing this store ({self.location}); wait for it to finish, "
                         "or stop it and run this command again to resume")

    def _lock_file(self, path: Path) -> int | None:
        """``flock`` on the lock file ``path`` (made if missing), removed again when the
        conversion ends. A lock taken on a file that its holder has meanwhile removed
        locks nothing: then the lock is taken again on the file that is there now."""
        for _ in range(100):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = lock_exclusive(path, create_file=True)
            except LockHeld:
                raise self._busy() from None
            except FileNotFoundError:  # the staging directory went with another run's last lock file
                continue
            if fd is None:
                return None
            try:
                held, there = os.fstat(fd), os.stat(path)
                if (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise self._busy()

    def open_writer(self, overwrite: bool) -> StoreWriter:
        """A writer for the store, after refusing to clobber a finished one (with ``overwrite``
        an old store is removed). FinishedButNotCleaned for a finished local store whose
        resume state is still there (see :meth:`finish_interrupted`)."""
        if self.staged:
            self._prepare_remote(overwrite)
        else:
            _prepare_local(self.work_dir, overwrite)
        return StoreWriter(self.work_dir, self.sink)

    def _prepare_remote(self, overwrite: bool) -> None:
        """The rules of :func:`_prepare_local`, for a store at a URL."""
        sink = self.sink  # an ObjectSink (staged): check, is_empty and remove_store are its own
        sink.check()
        finished = sink.exists(fmt.MANIFEST)
        unfinished = not finished and sink.exists(fmt.RECORDS_DIR)
        if overwrite and (finished or unfinished):
            sink.remove_store()
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        if finished:
            raise StoreExists(f"{sink.url} already holds a finished store; use --overwrite to replace it")
        if not unfinished and not sink.is_empty():
            raise StoreExists(f"{sink.url} is not empty and is not a PCR store; refusing to write into it")

    def finish_interrupted(self, fp: str) -> tuple[dict, dict]:
        """Complete a conversion killed after its manifest: drop the resume state; the
        manifest and the report. StoreExists if the store came from other inputs."""
        store = self.work_dir
        state = store / fmt.PARTIAL_DIR / "state.json"
        try:
            same = json.loads(state.read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if not same:
            raise StoreExists(f"{store} already holds a finished store (of other inputs or options); "
                              "use --overwrite to replace it")
        shutil.rmtree(store / fmt.PARTIAL_DIR)
        manifest = yaml.safe_load((store / fmt.MANIFEST).read_text(encoding="utf-8"))
        return manifest, json.loads((store / fmt.REPORT).read_text())

    def clean_up(self) -> None:
        """After the manifest: a remote store's staging directory is no longer needed."""
        if self.staged:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _remove_lock_file(path: Path) -> None:
    """Remove a held lock file, and the staging directory above it once it is empty."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    try:
        path.parent.rmdir()  # fails (ENOTEMPTY) while other conversions stage there
    except OSError:
        pass


def _prepare_local(store: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished store; with ``overwrite`` remove an old one."""
    if not store.exists():
        return
    if not store.is_dir():
        raise StoreExists(f"{store} exists and is not a directory")
    is_store = (store / fmt.MANIFEST).exists() or (store / fmt.PARTIAL_DIR).exists()
    if overwrite and is_store:
        _empty_directory(store)  # not the directory itself: the conversion's lock is held on it
        return
    if (store / fmt.MANIFEST).exists():
        if (store / fmt.PARTIAL_DIR).exists():
            raise FinishedButNotCleaned(store)
        raise StoreExists(f"{store} already holds a finished store; use --overwrite to replace it")
    if not is_store and any(store.iterdir()):
        raise StoreExists(f"{store} exists, is not empty and is not a PCR store; refusing to write into it")


def _empty_directory(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
