"""Dask for pcrfs: a client of a cluster (or of a LocalCluster started for the occasion)
and a bounded loop of tasks. Used by ``convert`` (:mod:`pcrfs.convert.dask`, one task
per record) and by the adaptive index (:mod:`pcrfs.quality.build`, one task per part).

dask.distributed is optional (``pcrfs[dask]``); it is imported only when a cluster is
used, and :func:`require_dask` says what to install when it is missing.
"""
from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    import distributed

INSTALL_HINT = "pip install 'pcrfs[dask]'"
J = TypeVar("J")


class DaskUnavailable(RuntimeError):
    """dask.distributed is not installed."""


class ClusterUnavailable(RuntimeError):
    """The Dask scheduler cannot be reached."""


def require_dask() -> None:
    """DaskUnavailable, naming the extra to install, unless dask.distributed imports."""
    try:
        import distributed  # noqa: F401
    except ImportError as e:
        raise DaskUnavailable(f"converting on Dask needs dask.distributed ({e}): {INSTALL_HINT}") from None


def _threads(client: "distributed.Client") -> int:
    return sum(client.nthreads().values())


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
