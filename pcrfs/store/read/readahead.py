"""Sequential readahead: when a loader walks a view in image order, fetch ahead.

PCR records are group-major, so groups 1..k of a run of consecutive images are
k contiguous spans of a record. A loader that reads a view in order (an epoch
with ``shuffle=False``, ``cp -r``, ``tar``) can therefore be served by a few
large requests instead of k small ones per image -- if somebody asks for them
in time. This module decides *what* to ask for; it does no I/O (the store's
fetcher does) and knows nothing about bytes or records.

Detection works on the stream of first accesses to (view fidelity k, image):

* an access is **sequential** when the ``min_run`` images before it were
  accessed recently (within the last ``history`` distinct accesses) and in
  order. Several readers walking different parts of a view at once (DataLoader
  workers taking alternate batches) each look sequential on their own;
* a sequential access asks for a **window** of the following images, ``growth``
  times as long as the run seen so far (``initial`` .. ``maximum`` images), starting
  after what was already asked for, and only once less than half a window is
  left ahead: two windows are in flight at most, and a reader that stops costs
  at most one unused window;
* a random access (shuffled epoch) asks for nothing, so shuffled reads fetch
  exactly what they need. The chance that a random access looks sequential is
  about (history / images)^min_run / 2.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Callable

Clip = Callable[[int, int, int], int]  # (first, end, k) -> a smaller end that fits a byte budget


class Readahead:
    """What to prefetch after each access; thread-safe, O(window) per access at worst."""

    def __init__(self, initial: int = 8, maximum: int = 256, min_run: int = 2, history: int = 32,
                 growth: int = 4, planned_memory: int = 16384) -> None:
        if not 1 <= initial <= maximum:
            raise ValueError("need 1 <= initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.min_run = min_run
        self.history = history
        self.growth = growth
        self._seq = itertools.count()
        self._recent: OrderedDict[tuple[int, int], int] = OrderedDict()   # (k, image) -> access number
        self._planned: OrderedDict[tuple[int, int], None] = OrderedDict()  # (k, image) already asked for
        self._planned_memory = planned_memory
        self._lock = threading.Lock()
        self.sequential = 0  # counters: accesses judged sequential / random
        self.random = 0
        self.windows = 0     # windows asked for
        self.images = 0      # images in them

    def access(self, image: int, k: int, limit: int, clip: Clip | None = None) -> tuple[int, int] | None:
        """Note a read of ``image`` at fidelity ``k``; return images [first, end) to prefetch, or None.

        ``limit`` is the number of images (nothing at or past it is asked for);
        ``clip`` may shorten a window to fit a byte budget.
        """
        with self._lock:
            key = (k, image)
            if key in self._recent:
                return None  # another chunk of a file already seen
            self._recent[key] = next(self._seq)
            while len(self._recent) > self.history:
                self._recent.popitem(last=False)
            run = self._run(image, k)
            if run < self.min_run:
                self.random += 1
                return None
            self.sequential += 1
            window = max(self.initial, min(self.maximum, self.growth * run))
            first = image + 1
            while (k, first) in self._planned and first < image + 1 + window:
                first += 1
            if first - (image + 1) >= window // 2:
                return None  # enough is on its way
            end = min(image + 1 + window, limit)
            if clip is not None and end > first:
                end = min(end, clip(first, end, k))
            if end <= first:
                return None
            for i in range(first, end):
                self._planned[(k, i)] = None
            while len(self._planned) > self._planned_memory:
                self._planned.popitem(last=False)
            self.windows += 1
            self.images += end - first
            return first, end

    def _run(self, image: int, k: int) -> int:
        """How many images just before ``image`` were read recently, each before the next."""
        run, later = 0, self._recent[(k, image)]
        while run < self.maximum:
            seq = self._recent.get((k, image - run - 1))
            if seq is None or seq > later:
                break
            run, later = run + 1, seq
        return run

    def stats(self) -> dict[str, int]:
        return {"sequential": self.sequential, "random": self.random, "windows": self.windows,
                "images": self.images}
