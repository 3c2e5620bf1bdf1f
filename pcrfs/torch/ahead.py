"""Record prefixes fetched ahead of a ``RecordShuffleSampler``'s order: decoding overlaps the download.

DataLoader workers find a record's prefix only when they read its images: each record
that joins the sampler's window is first read image by image (a mixed record's prefix
is fetched after a few of its images, :mod:`pcrfs.store.prefix`), then a worker waits
for its prefix while the others wait for it too. The sampler knows better: its epoch
order is fixed, and it hands indices to the loader ahead of the workers.

:class:`FetchAhead` (``ImageFolder.fetch_ahead(sampler)``) is a thread in the process
that iterates the sampler (the training script's). Each time the sampler has handed
out more indices it looks at the positions ``[p - behind, p + ahead)`` of this rank's
order around the position ``p`` handed out so far -- the records the workers read now
(their batches in flight are behind ``p``) and those that join the window next -- and
fetches their prefixes in the background into the dataset's shared cache
(:mod:`pcrfs.store.sharedcache`), in the order the records are first needed, as far as
their prefixes fit in 90 % of the cache's cap together. The workers then find them
there (or wait for the fetch in flight: one flight per record across the processes).

Bounded on purpose: a record is fetched ahead only if it fits beside the records the
workers read now (as far as ``behind`` positions tell: batches in flight further back
than that are not seen), so as not to push one of those out to make room for one they
read later; where the cache holds no more than the window, little is fetched ahead and
the workers fetch as before. It needs the shared cache (a remote
store, ``shared_cache=True``); otherwise it does nothing. It reads the sampler's live
iterator and changes nothing in it: the sampler's state, resume and order are as
without it. ``ahead`` defaults to the mean number of images per record, ``behind`` to
twice that (it should cover the loader's batches in flight).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..store.prefix import group_bounds

log = logging.getLogger("pcrfs.torch")

POLL_S = 0.01     # how often the sampler's position is looked at
HEADROOM = 0.9    # the share of the cache that records in use and fetched ahead may fill (as the window)


def sampler_position(sampler: Any) -> tuple[Any, list[int], int] | None:
    """(the live iterator, this rank's share of the epoch, the position handed out so far) of
    a ``RecordShuffleSampler`` that is being iterated, or None. Reads its iterator only."""
    it = getattr(sampler, "_iterator", None)
    share = getattr(it, "_share", None)
    if share is None:
        return None
    return it, share, int(it.start) + int(it.yielded)


class FetchAhead:
    """Fetches record prefixes ahead of ``sampler``'s order into ``dataset``'s shared cache."""

    def __init__(self, dataset: Any, sampler: Any, ahead: int | None = None, behind: int | None = None) -> None:
        self.dataset, self.sampler = dataset, sampler
        self.store = dataset._open()
        self.capacity = int(dataset._options.shared_cache_bytes) if dataset._options.shared_cache else 0
        self.active = bool(self.capacity) and self.store.serves_prefixes
        index = self.store.index
        self._record_of = index.records_of(np.asarray(dataset._images))  # dataset index -> record
        used = max(1, len(np.unique(self._record_of)))
        mean = max(1, len(self._record_of) // used)
        self.ahead = mean if ahead is None else max(0, int(ahead))
        # the loader's batches in flight (prefetch_factor x workers x batch) are behind p
        self.behind = 2 * mean if behind is None else max(0, int(behind))
        self._bounds = group_bounds(index.record_group_offsets, index.records["size"])
        self._view: str | None = None
        self._ks = self._spans = np.zeros(0, dtype=np.int64)
        self._it: Any = None
        self._order = np.zeros(0, dtype=np.int64)
        self._last = -1
        self._asked: dict[int, Future | None] = {}  # record -> its fetch, this epoch
        self.submitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pcrfs-fetch-ahead", daemon=True)
        if self.active:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - fetching ahead is advice: the workers fetch what they need
                log.exception("fetching record prefixes ahead of the sampler failed; stopped")
                return

    def step(self) -> int:
        """Look at the sampler once; how many prefixes were asked for."""
        at = sampler_position(self.sampler)
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
                break  # room only by pushing out a record in use: the workers fetch it when they need it
            if r not in self._asked:
                self._asked[r] = self.store.fetch_prefix_ahead(r, int(self._ks[r]))
                asked += 1
        self.submitted += asked
        return asked

    def _check_view(self) -> None:
        """Each record's prefix at the dataset's view now: the largest k its images are read at."""
        view_name = self.dataset.view
        if view_name == self._view:
            return
        view = self.dataset._view_now()
        n_records = len(self._bounds)
        if view.ks is None:
            ks = np.full(n_records, min(max(int(view.k), 1), self.store.num_groups), dtype=np.int64)
        else:
            ks = np.zeros(n_records, dtype=np.int64)
            images = np.arange(self.store.num_images)
            np.maximum.at(ks, self.store.index.records_of(images), np.asarray(view.ks, dtype=np.int64)[images])
            ks = np.clip(ks, 0, self.store.num_groups)
        self._ks = ks
        self._spans = self._bounds[np.arange(n_records), ks] - self._bounds[:, 0]
        self._view = view_name

    def close(self) -> None:
        """Stop looking (fetches under way finish)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "FetchAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
