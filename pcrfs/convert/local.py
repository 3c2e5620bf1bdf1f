"""Converting on this machine: one source file transcoded, and the thread pool that
turns a plan's batches into records in order.

:func:`transcode_source` is also what a Dask task runs for each of its files
(:mod:`.dask`), so both ways store the same bytes.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..jpeg.transcode import BadImage, SkippedImage, TranscodeOptions, transcode
from ..store import format as fmt
from ..store.write.writer import ImageEntry, Problem, StoreWriter
from .plan import Batch, ProgressFn, SourceFile


def transcode_source(sf: SourceFile, opts: TranscodeOptions) -> ImageEntry | Problem:
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


def convert_locally(files: list[SourceFile], todo: list[Batch], writer: StoreWriter, opts: TranscodeOptions,
                    workers: int | None, on_progress: ProgressFn | None = None, scoring=None) -> int:
    """Convert the batches ``todo`` here; returns the source bytes read. With ``scoring``
    (``convert --quality-index``) each image is scored as it is transcoded."""
    if scoring is None:
        return _convert_batches(files, todo, writer, opts, workers, on_progress, transcode_source)
    from ..quality.search import single_threaded_blas

    with single_threaded_blas():  # the threads below score images: one BLAS thread each
        return _convert_batches(files, todo, writer, opts, workers, on_progress,
                                lambda sf, o: scoring.process(transcode_source, sf, o), scoring.record_done)


def _convert_batches(files: list[SourceFile], todo: list[Batch], writer: StoreWriter,
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
                (problems if isinstance(result, Problem) else entries).append(result)
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
