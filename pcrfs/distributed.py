"""`pcrfs convert --dask / --scheduler ADDR`: converting on a Dask cluster.

The client lists the source and plans the batches (:func:`pcrfs.convert.plan_batches`)
exactly as a local conversion does; each batch still to do becomes one Dask task,
:func:`convert_batch`, which reads and transcodes the batch's files on a worker,
builds the record (:func:`pcrfs.store.writer.build_record`), writes it straight
into the store and returns only its description (a few hundred bytes per image).
The client writes each description to ``.partial/`` as it arrives, so an
interrupted run resumes with the records not yet done, and finalizes the store
(index, report, manifest last) once all are in. Records are therefore
byte-identical to a local conversion's.

A record reaches the store atomically whatever happens to a worker: on a
filesystem through a temporary name unique to the attempt, fsync and rename; at an
object store URL as one PUT (an object appears whole or not at all). A worker that
dies mid-task leaves at most a temporary file, which the writer deletes before
finalizing; Dask runs the task again elsewhere.

Workers must see the source at the client's path and write the store at the
client's path (a shared filesystem) or URL; docs/distributed.md explains running
on a real cluster.
"""
from __future__ import annotations

import os
import signal
import socket
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

from .convert import Batch, ProgressFn, SourceFile, _process
from .fsutil import write_atomic
from .jpeg.transcode import TranscodeOptions
from .remote.fs import RemoteError, RemoteOptions, explain, filesystem, is_url, split_url
from .remote.retry import RetryPolicy
from .store import format as fmt
from .store.writer import ImageEntry, Problem, StoreWriter, build_record

if TYPE_CHECKING:
    import distributed

INSTALL_HINT = "pip install 'pcrfs[dask]'"
J = TypeVar("J")
TASK_RETRIES = 2  # a task that raised is run again this often (a dead worker's tasks are rescheduled anyway)


class DaskUnavailable(RuntimeError):
    """dask.distributed is not installed."""


class ClusterUnavailable(RuntimeError):
    """The Dask scheduler cannot be reached."""


class WorkerSetupError(RuntimeError):
    """A worker cannot see the source or the store where the client said they are."""


def require_dask() -> None:
    """DaskUnavailable, naming the extra to install, unless dask.distributed imports."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise DaskUnavailable(f"converting on Dask needs dask.distributed ({e}): {INSTALL_HINT}") from None


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
    problems: list[Problem] = []
    for sf in files:
        result = _process(sf, opts)
        (problems if isinstance(result, Problem) else entries).append(result)
    chunks, desc = build_record(record, entries, problems, sources)
    if thresholds is not None:  # `convert --quality-index`: the record's ks travel with its description
        from .quality.build import score_batch_entries

        desc.update(score_batch_entries(entries, thresholds))
    if is_url(store):
        _put_record(store, remote, record, chunks)
    else:
        _write_record(Path(store), record, chunks)
    return desc


def _write_record(store: Path, record: int, chunks: list) -> None:
    records = store / fmt.RECORDS_DIR
    if not records.is_dir():
        raise WorkerSetupError(f"worker on {socket.gethostname()} cannot see the store at {store} (no "
                               f"{fmt.RECORDS_DIR}/ there): every worker must write STORE at the client's "
                               "path (a shared filesystem), or use an object store URL")
    # a unique temporary name per attempt: a retried or duplicated attempt (possibly on
    # another machine) never writes into this one's file, and each renames a whole record
    write_atomic(store / fmt.record_name(record), chunks, unique_tmp=True)


def _put_record(url: str, remote: RemoteOptions, record: int, chunks: list) -> None:
    """One PUT of the whole record: the object appears complete or not at all."""
    name = fmt.record_name(record)
    data = b"".join(chunks)
    try:
        fs = filesystem(url, remote)
        path = f"{split_url(url)[1]}/{name}"
        RetryPolicy(attempts=remote.attempts).call(lambda: fs.pipe_file(path, data), what=f"PUT {url}/{name}")
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 - one readable line for the client, not a worker traceback
        raise RemoteError(explain(e, url, remote)) from None


# ---- the client --------------------------------------------------------------------------------

def task_key(fingerprint: str, record: int, run: str) -> str:
    """The key of record ``record``'s task in run ``run`` of the conversion ``fingerprint``.

    Each run (first or resumed) has keys of its own: Dask cancels asynchronously, and a key
    resubmitted right after an interrupted run cancelled it can be cancelled in turn. An
    attempt of the earlier run still executing is harmless: it writes the same bytes
    through a temporary name of its own.
    """
    return f"pcrfs-record-{fingerprint[:12]}-{run}-{record:05d}"


def _threads(client: "distributed.Client") -> int:
    return sum(client.nthreads().values())


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


def run_bounded(client: "distributed.Client", jobs: Iterable[J], submit: Callable[[J], Any]) -> Iterator[tuple[J, Any]]:
    """(job, result) for every job, in completion order, with ``submit(job)`` (a Dask future)
    called for only a few jobs per worker thread at a time: the scheduler holds a bounded
    amount of work, and an interruption has little to cancel. The limit is re-read as
    workers join or leave. On any exception (Ctrl-C included) the outstanding futures are
    cancelled and it propagates."""
    from distributed import as_completed

    queue = iter(jobs)
    futures: dict = {}  # in flight: future -> its job
    running = as_completed()

    def submit_more() -> None:
        limit = max(4, 2 * _threads(client))
        while len(futures) < limit:
            job = next(queue, _DONE)
            if job is _DONE:
                return
            fut = submit(job)
            futures[fut] = job
            running.add(fut)

    try:
        submit_more()
        for fut in running:
            job = futures.pop(fut)
            result = fut.result()
            fut.release()
            yield job, result
            submit_more()
    except BaseException:
        try:
            client.cancel(list(futures))
        except Exception:  # noqa: BLE001 - a broken connection must not hide why we stopped
            pass
        raise


_DONE = object()


def _ignore_sigint() -> None:
    """Run on each worker of a LocalCluster, in its main thread (where client.run calls it).

    Ctrl-C in a terminal reaches the whole process group, worker processes included; only
    the client should act on it (cancel, leave the store resumable, close the cluster), not
    every worker with a KeyboardInterrupt traceback. Done once the workers are up, so that a
    Ctrl-C during startup still stops the client (the workers may then print tracebacks).
    Ignoring SIGINT while they are spawned would lose such a Ctrl-C, and blocking it here
    did not reach them when tried (the cluster's threads ran with an empty signal mask).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None,
                dashboard_address: str | None = ":8787") -> Iterator["distributed.Client"]:
    """A client of the cluster at ``scheduler``, or of a LocalCluster of ``n_workers``
    single-threaded worker processes (default: one per core) started for the occasion."""
    require_dask()
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as e:
            raise ClusterUnavailable(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        try:
            yield client
        finally:
            client.close()
        return
    # processes, not threads: the Python parts of a conversion (splitting, CRCs, bookkeeping)
    # then run in parallel too; one thread each since a task already keeps a core busy
    cluster = LocalCluster(n_workers=n_workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                           dashboard_address=dashboard_address)
    try:
        client = Client(cluster)
        try:
            client.run(_ignore_sigint)
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
