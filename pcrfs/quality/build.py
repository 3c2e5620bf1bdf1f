"""Building the adaptive index from per-part results: locally, during `convert`, or on Dask; resumable.

The store's images are cut into *parts*: each record's images, PART_IMAGES at a
time (a record is a few hundred to a few thousand images). A part is scored as a
whole (:func:`score_part`: :func:`.search.search_ks` per image) by this process,
a worker process, a Dask task, or, during ``pcrfs convert --quality-index``, by
whatever transcoded the record's images. Each finished part is kept in a resume
directory (:func:`resume_dir`), bound to the store's content by the CRC-32 of its
images' scan-group CRCs, so an interrupted run, a convert killed after its
manifest, or a later ``pcrfs quality --write-index`` starts where the last one
stopped. The client assembles the parts in image order, writes the index
atomically (:func:`.scoring.write`) and only then removes the resume directory.

Whoever scores a part, and in whatever order, the ks are those of
:func:`.scoring.compute`: one function on the same bytes.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import shutil
import zlib
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..fsutil import write_atomic
from ..store.format import adaptiveindex as adaptive
from ..store.write import install

if TYPE_CHECKING:
    import distributed

    from ..remote.fs import RemoteOptions
    from ..store.read.reader import Store

PART_IMAGES = 16   # ~0.25 s of scoring; a 400-image record is 25 tasks: 2 workers idle 1/25 at the end (32: 1/13)
RESUME_DIR = ".adaptive-partial"   # inside a local store; URL stores: $XDG_CACHE_HOME/pcrfs/adaptive/
STATE_VERSION = 1
TASK_RETRIES = 2


@dataclass
class PartResult:
    """The ks of one part's images, u1[count, T] (0 where an image could not be scored)."""
    record: int
    part: int
    ks: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)  # (offset in the part, reason)


def parts_of(store: "Store") -> list[tuple[int, int, int, int]]:
    """(record, part, first position, count) of every part, in storage order: a part is the
    images at storage positions [first, first + count) (``Index.images_at``), so a part
    lies in one record whatever the store's order."""
    out = []
    for r, rec in enumerate(store.index.records):
        first, n = int(rec["first_image"]), int(rec["n_images"])
        for p, start in enumerate(range(0, n, PART_IMAGES)):
            out.append((r, p, first + start, min(PART_IMAGES, n - start)))
    return out


def content_crc(crc_rows: Iterable[Sequence[int]]) -> int:
    """CRC-32 of the images' scan-group CRCs (each image's own groups, in order): what a
    part's ks were computed from."""
    crc = 0
    for row in crc_rows:
        crc = zlib.crc32(np.asarray(row, dtype="<u4").tobytes(), crc)
    return crc


def store_part_crc(store: "Store", first: int, count: int) -> int:
    images = store.index.images_at(first, count)
    n_groups = store.index.images["n_groups"][images]
    crcs = store.index.group_crc32[images]
    return content_crc(row[:int(n)] for row, n in zip(crcs, n_groups))


# ---- scoring ---------------------------------------------------------------------------------

def _failure(e: BaseException) -> str:
    return str(e) or type(e).__name__


# what a damaged or undecodable image raises (CorruptData is an OSError), as in measure._measure_or_fail
SCORE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def score_files(images: Iterable[tuple[Callable[[int], bytes], int]], thresholds: Sequence[float]
                ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """u1[count, T] ks and failures for images given as (file_at, n_groups); one BLAS thread."""
    from .search import search_ks, single_threaded_blas

    rows, failures = [], []
    with single_threaded_blas():
        for j, (file_at, n) in enumerate(images):
            try:
                rows.append(search_ks(file_at, n, thresholds))
            except SCORE_ERRORS as e:
                rows.append(np.zeros(len(thresholds), dtype=adaptive.DTYPE))
                failures.append((j, _failure(e)))
    ks = np.stack(rows) if rows else np.zeros((0, len(thresholds)), dtype=adaptive.DTYPE)
    return ks, failures


def groups_reader(groups: Sequence[bytes | memoryview]) -> Callable[[int], bytes]:
    """``file_at`` over a transcoded image's scan groups: what the store serves for k."""
    from ..jpeg.scans import EOI_BYTES

    return lambda k: b"".join(groups[:k]) + EOI_BYTES


def score_part(store: "Store", record: int, part: int, first: int, count: int,
               thresholds: Sequence[float]) -> PartResult:
    images = [(_store_reader(store, i), store.n_groups(i)) for i in store.index.images_at(first, count).tolist()]
    return PartResult(record, part, *score_files(images, thresholds))


def _store_reader(store: "Store", i: int) -> Callable[[int], bytes]:
    return lambda k: store.read(i, k)


# ---- the resume directory ------------------------------------------------------------------------

def resume_dir(location: str) -> Path:
    """Where the scored parts of the store at ``location`` (a directory or a URL) are kept."""
    from ..store.sources.location import local_work_dir

    return local_work_dir(location, RESUME_DIR, "adaptive")


class Parts:
    """The scored parts kept in one resume directory, for one set of thresholds."""

    def __init__(self, directory: Path, thresholds: Sequence[float]) -> None:
        self.dir = Path(directory)
        self.thresholds = [float(t) for t in thresholds]

    def _state(self) -> dict:
        return {"version": STATE_VERSION, "thresholds": self.thresholds, "part_images": PART_IMAGES}

    def open(self) -> None:
        """Create the directory; parts scored for other thresholds (or by another layout) go."""
        state = self.dir / "state.json"
        try:
            same = json.loads(state.read_text()) == self._state()
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not same:
            write_atomic(state, json.dumps(self._state()).encode())

    def _path(self, record: int, part: int) -> Path:
        return self.dir / f"{record:05d}-{part:04d}.npz"

    def save(self, result: PartResult, crc: int) -> None:
        buf = io.BytesIO()
        np.savez(buf, ks=np.ascontiguousarray(result.ks, dtype=adaptive.DTYPE), crc=np.uint32(crc),
                 failed=np.array([f[0] for f in result.failures], dtype=np.int64),
                 reasons=np.array([f[1] for f in result.failures], dtype=str))
        write_atomic(self._path(result.record, result.part), buf.getvalue(), unique_tmp=True)

    def load(self, record: int, part: int, count: int, crc: int) -> PartResult | None:
        """The kept part if it is whole and was scored from these very images, else None."""
        try:
            with np.load(self._path(record, part), allow_pickle=False) as z:
                ks, saved_crc = z["ks"], int(z["crc"])
                failures = list(zip(z["failed"].tolist(), z["reasons"].tolist()))
        except (OSError, ValueError, KeyError, zlib.error, EOFError):
            return None
        if saved_crc != crc or ks.shape != (count, len(self.thresholds)) or ks.dtype != adaptive.DTYPE:
            return None
        return PartResult(record, part, ks, failures)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- running the parts -----------------------------------------------------------------------

_worker_stores: dict[tuple[str, int], "Store"] = {}


def _open_for_worker(location: str, binding: int, remote: "RemoteOptions | None") -> "Store":
    """A worker's handle on the store, opened once per process, location and content
    (``binding``: the CRC-32 of its group CRC index file, so a store replaced at the same
    path is opened afresh)."""
    from ..store.read.reader import ReadOptions, open_store

    key = (location, binding)
    store = _worker_stores.get(key)
    if store is None:
        options = ReadOptions(remote=remote) if remote is not None else ReadOptions()
        store = open_store(location, verify_index=False, options=options)
        if _binding(store) != binding:
            raise RuntimeError(f"the store at {location} is not the one the client is indexing "
                               "(workers must see it at the same path or URL)")
        if len(_worker_stores) >= 4:
            _worker_stores.pop(next(iter(_worker_stores))).close()
        _worker_stores[key] = store
    return store


def _binding(store: "Store") -> int:
    return int(store.manifest["index_files"][adaptive.BINDS_TO]["crc32"])


def score_part_task(location: str, binding: int, remote: "RemoteOptions | None", record: int, part: int,
                    first: int, count: int, thresholds: Sequence[float]) -> PartResult:
    """One part, scored where this runs (a worker process or a Dask task)."""
    return score_part(_open_for_worker(location, binding, remote), record, part, first, count, thresholds)


def _pool_task(job: tuple) -> PartResult:
    return score_part_task(*job)


def _run_local(location: str, remote, jobs: list[tuple], workers: int, store: "Store") -> Iterator[PartResult]:
    if workers <= 1 or len(jobs) < 2 or not store.location.workers_can_reopen():
        for (_loc, _bind, _rem, r, p, first, count, thresholds) in jobs:
            yield score_part(store, r, p, first, count, thresholds)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from pool.map(_pool_task, jobs)


def _run_dask(client: "distributed.Client", jobs: list[tuple], run: str) -> Iterator[PartResult]:
    """Parts as Dask tasks, a few per worker thread in flight (as for convert's records)."""
    from ..cluster import run_bounded

    def submit(job: tuple):
        return client.submit(score_part_task, *job, key=f"pcrfs-score-{run}-{job[3]:05d}-{job[4]:04d}",
                             pure=False, retries=TASK_RETRIES)

    with closing(run_bounded(client, jobs, submit)) as done:  # closed early: in-flight tasks cancelled
        for _, result in done:
            yield result


@dataclass
class Built:
    ks: np.ndarray                                    # u1[n, T]
    failures: list[tuple[int, str]]                   # (image, reason)
    resumed: int                                      # images whose part was kept from before
    parts: Parts


def build(store: "Store", thresholds: Sequence[float] = adaptive.THRESHOLDS, *, workers: int = 1,
          client: "distributed.Client | None" = None, remote: "RemoteOptions | None" = None,
          on_start: Callable[[int, int], None] | None = None,
          on_done: Callable[[int], None] | None = None) -> Built:
    """Every image's ks, from the kept parts and by scoring the others (locally with
    ``workers`` processes, or on ``client``'s Dask cluster); each newly scored part is kept
    as it arrives. ``on_start(total, already)`` and ``on_done(n)`` drive a progress bar."""
    import uuid

    thresholds = [float(t) for t in thresholds]
    location = str(store.root)
    parts = Parts(resume_dir(location), thresholds)
    parts.open()
    ks = np.zeros((store.num_images, len(thresholds)), dtype=adaptive.DTYPE)
    failures: list[tuple[int, str]] = []
    jobs, crcs, firsts = [], {}, {}
    resumed = 0

    def take(result: PartResult) -> None:
        images = store.index.images_at(firsts[(result.record, result.part)], len(result.ks))
        ks[images] = result.ks
        failures.extend((int(images[j]), reason) for j, reason in result.failures)

    for r, p, first, count in parts_of(store):
        crc = store_part_crc(store, first, count)
        crcs[(r, p)], firsts[(r, p)] = crc, first
        kept = parts.load(r, p, count, crc)
        if kept is not None:
            take(kept)
            resumed += count
        else:
            jobs.append((location, _binding(store), remote, r, p, first, count, thresholds))
    if on_start:
        on_start(store.num_images, resumed)
    results = (_run_dask(client, jobs, uuid.uuid4().hex[:8]) if client is not None
               else _run_local(location, remote, jobs, workers, store))
    for result in results:
        parts.save(result, crcs[(result.record, result.part)])
        take(result)
        if on_done:
            on_done(len(result.ks))
    failures.sort()
    return Built(ks, failures, resumed, parts)


def build_and_write(store: "Store", thresholds: Sequence[float] = adaptive.THRESHOLDS, *,
                    store_locked: bool = False, **kwargs) -> tuple[Built, dict]:
    """:func:`build`, then install the index atomically, then drop the kept parts
    (``store_locked``: the caller holds the store's lock, see :func:`.scoring.write`)."""
    built = build(store, thresholds, **kwargs)
    entry = install.adaptive_index(store, built.ks, thresholds, store_locked=store_locked)
    built.parts.remove()
    return built, entry


# ---- during `pcrfs convert --quality-index` --------------------------------------------------------

def score_entry(groups: Sequence[bytes | memoryview], thresholds: Sequence[float],
                source: bytes | None = None) -> tuple[np.ndarray, str | None]:
    """(u1[T] ks, failure reason or None) of one transcoded image, from its scan groups
    (``source``: the JPEG they were losslessly transcoded from, see :func:`.search.search_ks`).

    No BLAS thread limit here (convert calls this from several threads at once): the
    conversion runs inside one :func:`.search.single_threaded_blas` instead.
    """
    from .search import search_ks

    try:
        return search_ks(groups_reader(groups), len(groups), thresholds, source=source), None
    except SCORE_ERRORS as e:
        return np.zeros(len(thresholds), dtype=adaptive.DTYPE), _failure(e)


def split_record(desc: dict, ks: np.ndarray, failures: list[tuple[int, str]]) -> Iterator[tuple[PartResult, int]]:
    """A record's ks (in its images' order) as parts, each with its content CRC."""
    rows = desc["images"]
    for p, start in enumerate(range(0, len(rows), PART_IMAGES)):
        end = min(start + PART_IMAGES, len(rows))
        part_failures = [(j - start, reason) for j, reason in failures if start <= j < end]
        crc = content_crc(row[5] for row in rows[start:end])
        yield PartResult(desc["record"], p, ks[start:end], part_failures), crc


def _transcoded_source(source_file, entry) -> bytes | None:
    """The JPEG that ``entry`` (an ImageEntry) was losslessly transcoded from, read again
    from ``source_file`` (convert's SourceFile: ``abs``, ``ino``), or None.

    Its baseline decode is the full decode's luminance for a third of the time
    (:func:`.search._source_luma` checks the pair). Only for a lossless transcode, and
    only if the file is still the one convert read: same inode, size and mtime.
    """
    import os

    from ..store.format import FLAG_REENCODED

    path = getattr(source_file, "abs", None)
    if path is None or getattr(entry, "flags", FLAG_REENCODED) & FLAG_REENCODED:
        return None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            ino = getattr(source_file, "ino", 0)
            if ((ino and (st.st_dev, st.st_ino) != (source_file.dev, ino))
                    or st.st_size != entry.src_size or st.st_mtime_ns != entry.src_mtime_ns):
                return None
            data = f.read()
    except OSError:
        return None
    return data if len(data) == entry.src_size else None


class ConvertScoring:
    """Scores each image while `convert` transcodes it and keeps every finished record's
    ks as parts in the store's resume directory; :meth:`finish` writes the index."""

    KS_KEY = "adaptive_k"            # in a Dask task's record description, removed before it is kept
    FAILURES_KEY = "adaptive_failures"

    def __init__(self, location: str, thresholds: Sequence[float] = adaptive.THRESHOLDS) -> None:
        self.location = location
        self.thresholds = [float(t) for t in thresholds]
        self.parts = Parts(resume_dir(location), self.thresholds)
        self._pending: dict[str, tuple[np.ndarray, str | None]] = {}

    def start(self) -> None:
        """After the store's directories exist (StoreWriter.start)."""
        self.parts.open()

    def process(self, process: Callable, *args):
        """``process(*args)`` (convert's per-file step), then the image's ks, kept until its record is done."""
        result = process(*args)
        groups = getattr(result, "groups", None)
        if groups is not None:
            source = _transcoded_source(args[0] if args else None, result)
            self._pending[result.path] = score_entry(groups, self.thresholds, source)
        return result

    def record_done(self, desc: dict) -> None:
        """Keep record ``desc``'s ks as parts: from the description (a Dask task put them
        there) or from the images this process scored."""
        if self.KS_KEY in desc:
            ks = np.asarray(desc.pop(self.KS_KEY), dtype=adaptive.DTYPE).reshape(-1, len(self.thresholds))
            failures = [tuple(f) for f in desc.pop(self.FAILURES_KEY, [])]
        else:
            scored = [self._pending.pop(row[0]) for row in desc["images"]]
            ks = (np.stack([k for k, _ in scored]) if scored
                  else np.zeros((0, len(self.thresholds)), dtype=adaptive.DTYPE))
            failures = [(j, reason) for j, (_, reason) in enumerate(scored) if reason is not None]
        for part, crc in split_record(desc, ks, failures):
            self.parts.save(part, crc)

    def finish(self, store_location: str, *, workers: int = 1, client=None, remote=None) -> tuple[Built, dict]:
        """After the manifest: the index from the kept parts (scoring any a run without
        --quality-index left out), written atomically; then the parts go. The caller,
        ``convert``, holds the store's lock."""
        from ..store.read.reader import ReadOptions, open_store

        options = ReadOptions(remote=remote) if remote is not None else ReadOptions()
        with open_store(store_location, options=options) as store:
            return build_and_write(store, self.thresholds, workers=workers, client=client, remote=remote,
                                   store_locked=True)


def score_batch_entries(entries: Sequence, thresholds: Sequence[float], sources: Sequence | None = None) -> dict:
    """The description keys a Dask convert task adds for its record's images (``sources``:
    the SourceFile each entry came from, whose baseline decode is the cheaper reference)."""
    from .search import single_threaded_blas

    rows, failures = [], []
    with single_threaded_blas():
        for j, e in enumerate(entries):
            source = _transcoded_source(sources[j], e) if sources is not None else None
            ks, reason = score_entry(e.groups, thresholds, source)
            rows.append(ks.tolist())
            if reason is not None:
                failures.append([j, reason])
    return {ConvertScoring.KS_KEY: rows, ConvertScoring.FAILURES_KEY: failures}
