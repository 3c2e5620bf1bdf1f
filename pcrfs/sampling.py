"""A record-aware shuffle: indices for ``ImageFolder`` over a mount that keep few records open.

A uniform shuffle reads every record of a store all through the epoch, so a
record-prefix cache (:mod:`pcrfs.store.prefix`) must hold the whole view to
fetch each record once. :class:`RecordShuffleSampler` shuffles differently, in
the manner of MosaicML Streaming's shard shuffles: the records are taken in a
random order, and the indices of the images of a sliding **window** of
``window`` records are drawn at random, one at a time; when a record has given
all its images, the next record in the order joins the window. So at any moment
at most ``window`` records have images read and images still to come, and a
memory cache of ``window`` record prefixes fetches each record once an epoch.

Indices are positions in ``torchvision.datasets.ImageFolder`` order over a view
of the store (classes = sorted top-level directories, then each class's
directories by path, then file names), so the sampler is the ``sampler=`` of a
``DataLoader`` over ``ImageFolder(MNT/scan5)``. Images at the store's root (no
class) and names ImageFolder would skip are not yielded.

Like ``DistributedSampler``: ``rank``/``world_size`` give each rank a disjoint,
contiguous share of the epoch's order (so each rank opens only its own
records), all shares of equal length -- the last ones padded with indices from
the start of the order unless ``drop_last`` -- and ``set_epoch(e)`` reshuffles
deterministically from ``(seed, e)``.

Shuffle quality against the window is measured by ``tools/bench_shuffle.py``
(README, "Shuffled training from object storage"). No torch import: this module
only computes indices.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .imagefolder import imagefolder_order

DEFAULT_CACHE_BYTES = 256 << 20   # the mount's default --cache-size


def record_shuffle(record_of: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(record_of))`` (items, each in record ``record_of[j]``)
    in which at most ``window`` records are open (started, not finished) at any point."""
    n = len(record_of)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    records, inverse = np.unique(record_of, return_inverse=True)
    by_record = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(records))
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = rng.permutation(len(records)).tolist()
    members = [by_record[starts[r]:starts[r + 1]].tolist() for r in range(len(records))]
    remaining = counts.tolist()
    rec = inverse.tolist()
    pool: list[int] = []
    nxt = 0
    for _ in range(min(window, len(order))):
        pool += members[order[nxt]]
        nxt += 1
    draws = rng.random(n).tolist()
    out = np.empty(n, dtype=np.int64)
    for t in range(n):
        j = int(draws[t] * len(pool))
        item = pool[j]
        pool[j] = pool[-1]
        pool.pop()
        out[t] = item
        r = rec[item]
        remaining[r] -= 1
        if not remaining[r] and nxt < len(order):  # a record finished: the next one joins
            pool += members[order[nxt]]
            nxt += 1
    return out


class RecordShuffleSampler:
    """``sampler=`` for a DataLoader over ``ImageFolder(view of a pcrfs store)``; see the module doc."""

    def __init__(self, path_or_store: Any, view: str = "full", window: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        _check(window, rank, world_size)
        store, view, opened = _open(path_or_store, view)
        try:
            images = imagefolder_order(store).images  # the dataset's (and torchvision's) order
            record_of = store.index.records_of(images)
            if window is None:
                window = default_window(store, view, cache_bytes)
        finally:
            if opened:
                store.close()
        self._init(images, record_of, window, seed, rank, world_size, drop_last)
        self.view = view

    @classmethod
    def from_records(cls, record_of: np.ndarray, window: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                     drop_last: bool = False) -> "RecordShuffleSampler":
        """A sampler over items ``0..n-1`` where item j lives in record ``record_of[j]`` (no store)."""
        self = cls.__new__(cls)
        record_of = np.asarray(record_of, dtype=np.int64)
        self._init(np.arange(len(record_of)), record_of, window, seed, rank, world_size, drop_last)
        self.view = None
        return self

    def _init(self, images: np.ndarray, record_of: np.ndarray, window: int, seed: int, rank: int,
              world_size: int, drop_last: bool) -> None:
        _check(window, rank, world_size)
        self.images = images          # dataset index -> store image
        self.record_of = record_of    # dataset index -> record
        self.window = int(window)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        n = len(images)
        self.num_samples = n // world_size if drop_last else math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """This epoch's whole order (all ranks), before it is split."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return record_shuffle(self.record_of, self.window, rng)

    def indices(self) -> np.ndarray:
        """This rank's share of this epoch."""
        order = self.order()
        total = self.num_samples * self.world_size
        if total > len(order):  # pad as DistributedSampler does, from the start of the order
            reps = math.ceil(total / max(len(order), 1))
            order = np.tile(order, reps)[:total]
        share = order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples]
        return share

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def _check(window: int | None, rank: int, world_size: int) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 record, got {window}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")


def default_window(store: Any, view: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> int:
    """How many record prefixes of ``view`` fit in ``cache_bytes`` (90 %, as the mount's policy)."""
    from .store.prefix import group_bounds

    k = _view_k(store, view)
    bounds = group_bounds(store.index.record_group_offsets, store.index.records["size"])
    spans = bounds[:, k] - bounds[:, 0]
    spans = spans[spans > 0]
    if not len(spans):
        return 1
    return max(1, int(0.9 * cache_bytes // float(spans.max())))


def _view_k(store: Any, view: str) -> int:
    if view.startswith("scan") and view[4:].isdigit():
        return max(1, min(int(view[4:]), store.num_groups))
    return store.num_groups  # full; adaptive views (ssimNN): their largest k is at most this


def _open(path_or_store: Any, view: str) -> tuple[Any, str, bool]:
    """(store, view, whether we opened it): a Store, a store path or URL, or a view of a mount."""
    if hasattr(path_or_store, "index") and hasattr(path_or_store, "paths"):
        return path_or_store, view, False
    from .store.reader import open_store

    text = os.fspath(path_or_store)
    p = Path(text)
    if "://" not in text and not (p / "pcr.yaml").exists() and (p.parent / ".pcrfs" / "stats").exists():
        # MNT/scan5 of a pcrfs mount: the store it serves, and this view
        stats = json.loads((p.parent / ".pcrfs" / "stats").read_bytes())
        return open_store(stats["store"]), p.name, True
    return open_store(text), view, True
