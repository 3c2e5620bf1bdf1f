"""One deadline per read: however many requests, retries and waits a read takes, it ends in time.

A read of a remote store may go through several paths -- a record prefix, then the
per-image fallback, or waiting on another reader's fetch in flight -- and each
request in them is retried. Without one bound on the whole, a read against an
endpoint that accepts connections and never answers took minutes (attempts x
timeout, once per path and once per waiting reader). Here:

* :func:`scope` opens the deadline of a read on the calling thread (``seconds``
  from ``RemoteOptions.read_deadline``) or, inside a read that has one, joins it:
  every layer a read passes through opens a scope and they share one deadline.
* :meth:`Deadline.wait` / :meth:`Deadline.wait_all` are how a reader waits on work
  in other threads (requests in a pool, another reader's fetch): never past the
  deadline. The work left behind ends on its own: each request has its client's
  timeouts, capped to the deadline's length (:func:`pcrfs.remote.fs.filesystem`,
  :class:`pcrfs.store.sources.backends.ObstoreRecords`), and its retries stop at the
  deadline too (:class:`pcrfs.remote.retry.RetryPolicy`).
* :meth:`Deadline.run` runs work of a read in a pool thread under the read's
  deadline (:func:`in_worker` is then true: the caller is already waiting with it,
  so the work need not hop to yet another thread to be waited for).
* A waiting reader also polls an *interrupt probe* (:func:`set_interrupt_probe`):
  the mount installs one that says whether the process whose request is being
  served got a signal meaning "stop" (:func:`pcrfs.fuse.ops._interrupt_probe`), and
  the wait then ends at once with :class:`Interrupted` (EINTR).

Past the deadline a wait raises the deadline's ``error`` (:class:`DeadlineExceeded`
unless the caller names its own), which the mount answers as EIO.
"""
from __future__ import annotations

import errno
import math
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

DEFAULT_READ_DEADLINE = 30.0  # seconds a read of a remote store may take, all retries and paths included
INTERRUPT_POLL_S = 0.1        # how often a waiting reader asks whether its request was interrupted


class DeadlineExceeded(TimeoutError):
    """A read did not finish within its deadline (errno EIO, as the mount answers it)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class Interrupted(InterruptedError):
    """The request a reader serves was interrupted (the mount answers EINTR)."""

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(errno.EINTR, message)


_probe: Callable[[], bool] | None = None


def set_interrupt_probe(probe: Callable[[], bool] | None) -> None:
    """``probe()`` says whether the request served on the calling thread was interrupted;
    every wait of a reader polls it (the mount: libfuse's ``fuse_interrupted``)."""
    global _probe
    _probe = probe


class Deadline:
    """A point in time (``time.monotonic()``) past which a read gives up; ``seconds`` None: never."""

    __slots__ = ("seconds", "expires", "error")

    def __init__(self, seconds: float | None, error: Callable[[str], BaseException] = DeadlineExceeded) -> None:
        self.seconds = float(seconds) if seconds else None
        self.expires = time.monotonic() + self.seconds if self.seconds else math.inf
        self.error = error

    def remaining(self) -> float:
        """Seconds left (0 when past; inf without a deadline)."""
        return max(0.0, self.expires - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.expires

    def exceeded(self, what: str) -> BaseException:
        """The exception a read past this deadline raises, naming what it waited for."""
        return self.error(f"{what}: no answer within the read deadline of {self.seconds:g} s "
                          "(read_deadline, mount option --read-deadline)")

    def check(self, what: str) -> None:
        if self.expired():
            raise self.exceeded(what)

    def cap(self, timeout: float) -> float:
        """``timeout`` cut to the time left."""
        return min(timeout, self.remaining())

    # ---- waiting on other threads ------------------------------------------------------------

    def wait(self, fut: Future, what: str) -> Any:
        """``fut``'s result, or the deadline's error once it passes (or Interrupted). ``fut``
        may be shared with other readers (a fetch in flight): it is left as it is."""
        self._wait([fut], what, cancel=False)
        return fut.result()

    def wait_all(self, futures: Sequence[Future], what: str) -> list[Any]:
        """The results of ``futures`` (this reader's own work in a pool) in order; the first
        failure is raised as soon as it is known. Those not started when the wait ends
        early are cancelled; one under way ends on its own (its request's timeouts)."""
        self._wait(futures, what, cancel=True)
        for f in futures:
            if f.done() and _failed(f):
                _cancel(futures)
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _wait(self, futures: Sequence[Future], what: str, cancel: bool) -> None:
        pending = [f for f in futures if not f.done()]
        if len(pending) < len(futures) and any(_failed(f) for f in futures if f.done()):
            return
        while pending:
            probe = _probe
            left = self.expires - time.monotonic()
            if left <= 0:
                if cancel:
                    _cancel(futures)
                raise self.exceeded(what)
            step = None if math.isinf(left) else left
            if probe is not None:
                step = INTERRUPT_POLL_S if step is None else min(step, INTERRUPT_POLL_S)
            done, not_done = wait_futures(pending, timeout=step, return_when=FIRST_EXCEPTION)
            if any(_failed(f) for f in done):
                return
            pending = list(not_done)
            if pending and probe is not None and probe():
                if cancel:
                    _cancel(futures)
                raise Interrupted(f"{what}: interrupted")

    # ---- running work of a read in another thread ---------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this thread under this deadline, as work a reader waits for."""
        saved = (getattr(_local, "deadline", None), getattr(_local, "worker", False))
        _local.deadline, _local.worker = self, True
        try:
            return fn(*args)
        finally:
            _local.deadline, _local.worker = saved

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.remaining())))


def _failed(f: Future) -> bool:
    """``f`` (done) raised."""
    return not f.cancelled() and f.exception() is not None


def _cancel(futures: Sequence[Future]) -> None:
    for f in futures:
        f.cancel()  # only those not started: a request under way ends on its own timeouts


_local = threading.local()


def current() -> Deadline | None:
    """The deadline of the read in progress on this thread, if any."""
    return getattr(_local, "deadline", None)


def in_worker() -> bool:
    """True on a thread doing work for a read whose reader waits for it under the deadline."""
    return getattr(_local, "worker", False)


@contextmanager
def scope(seconds: float | None, error: Callable[[str], BaseException] = DeadlineExceeded) -> Iterator[Deadline]:
    """The deadline of the read in progress on this thread, or a new one of ``seconds``
    for the duration (a read's layers each open a scope; the outermost one sets the time)."""
    outer = getattr(_local, "deadline", None)
    if outer is not None:
        yield outer
        return
    d = Deadline(seconds, error)
    _local.deadline = d
    try:
        yield d
    finally:
        _local.deadline = None
