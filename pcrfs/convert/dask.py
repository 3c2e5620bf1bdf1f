"""`pcrfs convert --dask / --scheduler ADDR`: converting on a Dask cluster.

The client lists the source and plans the batches (:func:`.plan.plan_batches`)
exactly as a local conversion does; each batch still to do becomes one Dask task,
:func:`convert_batch`, which reads and transcodes the batch's files on a worker
(:func:`.local.transcode_source`), builds the record
(:func:`pcrfs.store.write.writer.build_record`), puts it into the store through the same
:class:`~pcrfs.store.write.sink.RecordSink` a local conversion uses and returns only its
description (a few hundred bytes per image). The client writes each description to
``.partial/`` as it arrives, so an interrupted run resumes with the records not yet
done, and finalizes the store (index, report, manifest last) once all are in.
Records are therefore byte-identical to a local conversion's.

A record reaches the store atomically whatever happens to a worker (see
:mod:`pcrfs.store.write.sink`). A worker that dies mid-task leaves at most a temporary
file, which the writer deletes before finalizing; Dask runs the task again elsewhere.

Workers must see the source at the client's path and write the store at the
client's path (a shared filesystem) or URL; docs/distributed.md explains running
on a real cluster.
"""
from __future__ import annotations

import os
import socket
import uuid
from contextlib import closing
from typing import TYPE_CHECKING

from ..cluster import run_bounded
from ..jpeg.transcode import TranscodeOptions
from ..remote.fs import RemoteOptions
from ..store import format as fmt
from ..store.write.sink import open_sink
from ..store.write.writer import ImageEntry, Problem, StoreWriter, build_record
from .local import transcode_source
from .plan import Batch, ProgressFn, SourceFile

if TYPE_CHECKING:
    import distributed

TASK_RETRIES = 2  # a task that raised is run again this often (a dead worker's tasks are rescheduled anyway)


class WorkerSetupError(RuntimeError):
    """A worker cannot see the source or the store where the client said they are."""


# ---- the task, on a worker -------------------------------------------------------------------

def convert_batch(record: int, files: list[SourceFile], sources: tuple[int, int], opts: TranscodeOptions,
                  src_root: str, store: str, remote: RemoteOptions, thresholds: tuple | None = None) -> dict:
    """Convert one batch into record ``record`` of ``store`` (a path or URL); return its description.

    Every file's failure is a Problem in the description, as in a local conversion; an
    exception means the attempt failed as a whole (Dask retries it).
    """
    if not os.path.isdir(src_root):
        raise WorkerSetupError(f"worker on {socket.gethostname()} cannot see the source at {src_root}: "
                               "every worker must read SRC at the client's path (a shared filesystem)")
    entries: list[ImageEntry] = []
    entry_files: list[SourceFile] = []  # the file each entry came from (the scoring re-reads it)
    problems: list[Problem] = []
    for sf in files:
        result = transcode_source(sf, opts)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            entries.append(result)
            entry_files.append(sf)
    chunks, desc = build_record(record, entries, problems, sources)
    if thresholds is not None:  # `convert --quality-index`: the record's ks travel with its description
        from ..quality.build import score_batch_entries

        desc.update(score_batch_entries(entries, thresholds, entry_files))
    try:
        open_sink(store, remote).put(fmt.record_name(record), chunks)
    except FileNotFoundError:  # a local store's records/ is not there: not the client's filesystem
        raise WorkerSetupError(f"worker on {socket.gethostname()} cannot see the store at {store} (no "
                               f"{fmt.RECORDS_DIR}/ there): every worker must write STORE at the client's "
                               "path (a shared filesystem), or use an object store URL") from None
    return desc


# ---- the client --------------------------------------------------------------------------------

def task_key(fingerprint: str, record: int, run: str) -> str:
    """The key of record ``record``'s task in run ``run`` of the conversion ``fingerprint``.

    Each run (first or resumed) has keys of its own: Dask cancels asynchronously, and a key
    resubmitted right after an interrupted run cancelled it can be cancelled in turn. An
    attempt of the earlier run still executing is harmless: it writes the same bytes
    through a temporary name of its own.
    """
    return f"pcrfs-record-{fingerprint[:12]}-{run}-{record:05d}"


def convert_batches(client: "distributed.Client", files: list[SourceFile], todo: list[Batch], writer: StoreWriter,
                    opts: TranscodeOptions, src_root: str, store: str, remote: RemoteOptions, fingerprint: str,
                    on_progress: ProgressFn | None = None, scoring=None) -> int:
    """Run one task per batch of ``todo`` on ``client``'s cluster; describe each record as it
    arrives. Returns the source bytes converted. On any exception (Ctrl-C included) the
    outstanding tasks are cancelled and the store is left resumable."""
    run = uuid.uuid4().hex[:8]
    thresholds = tuple(scoring.thresholds) if scoring is not None else None

    def submit(b: Batch):
        return client.submit(convert_batch, b.record, files[b.start:b.end], (b.start, b.end), opts, src_root,
                             store, remote, thresholds, key=task_key(fingerprint, b.record, run), pure=False,
                             retries=TASK_RETRIES)

    bytes_in = 0
    # closing(): an exception here (a failed write, Ctrl-C) also cancels what is in flight
    with closing(run_bounded(client, todo, submit)) as done:
        for b, desc in done:  # a task's exception (after its retries) ends the conversion
            if scoring is not None:
                scoring.record_done(desc)  # keeps the ks, takes them out of the description
            writer.record_written(desc)
            bytes_in += b.nbytes
            if on_progress:
                on_progress(b.count, b.nbytes)
    return bytes_in
