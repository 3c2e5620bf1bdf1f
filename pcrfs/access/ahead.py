"""Record prefixes fetched ahead of a ``RecordShuffleSampler``'s order: decoding overlaps the download.

Readers find a record's prefix only when they read its images: each record that joins
the sampler's window is first read image by image while the store's prefix policy
(:mod:`pcrfs.store.read.prefixpolicy`) gathers evidence that the reads are an epoch and stay in
few records, then a worker waits for its prefix while the others wait for it too. The
sampler knows better: its epoch order is fixed, and it hands indices to the loader
ahead of the workers.

:class:`FetchAhead` is a thread in the process that iterates the sampler (the training
script's). Each time the sampler has handed out more indices it looks at the positions
``[p - behind, p + ahead)`` of this rank's order around the position ``p`` handed out so
far -- the records the workers read now (their batches in flight are behind ``p``) and
those that join the window next -- and asks for their prefixes (``fetch(r, k)``), in the
order the records are first needed, as far as their prefixes fit in 90 % of the cache
that will hold them together. Who fetches is the caller's: the FUSE-free dataset's
shared cache (``pcrfs.torch.ImageFolder.fetch_ahead``), or a mount's daemon told
through an extended attribute (:func:`mount_fetcher`; the sampler does this by itself
over a mounted view).

Bounded on purpose: a record is asked for only if it fits beside the records the workers
read now (as far as ``behind`` positions tell: batches in flight further back than that
are not seen), so as not to push one of those out to make room for one they read later;
where the cache holds no more than the window, little is fetched ahead and the workers
fetch as before. It reads the sampler's live iterator and changes nothing in it: the
sampler's state, resume and order are as without it. ``ahead`` defaults to the mean
number of images per record, ``behind`` to twice that (it should cover the loader's
batches in flight). It holds the sampler weakly: a sampler no longer used stops it.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from typing import Any, Callable

import numpy as np

log = logging.getLogger("pcrfs.access.ahead")

POLL_S = 0.01     # how often the sampler's position is looked at
HEADROOM = 0.9    # the share of the cache that records in use and fetched ahead may fill (as the window)
AHEAD_XATTR = "user.pcrfs.fetch_ahead."  # the mount's hint (pcrfs/fuse/ops.py answers it)
HINT_RECORDS = 64                        # records one hint may name (the mount's limit)


def sampler_position(sampler: Any) -> tuple[Any, list[int], int] | None:
    """(the live iterator, this rank's share of the epoch, the position handed out so far) of
    a ``RecordShuffleSampler`` that is being iterated, or None. Reads its iterator only."""
    it = getattr(sampler, "_iterator", None)
    share = getattr(it, "_share", None)
    if share is None:
        return None
    return it, share, int(it.start) + int(it.yielded)


def mount_fetcher(mountpoint: str | os.PathLike) -> Callable[[int, int], Any]:
    """``fetch(r, k)`` that asks the pcrfs mount at ``mountpoint`` to fetch record r's prefix
    at fidelity k in the background (one ``getxattr`` on the mount's root; the daemon
    answers at once). A mount that does not know the hint (an older daemon) raises OSError."""
    root = os.fspath(mountpoint)

    def fetch(r: int, k: int) -> bool:
        return os.getxattr(root, f"{AHEAD_XATTR}{int(r)}.{int(k)}") != b"0"

    return fetch


class FetchAhead:
    """Asks ``fetch(r, k)`` for the record prefixes ``sampler``'s order needs next.

    ``record_of[j]``: the record of the sampler's index j; ``bounds``: the store's
    :func:`~pcrfs.store.read.prefixpolicy.group_bounds`; ``record_ks()``: (a key that changes with
    the view, i8[R] the groups of each record's prefix the view reads: 0 for none);
    ``capacity``: bytes of the cache the prefixes go to (0: do nothing)."""

    def __init__(self, sampler: Any, record_of: np.ndarray, bounds: np.ndarray,
                 record_ks: Callable[[], tuple[Any, np.ndarray]], capacity: int,
                 fetch: Callable[[int, int], Any], ahead: int | None = None, behind: int | None = None,
                 start: bool = True) -> None:
        self._sampler = weakref.ref(sampler)
        self._record_of = np.asarray(record_of, dtype=np.int64)
        self._bounds = np.asarray(bounds, dtype=np.int64)
        self._record_ks = record_ks
        self.capacity = max(0, int(capacity))
        self._fetch = fetch
        used = max(1, len(np.unique(self._record_of)))
        mean = max(1, len(self._record_of) // used)
        self.ahead = mean if ahead is None else max(0, int(ahead))
        # the loader's batches in flight (prefetch_factor x workers x batch) are behind p
        self.behind = 2 * mean if behind is None else max(0, int(behind))
        self._view: Any = object()
        self._ks = self._spans = np.zeros(0, dtype=np.int64)
        self._it: Any = None
        self._order = np.zeros(0, dtype=np.int64)
        self._last = -1
        self._asked: dict[int, Any] = {}  # record -> what fetch answered, this epoch
        self.submitted = 0
        self.failed: BaseException | None = None  # why the thread stopped, if it did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcrfs-fetch-ahead", daemon=True)
        self.active = bool(self.capacity) and start
        if self.active:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if self._sampler() is None:
                return  # the sampler is gone: nothing to look ahead of
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - fetching ahead is advice: the readers fetch what they need
                self.failed = e
                log.warning("fetching record prefixes ahead of the sampler failed (%s); stopped", e)
                return

    def step(self) -> int:
        """Look at the sampler once; how many prefixes were asked for."""
        sampler = self._sampler()
        at = sampler_position(sampler) if sampler is not None else None
        if at is None:
            return 0
        it, share, p = at
        if it is not self._it:  # a new epoch (or a resumed one): its order
            self._it, self._order, self._asked, self._last = it, np.asarray(share, dtype=np.int64), {}, -1
        if p == self._last:
            return 0
        self._last = p
        self._check_view()
        recs = self._record_of[self._order[max(0, p - self.behind):min(len(self._order), p + self.ahead)]]
        _, first = np.unique(recs, return_index=True)
        budget, used, asked = HEADROOM * self.capacity, 0, 0
        for r in recs[np.sort(first)].tolist():  # in the order the records are (first) needed
            used += int(self._spans[r])
            if used > budget:
                break  # room only by pushing out a record in use: the readers fetch it when they need it
            if r not in self._asked and self._ks[r] > 0:
                self._asked[r] = self._fetch(r, int(self._ks[r]))
                asked += 1
        self.submitted += asked
        return asked

    def _check_view(self) -> None:
        """Each record's prefix at the view read now (re-derived when the view changes)."""
        key, ks = self._record_ks()
        if key == self._view:
            return
        self._ks = np.asarray(ks, dtype=np.int64)
        self._spans = self._bounds[np.arange(len(self._bounds)), self._ks] - self._bounds[:, 0]
        self._view = key

    def close(self) -> None:
        """Stop looking (fetches under way finish)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "FetchAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fixed_ks(n_records: int, k: int) -> np.ndarray:
    """i8[R]: every record's prefix read at ``k`` groups (a ``scanK`` or ``full`` view)."""
    return np.full(n_records, max(int(k), 0), dtype=np.int64)
