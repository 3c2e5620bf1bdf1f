"""`pcrfs convert`: an image tree in, a PCR store out; the source is only ever read.

The sorted listing is cut into batches by source bytes (:func:`plan_batches`);
batch r becomes record r. Locally, images are processed in that order by a thread
pool (the libjpeg-turbo transform and Pillow release the GIL) and each batch is
written as a record when its last file is in; on a Dask cluster
(:mod:`pcrfs.distributed`) each batch is one task. Either way the store is
identical, whatever the worker count, and a re-run resumes with the records not
yet finished.

The store may also be a URL (``s3://bucket/prefix``): the conversion then runs
in a local staging directory and uploads each record as it is finished, the
manifest last (see :class:`~pcrfs.store.location.RemoteTarget`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import yaml

from .fsutil import LockHeld, lock_exclusive
from .jpeg.transcode import BadImage, SkippedImage, TranscodeOptions, transcode
from .remote.fs import RemoteOptions, is_url
from .store import format as fmt
from .store.location import RemoteTarget
from .store.writer import ImageEntry, Problem, StoreWriter

if TYPE_CHECKING:
    import distributed


@dataclass(frozen=True)
class SourceFile:
    rel: str        # '/'-separated path relative to the source root
    abs: str
    size: int
    mtime_ns: int
    dev: int = 0    # identity of the file the listing checked: the file read later must be it
    ino: int = 0


NAME_MAX = 255  # bytes per path component (Linux's limit, which the mount must meet)


@dataclass
class Listing:
    files: list[SourceFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # found while walking (unreadable dirs, ...)


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def list_sources(src: Path) -> Listing:
    """Every regular file under ``src`` in store order.

    Hidden entries (dot-names) are ignored. Symlinks to files are followed only if
    their target lies inside ``src``; symlinked directories are never followed (no
    loops, no escapes). Both are reported, never silently dropped.
    """
    listing = Listing()
    root_real = os.path.realpath(src)

    def entries_of(directory: str, rel_parts: tuple[str, ...]) -> list[os.DirEntry]:
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as e:
            listing.problems.append(Problem("/".join(rel_parts) or ".", f"cannot list directory: {e.strerror}"))
            return []

    # depth-first with an explicit stack, not recursion: a source tree may be nested
    # deeper than Python's recursion limit (~1,000 levels)
    stack: list[tuple[Iterator[os.DirEntry], tuple[str, ...]]] = [(iter(entries_of(str(src), ())), ())]
    while stack:
        it, rel_parts = stack[-1]
        entry = next(it, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue
        rel = "/".join(rel_parts + (entry.name,))
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.isdir(target):
                    listing.problems.append(Problem(rel, "symlinked directory not followed", "skipped"))
                    continue
                if not _inside(target, root_real):
                    listing.problems.append(Problem(rel, "symlink points outside the source tree"))
                    continue
            st = os.stat(entry.path)
        except OSError as e:
            listing.problems.append(Problem(rel, f"cannot stat: {e.strerror}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            parts = rel_parts + (entry.name,)
            stack.append((iter(entries_of(entry.path, parts)), parts))
        elif stat.S_ISREG(st.st_mode):
            listing.files.append(SourceFile(rel, entry.path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino))
        else:
            listing.problems.append(Problem(rel, "not a regular file", "skipped"))
    listing.files.sort(key=lambda f: fmt.path_sort_key(f.rel))
    return listing


def _process(sf: SourceFile, opts: TranscodeOptions) -> ImageEntry | Problem:
    """Read and transcode one source file; every failure becomes a Problem."""
    try:
        with open(sf.abs, "rb") as f:
            st = os.fstat(f.fileno())
            if sf.ino and (st.st_dev, st.st_ino) != (sf.dev, sf.ino):
                # replaced (e.g. by a symlink out of SRC) after the listing vetted it
                return Problem(sf.rel, "file was replaced since the source was listed; not read")
            data = f.read()
    except OSError as e:
        return Problem(sf.rel, f"cannot read: {e.strerror}")
    try:
        out = transcode(data, opts)
    except SkippedImage as e:
        return Problem(sf.rel, f"non-JPEG input skipped ({e})", "skipped")
    except BadImage as e:
        return Problem(sf.rel, str(e))
    except MemoryError:
        return Problem(sf.rel, "out of memory while transcoding")
    flags = fmt.FLAG_REENCODED if out.reencoded else 0
    return ImageEntry(sf.rel, st.st_size, st.st_mtime_ns, flags, out.groups)


@dataclass
class ConvertResult:
    images: int
    bad: list[dict]
    skipped: list[dict]
    reencoded: int
    bytes_in: int
    bytes_out: int
    seconds: float
    resumed_from: int  # source files already done by an earlier, interrupted run
    manifest: dict
    source_bytes: int = 0  # every listed source file, this run's and earlier runs' alike
    adaptive: tuple | None = None  # with quality_index: (quality.build.Built, the index's manifest entry)

    @property
    def ratio(self) -> float:
        """Stored bytes per source byte. Against the whole source, not ``bytes_in``: a
        resumed run reads only what is left but the store holds everything."""
        return self.bytes_out / self.source_bytes if self.source_bytes else 0.0


class StoreExists(RuntimeError):
    pass


class StoreBusy(StoreExists):
    """Another conversion holds the store's lock."""


class FinishedButNotCleaned(Exception):
    """The manifest (written last) is there but the resume state is not yet removed:
    the conversion was complete when it was interrupted."""


def fingerprint(listing: Listing, opts: TranscodeOptions, record_bytes: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"opts": asdict(opts), "record_bytes": record_bytes,
                         "format": fmt.FORMAT_VERSION}, sort_keys=True).encode())
    for f in listing.files:
        h.update(fmt.encode_path(f.rel) + b"\0" + f"{f.size}:{f.mtime_ns}".encode() + b"\n")
    return h.hexdigest()


def prepare_target(store: Path, overwrite: bool) -> None:
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


def _ancestors(path: str) -> set[tuple[int, int]]:
    """(device, inode) of ``path`` and of every existing directory above it: identities,
    so a bind mount or a second path to the same directory is still recognised."""
    ids = set()
    path = os.path.realpath(path)
    while True:
        try:
            st = os.stat(path)
            ids.add((st.st_dev, st.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(path)
        if parent == path:
            return ids
        path = parent


def refuse_overlap(src: Path, store: Path) -> None:
    """ValueError unless ``src`` and ``store`` are disjoint trees. The source is never
    modified, and ``--overwrite`` empties the store: a source inside the store (or the
    same directory) would be deleted, a store inside the source would be read as input."""
    src_st = os.stat(src)
    if (src_st.st_dev, src_st.st_ino) in _ancestors(os.fspath(store)) or \
            _inside(os.path.realpath(store), os.path.realpath(src)):
        raise ValueError(f"the store {store} is inside the source tree {src} (or is that tree); "
                         "choose a store outside the source (the source is never modified)")
    try:
        store_st = os.stat(store)
    except OSError:
        return  # a store that does not exist yet contains nothing
    if (store_st.st_dev, store_st.st_ino) in _ancestors(os.fspath(src)):
        raise ValueError(f"the source {src} is inside the store {store}; refusing to write there "
                         "(the source is never modified); choose a store outside the source")


def _store_lock(store: Path | None, target: RemoteTarget | None) -> int | None:
    """Hold the store against a second conversion; StoreBusy if one holds it.

    A local store is locked with ``flock`` on its directory. An s3:// store is locked on
    its staging directory's lock file: that keeps out a second conversion on this machine
    (object stores have no lock that pcrfs could take for conversions on other machines).
    """
    if target is not None:
        target.staging.parent.mkdir(parents=True, exist_ok=True)
        path, where = target.staging.parent / (target.staging.name + ".lock"), target.url
        create_file = True
    else:
        assert store is not None
        if store.exists() and not store.is_dir():
            raise StoreExists(f"{store} exists and is not a directory")
        store.mkdir(parents=True, exist_ok=True)
        path, where, create_file = store, str(store), False
    try:
        return lock_exclusive(path, create_file=create_file)
    except LockHeld:
        raise StoreBusy(f"another convert is writing this store ({where}); wait for it to finish, "
                        "or stop it and run this command again to resume") from None


def bad_name(rel: str) -> str | None:
    """Why the source path ``rel`` cannot be stored, or None. Each component must be one
    a filesystem can serve: the mount lists it under its own name, and Linux limits
    names to 255 bytes (sources on exFAT/NTFS/SMB may hold longer ones in UTF-8)."""
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            return f"path component {part!r} is not a name"
        n = len(fmt.encode_path(part))
        if n > NAME_MAX:
            return f"a path component is {n} bytes long; names over {NAME_MAX} bytes cannot be served"
    return None


def _without_bad_names(listing: Listing) -> Listing:
    """``listing`` less the files :func:`bad_name` refuses, which become bad-file problems."""
    bad = [(f, why) for f in listing.files if (why := bad_name(f.rel)) is not None]
    if not bad:
        return listing
    refused = {id(f) for f, _ in bad}
    return Listing([f for f in listing.files if id(f) not in refused],
                   listing.problems + [Problem(f.rel, why) for f, why in bad])


def _finish_cleanup(store: Path, fp: str, t0: float, n_sources: int, source_bytes: int) -> ConvertResult:
    """Complete a conversion that was killed after its manifest: drop the resume state."""
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
    report = json.loads((store / fmt.REPORT).read_text())
    return ConvertResult(images=manifest["num_images"], bad=report["bad"], skipped=report["skipped"],
                         reencoded=report["reencoded"], bytes_in=0, bytes_out=manifest["total_bytes"],
                         seconds=time.monotonic() - t0, resumed_from=n_sources, manifest=manifest,
                         source_bytes=source_bytes)


def prepare_remote_target(target: RemoteTarget, overwrite: bool) -> None:
    """The same rules as :func:`prepare_target`, for a store at a URL."""
    target.check()
    finished = target.exists(fmt.MANIFEST)
    unfinished = not finished and target.exists(fmt.RECORDS_DIR)
    if overwrite and (finished or unfinished):
        target.remove_store()
        return
    if finished:
        raise StoreExists(f"{target.url} already holds a finished store; use --overwrite to replace it")
    if not unfinished and not target.is_empty():
        raise StoreExists(f"{target.url} is not empty and is not a PCR store; refusing to write into it")


@dataclass(frozen=True)
class Batch:
    """Listing positions [start, end) that become record ``record``; ``nbytes`` of source."""
    record: int
    start: int
    end: int
    nbytes: int

    @property
    def count(self) -> int:
        return self.end - self.start


def plan_batches(files: Sequence[SourceFile], record_bytes: int) -> list[Batch]:
    """Cut the listing into consecutive batches, one per record.

    A batch closes as soon as its *source* bytes reach ``record_bytes`` (at least one
    file each). Source sizes are known before any work, so a Dask client can hand
    whole batches to workers, and a local conversion cuts at the same places: both
    give the same records. Lossless transcoding keeps a JPEG's size within a few
    percent, so records still come out close to ``record_bytes``.
    """
    batches: list[Batch] = []
    start, acc = 0, 0
    for i, f in enumerate(files):
        acc += f.size
        if acc >= record_bytes:
            batches.append(Batch(len(batches), start, i + 1, acc))
            start, acc = i + 1, 0
    if start < len(files):
        batches.append(Batch(len(batches), start, len(files), acc))
    return batches


ProgressFn = Callable[[int, int], None]  # (images done, bytes read) increments


def convert(src: Path, store: Path | str, *, opts: TranscodeOptions = TranscodeOptions(),
            workers: int | None = None, record_bytes: int = fmt.DEFAULT_RECORD_BYTES, overwrite: bool = False,
            listing: Listing | None = None, on_start: Callable[[int, int], None] | None = None,
            on_progress: ProgressFn | None = None, remote: RemoteOptions = RemoteOptions(),
            staging_dir: Path | None = None, client: "distributed.Client | None" = None,
            quality_index: bool = False) -> ConvertResult:
    """Convert the image tree ``src`` into a store at ``store`` (a directory or a URL).

    ``on_start(total, already_done)`` and ``on_progress(n, bytes)`` drive a progress bar.
    For a URL, ``remote`` says how to reach it and ``staging_dir`` where the local
    work happens (default: under ``~/.cache/pcrfs``); it is removed when done.
    RemoteError is raised if the object store cannot be used.

    With a Dask ``client`` the batches are converted by the cluster's workers, which
    must read ``src`` and write ``store`` at the same paths (or the same URL) as this
    process (see docs/distributed.md); ``workers`` is then unused. The store is the
    same as a local conversion's.

    ValueError if ``src`` and ``store`` overlap; StoreBusy if another conversion is
    writing ``store``. Source paths a mount could not serve are reported as bad files.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a directory")
    target = RemoteTarget(str(store), remote, staging_dir) if is_url(str(store)) else None
    if target is None:
        store = Path(store)
        refuse_overlap(src, store)
    lock = _store_lock(store if target is None else None, target)
    try:
        return _convert(src, store, target, opts=opts, workers=workers, record_bytes=record_bytes,
                        overwrite=overwrite, listing=listing, on_start=on_start, on_progress=on_progress,
                        remote=remote, client=client, quality_index=quality_index)
    finally:
        if lock is not None:
            os.close(lock)


def _convert(src: Path, store: Path | str, target: RemoteTarget | None, *, opts: TranscodeOptions,
             workers: int | None, record_bytes: int, overwrite: bool, listing: Listing | None,
             on_start: Callable[[int, int], None] | None, on_progress: ProgressFn | None,
             remote: RemoteOptions, client: "distributed.Client | None", quality_index: bool) -> ConvertResult:
    """:func:`convert`, with the checks done and the store's lock held."""
    if client is not None:
        # workers open these paths themselves, from their own working directories
        src = Path(os.path.abspath(src))
        if target is None:
            store = Path(os.path.abspath(store))
    t0 = time.monotonic()
    listing = _without_bad_names(listing or list_sources(src))
    if client is not None and listing.files and not os.path.isabs(listing.files[0].abs):
        raise ValueError("a conversion on Dask needs a listing of an absolute source path")
    fp = fingerprint(listing, opts, record_bytes)
    if target is None:
        try:
            prepare_target(store, overwrite)
        except FinishedButNotCleaned:
            result = _finish_cleanup(store, fp, t0, len(listing.files), sum(f.size for f in listing.files))
            if quality_index:  # killed between the manifest and the index: finish the index too
                result.adaptive = _quality_scoring(str(store)).finish(str(store), workers=workers or 1,
                                                                       client=client, remote=remote)
            return result
        writer = StoreWriter(store, record_bytes)
    else:
        prepare_remote_target(target, overwrite)
        writer = StoreWriter(target.staging, record_bytes, target=target)
    plan = plan_batches(listing.files, record_bytes)
    writer.start(fp, [(b.start, b.end) for b in plan])
    todo = [b for b in plan if b.record not in writer.done]
    resumed = writer.sources_done
    location = target.url if target is not None else str(store)
    scoring = _quality_scoring(location) if quality_index else None
    if on_start:
        on_start(len(listing.files), resumed)
    if client is None:
        bytes_in = _convert_locally(listing.files, todo, writer, opts, workers, on_progress, scoring)
    else:
        from .distributed import convert_batches

        bytes_in = convert_batches(client, listing.files, todo, writer, opts, str(src),
                                   location, remote, fp, on_progress, scoring=scoring)
    manifest = writer.finalize({
        "record_target_bytes": record_bytes,
        "options": {"keep_metadata": opts.keep_metadata, "quality": opts.quality,
                    "non_jpeg": opts.non_jpeg, "max_pixels": opts.max_pixels},
    }, extra_problems=listing.problems)
    report = json.loads((writer.root / fmt.REPORT).read_text())
    if target is not None:
        shutil.rmtree(target.staging, ignore_errors=True)
    index = None
    if scoring is not None:
        index = scoring.finish(location, workers=workers or os.cpu_count() or 1, client=client, remote=remote)
    return ConvertResult(
        images=manifest["num_images"], bad=report["bad"], skipped=report["skipped"],
        reencoded=report["reencoded"], bytes_in=bytes_in, bytes_out=manifest["total_bytes"],
        seconds=time.monotonic() - t0, resumed_from=resumed, manifest=manifest,
        source_bytes=sum(f.size for f in listing.files), adaptive=index)


def _quality_scoring(location: str):
    """The adaptive index's scorer for this conversion (pcrfs.quality.build), its kept parts opened."""
    from .quality.build import ConvertScoring

    scoring = ConvertScoring(location)
    scoring.start()
    return scoring


def _convert_locally(files: list[SourceFile], todo: list[Batch], writer: StoreWriter, opts: TranscodeOptions,
                     workers: int | None, on_progress: ProgressFn | None, scoring=None) -> int:
    if scoring is None:
        return _convert_batches_locally(files, todo, writer, opts, workers, on_progress, _process)
    from .quality.search import single_threaded_blas

    with single_threaded_blas():  # the threads below score images: one BLAS thread each
        return _convert_batches_locally(files, todo, writer, opts, workers, on_progress,
                                        lambda sf, o: scoring.process(_process, sf, o), scoring.record_done)


def _convert_batches_locally(files: list[SourceFile], todo: list[Batch], writer: StoreWriter,
                             opts: TranscodeOptions, workers: int | None, on_progress: ProgressFn | None,
                             process: Callable, on_record: Callable[[dict], None] | None = None) -> int:
    """Convert the batches ``todo`` in order with a thread pool; returns the source bytes read.

    Files are transcoded ``workers`` at a time (libjpeg-turbo and Pillow release the GIL)
    but taken in listing order, and each batch is written as a record as soon as its last
    file is in: the records are the same whatever the worker count.
    """
    workers = workers or os.cpu_count() or 1
    window = workers * 4  # bounded in-flight work keeps memory flat whatever the dataset size
    jobs = ((b, pos) for b in todo for pos in range(b.start, b.end))
    bytes_in = 0
    entries: list[ImageEntry] = []
    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pcrfs-convert") as pool:
        pending: deque[tuple[Batch, int, Future]] = deque()

        def submit_next() -> None:
            job = next(jobs, None)
            if job is not None:
                pending.append((job[0], job[1], pool.submit(process, files[job[1]], opts)))

        try:
            for _ in range(window):
                submit_next()
            while pending:
                batch, pos, fut = pending.popleft()
                result = fut.result()
                submit_next()
                if isinstance(result, Problem):
                    problems.append(result)
                else:
                    entries.append(result)
                if pos == batch.end - 1:
                    desc = writer.write_record(batch.record, entries, problems, (batch.start, batch.end))
                    if on_record:
                        on_record(desc)
                    entries, problems = [], []
                bytes_in += files[pos].size
                if on_progress:
                    on_progress(1, files[pos].size)
        except BaseException:
            for _, _, fut in pending:
                fut.cancel()
            raise
    return bytes_in
