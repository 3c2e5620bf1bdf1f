"""A record-aware shuffle: indices for ``ImageFolder`` over a mount that keep few records open.

A uniform shuffle reads every record of a store all through the epoch, so a
record-prefix cache (:mod:`pcrfs.store.read.prefixpolicy`) must hold the whole view to
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

**Sized by the mount.** Given a mounted view (``MNT/scan5``), everything comes
from the mount: the catalogue from the local copy of the index it serves (its
``/.pcrfs/stats`` says where, with the sizes and CRC-32s to check it against --
no network, no credentials, also for an ``s3://`` store), and the window from
the cache it keeps (its ``--cache-size``, or its disk cache if larger): as many
records as 90 % of it holds, at their largest prefix for the view. Where records
are fetched as whole prefixes (remote stores, and mounts of them), a window asked
for that does not fit is clamped, with a :class:`WindowWarning`; a local store is
read image by image, so any window costs the same bytes there. A store URL takes
``storage_options`` as ``pcrfs.torch.ImageFolder`` does; only its manifest and
index are read (no record client is opened).

**Ranks.** Like ``DistributedSampler``: ``rank``/``world_size`` give each rank a
disjoint, contiguous share of the epoch's order (so each rank opens only its
own records), all shares of equal length -- the last ones padded with indices
from the start of the order unless ``drop_last`` -- and ``set_epoch(e)``
reshuffles deterministically from ``(seed, e)``: the epoch's global order is a
pure function of (seed, epoch, window, catalogue).

**Resume** (the ``Stateful`` protocol of torchdata's ``StatefulDataLoader``):
:meth:`~RecordShuffleSampler.state_dict` is a few numbers -- epoch, seed,
window, view, the catalogue's identity (image count and a hash of the images and
their records) and the *progress*: per phase of the epoch, the world size and
how many indices each rank had been handed. The iterator counts what it yields,
and ``StatefulDataLoader`` snapshots the sampler in the main process as it hands
each batch's indices to the workers, so a resume is exact under prefetching.
:meth:`~RecordShuffleSampler.load_state_dict` refuses a state of another
catalogue, seed, window, view or ``drop_last`` (ValueError), and resumes:

* on the same number of ranks, each rank where its share left off (the
  uninterrupted epoch, same order);
* on another number of ranks (**elastic**): in lockstep data-parallel training
  every rank has been handed the same number of indices, so one rank's state
  describes the job: the indices no rank has seen -- the epoch's order minus the
  first ``c`` of every old share -- are split again, in order and contiguously,
  over the new ranks (padded as above). Every unseen index comes exactly once;
  only padding repeats.

A state saved once its epoch was handed out completely resumes at the start of
the next epoch. The state's epoch wins over an earlier ``set_epoch``; a
``set_epoch`` to another epoch after ``load_state_dict`` drops the resume.

Shuffle quality against the window is measured by ``tools/bench_shuffle.py``
(README, "Shuffled training from object storage"). No torch import: this module
only computes indices.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .imagefolder import imagefolder_order

DEFAULT_CACHE_BYTES = 256 << 20   # the mount's default --cache-size
HEADROOM = 0.9                    # the share of a cache the window may fill (as the mount's prefix policy)
STATE_VERSION = 1


class WindowWarning(UserWarning):
    """A window asked for does not fit the cache that serves it, and was clamped."""


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


def share_length(n: int, world_size: int, drop_last: bool) -> int:
    """Indices per rank when ``n`` are split over ``world_size`` ranks."""
    return n // world_size if drop_last else -(-n // world_size)


def split(order: np.ndarray, world_size: int, drop_last: bool) -> np.ndarray:
    """``[world_size, m]``: contiguous equal shares of ``order``, padded from its start
    (as ``DistributedSampler``) unless ``drop_last``, which leaves the tail out instead."""
    m = share_length(len(order), world_size, drop_last)
    return np.resize(np.asarray(order, dtype=np.int64), m * world_size).reshape(world_size, m)


def unseen(order: np.ndarray, progress: list[tuple[int, int]], drop_last: bool) -> np.ndarray:
    """The indices of ``order`` (a permutation) no rank was handed after ``progress``, in
    order: phase by phase, ``(world_size, c)`` splits what is left and takes the first ``c``
    of every share. ValueError if a phase hands out more than its shares hold."""
    left = np.asarray(order, dtype=np.int64)
    for world_size, handed in progress:
        shares = split(left, world_size, drop_last)
        if handed > shares.shape[1]:
            raise ValueError(f"the state says each of {world_size} ranks was handed {handed} indices, "
                             f"but their shares held {shares.shape[1]}")
        if handed:
            seen = np.zeros(len(order), dtype=bool)
            seen[shares[:, :handed].ravel()] = True
            left = left[~seen[left]]
    return left


@dataclass(frozen=True)
class _Resume:
    epoch: int
    closed: tuple[tuple[int, int], ...]  # phases before this one: (world_size, indices per rank)
    start: int                            # indices this rank's share of the current phase already handed out


class _SamplerIterator(Iterator[int]):
    """One pass over a rank's share; counts what it yields (the sampler's state reads it).

    DataLoaders make spare iterators (torchdata's batch sampler calls ``iter`` at once,
    and a loader with workers makes one iterator and then another in its ``_reset``), so
    nothing happens until the first ``next``: the share is computed then, and a resume
    from ``load_state_dict`` is used up by the first iterator that yields, not by the
    first one made."""

    def __init__(self, sampler: "RecordShuffleSampler", epoch: int, resume: _Resume | None) -> None:
        self.sampler = sampler
        self.epoch = epoch
        self.resume = resume
        self.closed = resume.closed if resume else ()
        self.start = resume.start if resume else 0
        self.world_size = sampler.world_size
        self.yielded = 0
        self._share: list[int] | None = None

    def __iter__(self) -> "_SamplerIterator":
        return self

    def __next__(self) -> int:
        share = self._share
        if share is None:
            share = self._share = self.sampler._share(self.epoch, self.closed).tolist()
            if self.resume is not None and self.sampler._resume is self.resume:
                self.sampler._resume = None  # used up: the next iterator starts the epoch afresh
        pos = self.start + self.yielded
        if pos >= len(share):
            raise StopIteration
        self.yielded += 1
        return share[pos]

    def progress(self) -> list[tuple[int, int]]:
        return [*self.closed, (self.world_size, self.start + self.yielded)]


class RecordShuffleSampler:
    """``sampler=`` for a DataLoader over ``ImageFolder(view of a pcrfs store)``; see the module doc.

    ``path_or_store``: a mounted view (``MNT/scan5``) or a mount's root (then ``view``
    names the view), a store's path or URL (``storage_options`` as for
    ``pcrfs.torch.ImageFolder``), or an open :class:`~pcrfs.store.read.reader.Store`.
    ``window`` (records) defaults to what fits ``cache_bytes``, which defaults to the
    cache of the mount (or of a store opened with ``storage_options``); ``cache_bytes``
    above a mount's cache is taken down to it.
    """

    def __init__(self, path_or_store: Any, view: str = "full", window: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 cache_bytes: int | None = None, storage_options: Mapping[str, Any] | None = None,
                 fetch_ahead: bool = True) -> None:
        _check(window, rank, world_size)
        source = _open(path_or_store, view, storage_options)  # opens no record client: nothing to close
        images = imagefolder_order(source.store).images  # the dataset's (and torchvision's) order
        record_of = source.store.index.records_of(images)
        budget = source.cache_bytes
        if cache_bytes is not None:
            if source.is_mount and cache_bytes > budget:
                warnings.warn(f"cache_bytes={cache_bytes} is more than {source.cache_what} keeps "
                              f"({budget} bytes): the window is sized for {budget}", WindowWarning, stacklevel=2)
            else:
                budget = int(cache_bytes)
        fits = default_window(source.store, source.view, budget)
        if window is None:
            window = fits
            if source.prefixes and source.store.index.shuffled:
                window = ahead_window(fits)
        elif window > fits and source.prefixes:
            need = window_bytes(source.store, source.view, window)
            warnings.warn(f"window={window} records does not fit {source.cache_what} ({budget} bytes): "
                          f"{fits} records' largest {source.view} prefixes fit in {HEADROOM:.0%} of it, so "
                          f"records would be fetched again and again (up to several times the view's bytes); "
                          f"using window={fits}. For window={window}, give it a cache of at least {need} "
                          f"bytes ({source.cache_knob})", WindowWarning, stacklevel=2)
            window = fits
        fingerprint = catalogue_fingerprint(images, record_of, source.store.index.paths.blob())
        self._init(images, record_of, window, seed, rank, world_size, drop_last, fingerprint)
        self.view = source.view
        self.cache_bytes = budget
        if fetch_ahead and source.mount is not None and source.prefixes:
            self._mount_ahead = (source.mount, source.store, budget)

    @classmethod
    def from_records(cls, record_of: np.ndarray, window: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                     drop_last: bool = False) -> "RecordShuffleSampler":
        """A sampler over items ``0..n-1`` where item j lives in record ``record_of[j]`` (no store)."""
        self = cls.__new__(cls)
        record_of = np.asarray(record_of, dtype=np.int64)
        images = np.arange(len(record_of))
        self._init(images, record_of, window, seed, rank, world_size, drop_last,
                   catalogue_fingerprint(images, record_of))
        self.view = None
        self.cache_bytes = None
        return self

    def _init(self, images: np.ndarray, record_of: np.ndarray, window: int, seed: int, rank: int,
              world_size: int, drop_last: bool, fingerprint: str) -> None:
        _check(window, rank, world_size)
        self.images = images          # dataset index -> store image
        self.record_of = record_of    # dataset index -> record
        self.window = int(window)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.fingerprint = fingerprint  # the catalogue's identity (images, their records, their names)
        self.epoch = 0
        n = len(images)
        self.num_samples = share_length(n, world_size, drop_last)
        self._orders: tuple[tuple[int, int, int], np.ndarray] | None = None  # the last epoch's order, cached
        self._resume: _Resume | None = None            # from load_state_dict, until an iterator yields
        self._iterator: _SamplerIterator | None = None  # the last one handed out (its count is the state)
        self._mount_ahead: tuple[Path, Any, int] | None = None  # (mount, catalogue, cache) to hint
        self._ahead: Any = None  # the FetchAhead telling that mount the records coming next

    def set_epoch(self, epoch: int) -> None:
        """The epoch to shuffle for; another epoch than a loaded state's drops that resume."""
        self.epoch = int(epoch)
        if self._resume is not None and self._resume.epoch != self.epoch:
            self._resume = None

    def set_view(self, view: str) -> None:
        """Record the view the dataset reads now (a fidelity schedule): the state carries it.
        The window stays as it was made: size it for the schedule's largest view."""
        self.view = view

    def _order_of(self, epoch: int) -> np.ndarray:
        key = (self.seed, int(epoch), self.window)
        if self._orders is None or self._orders[0] != key:
            rng = np.random.default_rng([self.seed, int(epoch)])
            self._orders = (key, record_shuffle(self.record_of, self.window, rng))
        return self._orders[1]

    def order(self) -> np.ndarray:
        """This epoch's whole order (all ranks), before it is split."""
        return self._order_of(self.epoch)

    def indices(self) -> np.ndarray:
        """This rank's share of this epoch (from its start)."""
        return split(self.order(), self.world_size, self.drop_last)[self.rank]

    def _share(self, epoch: int, closed: tuple) -> np.ndarray:
        """This rank's share of what ``closed`` phases of ``epoch`` left unseen."""
        left = unseen(self._order_of(epoch), list(closed), self.drop_last)
        return split(left, self.world_size, self.drop_last)[self.rank]

    def __iter__(self) -> Iterator[int]:
        resume = self._resume if self._resume is not None and self._resume.epoch == self.epoch else None
        it = _SamplerIterator(self, self.epoch, resume)
        self._iterator = it
        if self._mount_ahead is not None and self._ahead is None:
            self._ahead = self._start_mount_ahead(*self._mount_ahead)
        return it

    def _start_mount_ahead(self, mount: Path, catalogue: Any, cache: int) -> Any:
        """Tell the mount which records this rank's order reads next, so it fetches their
        prefixes before the workers ask (:mod:`pcrfs.access.ahead`): no record is read image by
        image while the mount's policy learns that the reads are local. Not for adaptive
        views (their k varies per image; the mount's policy serves them as before)."""
        from .ahead import FetchAhead, fixed_ks, mount_fetcher
        from ..store.read.prefixpolicy import group_bounds

        index = catalogue.index
        bounds = group_bounds(index.record_group_offsets, index.records["size"])

        def record_ks() -> tuple[str | None, np.ndarray]:
            view = self.view or ""
            adaptive = not (view == "full" or (view.startswith("scan") and view[4:].isdigit()))
            return view, fixed_ks(len(bounds), 0 if adaptive else _view_k(catalogue, view))

        return FetchAhead(self, self.record_of, bounds, record_ks, cache, mount_fetcher(mount))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ahead"] = None  # a thread: the copy starts its own when iterated
        return state

    def __len__(self) -> int:
        """Indices per rank in a whole epoch (a resumed one yields what is left of it)."""
        return self.num_samples

    # ---- resume ------------------------------------------------------------------------------

    def _progress(self) -> list[tuple[int, int]]:
        if self._resume is not None and self._resume.epoch == self.epoch:
            return [*self._resume.closed, (self.world_size, self._resume.start)]
        it = self._iterator
        if it is not None and it.epoch == self.epoch:
            return it.progress()
        return [(self.world_size, 0)]

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: the indices its iterator handed out (to a
        ``StatefulDataLoader``, which snapshots this as it sends each batch to a worker)."""
        progress = self._progress()
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "window": self.window,
            "drop_last": self.drop_last,
            "view": self.view,
            "images": len(self.images),
            "fingerprint": self.fingerprint,
            "rank": self.rank,
            "world_size": self.world_size,
            "progress": [[w, c] for w, c in progress],  # per phase: world size, indices handed to each rank
            "samples": sum(c for _, c in progress),    # indices this rank was handed this epoch
        }

    @staticmethod
    def state_in(loader_state: Mapping[str, Any]) -> dict[str, Any] | None:
        """The sampler's state inside a ``StatefulDataLoader.state_dict()`` (wherever that
        keeps it: with or without workers, under a batch sampler or not), or None. Its loader
        state resumes only a loader with as many workers; this one resumes the sampler of
        any loader (``sampler.load_state_dict(RecordShuffleSampler.state_in(saved))``)."""
        if not isinstance(loader_state, Mapping):
            return None
        if loader_state.get("version") == STATE_VERSION and "fingerprint" in loader_state:
            return dict(loader_state)
        for value in loader_state.values():
            found = RecordShuffleSampler.state_in(value)
            if found is not None:
                return found
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state`` (of any rank, on any number of ranks; see the module doc).
        ValueError, changing nothing, if it is not a state of this sampler's catalogue,
        seed, window, view and ``drop_last``."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a RecordShuffleSampler state (version {STATE_VERSION}): "
                             f"{str(state)[:120]}")
        try:
            epoch = int(state["epoch"])
            progress = [(int(w), int(c)) for w, c in state["progress"]]
            theirs = {k: state[k] for k in ("images", "fingerprint", "seed", "window", "drop_last", "view")}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a RecordShuffleSampler state with a missing or malformed field: {e}") from None
        if not progress or any(w < 1 or c < 0 for w, c in progress) or epoch < 0:
            raise ValueError(f"a RecordShuffleSampler state with a malformed progress: {state['progress']!r}")
        n = len(self.images)
        if theirs["images"] != n:
            raise ValueError(f"the state is of a catalogue of {theirs['images']} images, this sampler's has {n}: "
                             "another store (or another view tree of it)")
        if theirs["fingerprint"] != self.fingerprint:
            raise ValueError(f"the state is of another catalogue (fingerprint {theirs['fingerprint']}, this one "
                             f"{self.fingerprint}): the same number of images, but other names or another record "
                             "membership -- another store, or one converted again")
        if theirs["seed"] != self.seed:
            raise ValueError(f"the state was saved with seed {theirs['seed']}, this sampler has seed {self.seed}")
        if theirs["window"] != self.window:
            raise ValueError(f"the state was saved with window={theirs['window']}, this sampler has "
                             f"window={self.window}: its epoch order would differ. Make the sampler with "
                             f"window={theirs['window']} (on a mount whose cache holds that many records)")
        if bool(theirs["drop_last"]) != self.drop_last:
            raise ValueError(f"the state was saved with drop_last={theirs['drop_last']}, this sampler has "
                             f"drop_last={self.drop_last}")
        if theirs["view"] != self.view:
            raise ValueError(f"the state was saved at view {theirs['view']!r}, this sampler is at view "
                             f"{self.view!r} (set_view() to the view the dataset resumes at)")
        *closed, (world, handed) = [(w, c) for w, c in progress]
        left = unseen(self._order_of(epoch), closed, self.drop_last)  # also checks every phase
        per_rank = share_length(len(left), world, self.drop_last)
        if handed > per_rank:
            raise ValueError(f"the state says each of {world} ranks was handed {handed} indices, "
                             f"but their shares held {per_rank}")
        closed = tuple((w, c) for w, c in closed if c)
        self._iterator = None
        if handed == per_rank:  # the epoch was handed out completely: the next one starts
            self.epoch, self._resume = epoch + 1, None
        elif world == self.world_size:  # the same shares, each where it left off
            self.epoch, self._resume = epoch, _Resume(epoch, closed, handed)
        else:  # elastic: what no rank has seen, split over this job's ranks
            self.epoch, self._resume = epoch, _Resume(epoch, closed + (((world, handed),) if handed else ()), 0)


def _check(window: int | None, rank: int, world_size: int) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 record, got {window}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")


def catalogue_fingerprint(images: np.ndarray, record_of: np.ndarray, names: Any = None) -> str:
    """A short hash of a catalogue: the store images in dataset order, the record of each
    and (when given) the store's path table. Two samplers make the same epochs from the same
    (seed, window) only if these agree."""
    h = hashlib.sha256(b"pcrfs RecordShuffleSampler catalogue v1\0")
    h.update(np.int64(len(images)).tobytes())
    h.update(np.ascontiguousarray(images, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(record_of, dtype=np.int64).tobytes())
    if names is not None:
        h.update(memoryview(names).cast("B"))
    return h.hexdigest()[:16]


def _prefix_spans(store: Any, view: str) -> np.ndarray:
    """Bytes of each (non-empty) record's prefix at ``view``."""
    from ..store.read.prefixpolicy import group_bounds

    k = _view_k(store, view)
    bounds = group_bounds(store.index.record_group_offsets, store.index.records["size"])
    spans = bounds[:, k] - bounds[:, 0]
    return spans[spans > 0]


# records kept beyond the window: a DataLoader's batches in flight still read the record that
# just left the window (measured: a window filling the cache fetched 1-3 prefixes twice an epoch)
IN_FLIGHT_RECORDS = 1


def default_window(store: Any, view: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> int:
    """How many record prefixes of ``view`` fit in ``cache_bytes`` (90 %, as the mount's policy),
    less IN_FLIGHT_RECORDS for the batches still in flight behind the window."""
    spans = _prefix_spans(store, view)
    if not len(spans):
        return 1
    fit = int(HEADROOM * cache_bytes // float(spans.max()))
    return max(1, fit - IN_FLIGHT_RECORDS)


def ahead_window(fits: int) -> int:
    """The default window of a store whose records mix the dataset (``--order shuffled``),
    where ``fits`` records fit the cache: half of them, rounded up. There every window gives
    a uniform shuffle's batches, so the rest of the cache is better spent on records fetched
    ahead of the sampler's order (:mod:`pcrfs.access.ahead`): measured on 15 records of 4 MiB with
    an 8 MiB cache, scan5 at 20 ms / 4 MB/s, decoding, a window of 2 took 7.0 s an epoch
    (1.00x the view's bytes) and one of 3 -- all that fits -- 8.3 s (1.07x)."""
    return max(1, -(-int(fits) // 2))


def window_bytes(store: Any, view: str, window: int) -> int:
    """The cache a window of ``window`` records of ``view`` needs (the inverse of :func:`default_window`)."""
    spans = _prefix_spans(store, view)
    return math.ceil((window + IN_FLIGHT_RECORDS) * float(spans.max()) / HEADROOM) if len(spans) else 0


def _view_k(store: Any, view: str) -> int:
    if view.startswith("scan") and view[4:].isdigit():
        return max(1, min(int(view[4:]), store.num_groups))
    return store.num_groups  # full; adaptive views (ssimNN): their largest k is at most this


# ---- where the catalogue comes from ------------------------------------------------------------

class _Catalogue:
    """A store's index opened without its records: all the sampler reads of a store
    (``imagefolder_order``, the window). Nothing here reads an image."""

    manifest: dict = {}  # no adaptive index: the views are scan1..scanN and full

    def __init__(self, index: Any, url: str) -> None:
        self.index = index
        self.url = self.root = url

    @property
    def num_groups(self) -> int:
        return self.index.num_groups

    @property
    def num_images(self) -> int:
        return self.index.num_images


@dataclass
class _Source:
    store: Any            # a Store or a _Catalogue
    view: str
    cache_bytes: int      # what the cache that will serve the records keeps
    cache_what: str       # that cache, for messages
    cache_knob: str       # how to make it larger, for messages
    # Whether that reader fetches whole record prefixes (remote stores; mounts of them): only
    # then does a window larger than its cache fetch records again and again. Local stores
    # are read image by image, from the page cache: any window costs the same bytes.
    prefixes: bool
    is_mount: bool = False
    mount: Path | None = None  # the mount's root, where the source is a mount


_DEFAULT_CACHE = "the default cache (the mount's default --cache-size)"


def _open(path_or_store: Any, view: str, storage_options: Mapping[str, Any] | None) -> _Source:
    """A Store, a mounted view or mount root, or a store's path or URL."""
    if hasattr(path_or_store, "index") and hasattr(path_or_store, "paths"):
        cache, prefixes = path_or_store.cache, bool(getattr(path_or_store, "serves_prefixes", False))
        if cache is not None and cache.capacity:
            return _Source(path_or_store, view, cache.capacity, "the store's memory cache", "cache_bytes=", prefixes)
        return _Source(path_or_store, view, DEFAULT_CACHE_BYTES, _DEFAULT_CACHE, "cache_bytes=", prefixes)
    from ..store.sources.location import names_a_store

    text = os.fspath(path_or_store)
    p = Path(text)
    if not names_a_store(text):  # a local path without a manifest: a mount, or a view of one
        for mnt, name in ((p.parent, p.name), (p, view)):  # MNT/scan5, or MNT with view=
            if (mnt / ".pcrfs" / "stats").exists():
                if storage_options:
                    raise ValueError(f"{text} is a pcrfs mount: it needs no storage_options (the mount has its own)")
                return _open_mount(mnt, name)
    return _open_location(text, view, storage_options)


def _open_mount(mnt: Path, view: str) -> _Source:
    """The catalogue a pcrfs mount serves, from the local index copy its stats name (no network,
    no credentials), and the cache it keeps."""
    from ..store.errors import StoreError
    from ..store.sources.location import local_directory

    stats = json.loads((mnt / ".pcrfs" / "stats").read_bytes())
    memory = int(stats.get("cache", {}).get("capacity", 0))
    disk = int(stats.get("io", {}).get("disk_cache", {}).get("capacity", 0))
    prefixes = "record_prefix" in stats.get("io", {})  # the mount fetches record prefixes
    what = f"the cache of the mount at {mnt}"
    knob = "the mount's --disk-cache-size" if disk > memory else "the mount's --cache-size"
    cache = max(memory, disk)  # as the mount's prefix policy: the larger of its caches holds the window
    info = stats.get("index") or {}
    if info.get("dir"):
        try:
            index = _load_index(Path(info["dir"]), info["files"], info["counts"], info.get("format_version", 1),
                                f"the index copy of the mount at {mnt} ({info['dir']})")
        except StoreError as e:  # unreadable by this user (a daemon of another), or changed since
            raise StoreError(f"{e}; give the sampler the store's location ({stats.get('store')}) and "
                             "storage_options instead") from None
        return _Source(_Catalogue(index, str(stats.get("store", mnt))), view, cache, what, knob, prefixes, True, mnt)
    store = str(stats.get("store", ""))
    if "index" not in stats and store and local_directory(store) is not None:  # a daemon before "index" stats
        source = _open_location(store, view, None)
        return _Source(source.store, view, cache, what, knob, prefixes, True, mnt)
    why = "its cache directory no longer has the copy: remount it" if "index" in stats else "remount it with this pcrfs"
    raise StoreError(f"the mount at {mnt} does not say where this machine holds its index ({why}); or give the "
                     f"sampler the store's location ({store}) and storage_options")


def _open_location(text: str, view: str, storage_options: Mapping[str, Any] | None) -> _Source:
    """The manifest and index of the store at a path or URL -- a remote index is downloaded
    once into the cache directory, as ``open_store`` does -- and nothing else: no record
    client (in particular no obstore client in a process that will fork DataLoader workers)."""
    from . import read_options
    from ..store import format as fmt
    from ..store.sources.location import open_location
    from ..store.format.manifest import parse_manifest

    options = read_options(storage_options)
    loc = open_location(text, options.remote, Path(options.disk_cache) if options.disk_cache else None)
    try:
        raw = loc.manifest_bytes()
        manifest = parse_manifest(raw, loc.describe(fmt.MANIFEST))
        index_dir, checked = loc.index_dir(manifest, raw)
    finally:
        _close_session(getattr(loc, "fs", None))
    index = _load_index(index_dir, None if checked else manifest["index_files"],
                        (manifest["num_images"], manifest["num_groups"], manifest["num_records"]),
                        manifest.get("format_version", 1), loc.url)
    # the caches open_store gives a store opened with these options (readahead's window raises
    # the memory cache), the larger of which holds the prefixes (as the prefix policy has it)
    readahead = options.readahead_for(loc)
    cache = max(int(options.cache_bytes), 4 * readahead if readahead else 0,
                int(options.disk_cache_bytes) if options.disk_cache else 0)
    on = options.record_prefix
    prefixes = loc.read_defaults.record_prefix if on is None else bool(on)
    knob = "storage_options cache_bytes / disk_cache_bytes"
    if cache:
        return _Source(_Catalogue(index, loc.url), view, cache, "the caches of a store opened with these "
                       "storage_options", knob, prefixes)
    return _Source(_Catalogue(index, loc.url), view, DEFAULT_CACHE_BYTES, _DEFAULT_CACHE, knob, prefixes)


def _close_session(fs: Any) -> None:
    """Close an s3fs filesystem's session now, in this process, while its event loop runs:
    run s3fs's own finalizer of it (a ``weakref.finalize``) at once. Left to the garbage
    collector it would run whenever a collection finds the filesystem (it sits in reference
    cycles): at interpreter exit, or in a forked DataLoader worker, against an event loop
    that is not its own."""
    if fs is None:
        return
    for fin in list(getattr(weakref.finalize, "_registry", {})):
        got = fin.peek()
        if got is not None and got[0] is fs:
            fin()  # runs once: detached from exit and collection afterwards


def _load_index(directory: Path, checks: dict | None, counts: Any, version: int, where: str) -> Any:
    """The index in ``directory`` of a store of format ``version``, checked against the
    manifest's sizes, CRC-32s and counts (as ``open_store`` checks it); StoreError naming
    ``where`` if it does not match."""
    from ..store.errors import StoreError
    from ..store.format.index import Index, IndexFileError

    counts = tuple(int(c) for c in counts)
    version = int(version)
    try:  # format 1 is Index.load's default (and the only format of pcrfs before format 2)
        index = Index.load(Path(directory), checks, counts, **({"version": version} if version != 1 else {}))
    except IndexFileError as e:
        raise StoreError(f"{where}: {e}") from None
    if (index.num_images, index.num_groups, len(index.records)) != counts:
        raise StoreError(f"{where}: index and manifest disagree on the image, scan group or record count")
    return index
