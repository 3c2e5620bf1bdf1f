"""Record prefixes: when to fetch groups 1..k of a whole record instead of one image.

PCR records are group-major: groups 1..k of *every* image of record r form one
contiguous span at the start of the record, right after its header (see
docs/format.md). A shuffled epoch over ``scanK`` of a remote store therefore
need not cost k ranged GETs per image: one span per record -- fetched as a few
large parts -- serves every image of the record at that fidelity. Whether that
pays depends on whether the prefix stays cached until the record's other images
are read. This module decides; it does no I/O and knows nothing about bytes in
flight (the store's fetcher, :mod:`pcrfs.store.read.prefixtier`, does the fetching,
checking and caching).

The policy, per read of image i (record r) at fidelity k:

* **mode** -- chosen from the view's prefix bytes ``V(k)`` (the sum over records
  of their group-1..k spans) and the cache budgets:

  - ``VIEW`` when the disk cache (``--disk-cache-size``), or else the memory
    cache (``--cache-size``), holds ``V(k)`` with ``headroom`` to spare: every
    record's prefix is fetched on its first read. A shuffled epoch then costs
    about one request per part per record, and the next epoch none.
  - ``WINDOW`` when the view does not fit but the larger budget holds at least
    ``min_window`` average record prefixes (``fit`` of them): a record's prefix
    is fetched only while the reads are record-local, judged on the last
    ``history_factor * fit`` reads: they must touch at most ``fit`` distinct
    records -- as a record-aware sampler does
    (:class:`pcrfs.sampling.RecordShuffleSampler` with a window no larger than
    the cache). A uniform shuffle over R records touches about
    ``R (1 - exp(-history_factor * fit / R))`` of them, more than ``fit`` while
    less than ~90 % of the prefixes fit (in a simulation of 20,000 uniform reads
    with 10 prefixes fitting: 0.015 % of reads qualify over 20 records, none over
    30 or more), so it keeps reading image by image
    instead of fetching prefixes that would be evicted before the record's
    other images are read (with 30 % fitting, a prefix would serve ~1 % of its
    images) -- except, on a store whose records mix the dataset, where the cache
    holds at least ``PIN_MIN_SHARE`` of the records: there the first ``fit``
    records such reads meet are fetched and kept (*pinned*,
    :meth:`RecordPrefixPolicy._pin`), so that share of the reads is served by
    prefixes fetched once (measured: a path-order pass over a shuffled store with
    a cache holding 9 of its 15 records fetched 8.4x the view's bytes before
    pinning, 1.01x after). The first ``history_factor * fit`` reads of a mount are
    read image by image while the history fills: a fixed cost of about
    ``history_factor * fit * k`` requests.
  - ``IMAGES`` otherwise: per-image reads (every group of the image at once),
    as without this module -- also from the moment a fetched prefix could be kept
    in neither cache (the fetcher reports it: :meth:`RecordPrefixPolicy.not_kept`).

* **what to fetch** -- the span of groups ``held+1 .. k`` of record r, where
  ``held`` is what the caches already hold of r's prefix (0 for none): an
  adaptive view's reads, whose k varies per image, grow a record's prefix to the
  largest k read in it, one extension at a time.

* **in how many parts** -- ``ceil(span / part_bytes)`` parts, at most
  ``max_parts``, of equal size, fetched concurrently (one TCP stream seldom fills
  a fast link; a slow link is shared anyway).

* **the rest of the view, ahead of its reads** -- in ``VIEW`` mode, once reads at
  fidelity k have fetched the prefixes of ``prefetch_after`` distinct records (an
  epoch is under way, not a look at one file), every other record's prefix at k is
  fetched in the background (:meth:`RecordPrefixPolicy.prefetch`), a few at a time.
  Without it a loader finds the records one read at a time: each worker waits a
  request's latency and a prefix's transfer per record it meets first, with the link
  idle between (measured: 15 records of 4 MiB at 20 ms and 4 MB/s, scan1, a
  quarter of the epoch). ``VIEW`` mode fetches every record's prefix in an epoch
  anyway, so this moves the same requests and bytes earlier; a reader that stops
  after a few records has paid for the whole view (``--record-prefix off`` avoids it).

* **records that mix the dataset** (a shuffled store, format version 2) -- one class
  directory, or any small part of the tree, touches nearly every record with a few
  images each, so fetching a record's prefix on its first read would download the
  whole view for a ``cp -r`` of one class. There no prefix is fetched before the reads
  look like an epoch (:class:`EpochGate`): they must have touched at least two
  top-level directories (classes) and ``gate_images`` distinct images (0.5 % of the
  store). A copy of one class -- or of a few, at ImageNet scale -- never opens the gate,
  so it is read image by image, its own bytes once; a path-order pass opens it once its
  second class begins, a shuffled epoch at once. After that the modes apply as for any
  store: ``VIEW`` fetches a record's prefix on its first read and the rest of the view
  ahead at once (the gate already told an epoch from a look at a few files);
  ``WINDOW`` fetches while the reads stay in few records.

  Measured before the gate: per-record thresholds alone (a prefix after ``max(4, 0.5 %)``
  of a record's images) let a class's images cross a few records' thresholds, and three
  records fetched started the whole view's prefetch (8.6x a class's bytes on a 100-class
  store; ~1,000x simulated at ImageNet scale with a disk cache). With the gate they only
  made an epoch read more images one by one (a path-order pass: 160 of its 175
  requests on a 15-record store; a sampler over a mount, ~40 images per mount) and were
  dropped.

  The price of the gate, judged on reads alone, is fixed by the one-class copy it
  protects: a path-order pass would read its first class (and 0.5 % of the images) image
  by image, ``k`` requests each -- about ``k / classes`` requests per image of the epoch:
  ~0.02 GET per image at ``scan5`` with ImageNet's 1,000 classes, ~0.6 with 8 classes
  (measured: 0.53). Reads in path order cannot tell the two apart until the second class
  begins, but the listings can: a dataset loader lists every class directory before its
  first read (torchvision's ``ImageFolder``; ``pcrfs.torch.ImageFolder`` says so itself),
  a ``cp -r``/``tar`` of one class lists only its own. A listing of every class directory
  (:meth:`EpochGate.listed`) therefore opens the gate before the first read. A ``du`` or
  ``ls -R`` of a whole view followed by a copy of one class is read as an epoch: in
  ``VIEW`` mode that fetches the view's prefixes -- at most what the cache holds.

* **a reader that says what it reads** -- a ``RecordShuffleSampler`` over a mount (an
  extended attribute, :mod:`pcrfs.access.ahead`) or ``ImageFolder.fetch_ahead`` names the
  records it reads next, and they are fetched ahead of their reads; after that
  (:meth:`RecordPrefixPolicy.announce`) any read of a record whose prefix is not held
  fetches it at once: such a reader keeps at most a cache's worth of records open.

* **what to evict** -- nothing is chosen here: a record's prefix is one entry of
  the memory cache and one file of the disk cache, so both caches' LRU order
  drops least recently read records whole. ``VIEW`` mode keeps ``headroom`` so
  the view's own prefixes do not evict each other. Pinned prefixes are the
  exception: the memory cache evicts none (:meth:`RecordPrefixPolicy.is_pinned`,
  ``ByteLRU.keep_while``), as the mount's compiled path reads them without
  refreshing their place; their bytes stay within ``headroom`` of it.
"""
from __future__ import annotations

import enum
import math
import threading
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np


PIN_MIN_SHARE = 0.25  # WINDOW mode pins prefixes only where they hold at least this share of the records
EPOCH_GATE_FRACTION = 0.005  # of a mixed store's images read before any record prefix is fetched
EPOCH_GATE_CLASSES = 2        # ... from at least this many top-level directories


class EpochGate:
    """Whether the reads of a store whose records mix the dataset look like an epoch: at least
    ``min_images`` distinct images from at least ``min_classes`` distinct classes
    (``classes_of[i]``: image i's top-level directory, -1 at the root). Opens once, stays
    open; thread-safe; memory bounded by ``min_images``."""

    def __init__(self, classes_of: np.ndarray, min_images: int, min_classes: int = EPOCH_GATE_CLASSES) -> None:
        self.classes_of = np.asarray(classes_of)
        n_classes = len(np.unique(self.classes_of)) if len(self.classes_of) else 0
        self.min_classes = max(1, min(min_classes, n_classes))
        self.min_images = max(1, min(int(min_images), len(self.classes_of)))
        self._images: set[int] = set()
        self._classes: set[int] = set()
        # the classes whose directories a walk must list: all of them (images at the root aside)
        self._unlisted: set[int] = {int(c) for c in np.unique(self.classes_of) if c >= 0}
        self._open = False
        self.opened_by = ""  # "reads" or "walk", for the stats
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self._open

    def note(self, image: int | None) -> bool:
        """Count a read of ``image`` (None: an unknown one, counted as new); True once open."""
        if self._open:
            return True
        with self._lock:
            if image is None:
                image = -1 - len(self._images)
            else:
                self._classes.add(int(self.classes_of[image]))
            self._images.add(image)
            if len(self._images) >= self.min_images and len(self._classes) >= self.min_classes:
                self._open_by("reads")
            return self._open

    def listed(self, c: int) -> bool:
        """Note a listing of class ``c``'s directory; True once open. A listing of every class
        directory -- how a dataset loader starts (torchvision's ``ImageFolder`` walks every
        class before its first read) -- opens the gate: a ``cp -r`` or ``tar`` of one class
        lists only its own directory. ``du`` or ``ls -R`` of the whole view opens it too; what
        that can cost is bounded by the mode (``VIEW``: the view fits the cache)."""
        if self._open or c < 0:
            return self._open
        with self._lock:
            self._unlisted.discard(int(c))
            if not self._unlisted and not self._open:
                self._open_by("walk")
            return self._open

    def _open_by(self, why: str) -> None:
        self._open = True
        self.opened_by = why
        self._images.clear()


class Mode(enum.Enum):
    VIEW = "view"        # every record's prefix, on its first read
    WINDOW = "window"    # a record's prefix once reads show locality
    IMAGES = "images"    # per-image reads


@dataclass(frozen=True)
class PrefixPlan:
    """Fetch bytes [start, end) of ``record`` (groups ``first_group``..``groups``), as ``parts``."""
    record: int
    first_group: int
    groups: int
    start: int
    end: int
    parts: tuple[tuple[int, int], ...]   # (offset, length), contiguous, covering [start, end)


def group_bounds(region_offsets: np.ndarray, record_sizes: np.ndarray) -> np.ndarray:
    """i8[R, G+1]: ``b[r, g]`` = where record r's group-(g+1) region starts; ``b[r, G]`` = its size.

    So groups 1..k of record r are bytes ``[b[r, 0], b[r, k])``.
    """
    offsets = np.asarray(region_offsets, dtype=np.int64)
    sizes = np.asarray(record_sizes, dtype=np.int64).reshape(-1, 1)
    return np.concatenate([offsets, sizes], axis=1)


def split_parts(start: int, end: int, part_bytes: int, max_parts: int) -> tuple[tuple[int, int], ...]:
    """[start, end) as at most ``max_parts`` near-equal (offset, length) parts of ~``part_bytes``."""
    length = end - start
    if length <= 0:
        return ()
    n = max(1, min(max_parts, math.ceil(length / max(1, part_bytes))))
    cuts = [start + (length * j) // n for j in range(n + 1)]
    return tuple((cuts[j], cuts[j + 1] - cuts[j]) for j in range(n))


class RecordPrefixPolicy:
    """Which record prefixes to fetch; thread-safe, O(1) per read (amortized)."""

    def __init__(self, bounds: np.ndarray, memory_bytes: int, disk_bytes: int = 0, *,
                 part_bytes: int = 8 << 20, max_parts: int = 8, headroom: float = 0.9,
                 min_window: int = 2, history_factor: int = 3, prefetch_after: int = 3,
                 gate: EpochGate | None = None) -> None:
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.memory_bytes = max(0, int(memory_bytes))
        self.disk_bytes = max(0, int(disk_bytes))
        self.part_bytes = part_bytes
        self.max_parts = max_parts
        self.headroom = headroom
        self.min_window = min_window
        self.history_factor = history_factor
        self.prefetch_after = prefetch_after
        self.gate = gate  # mixed records: no prefix at all until the reads look like an epoch
        self._fetched_at: dict[int, set[int]] = {}   # k -> records fetched on demand at k
        self._prefetched_at: set[int] = set()         # fidelities whose view was prefetched
        spans = self.bounds - self.bounds[:, :1]            # [R, G+1]: prefix bytes per record and k
        self.view_bytes = spans.sum(axis=0)                 # V(k), k = 0..G
        nonempty = max(1, int((spans[:, -1] > 0).sum()))
        self.mean_prefix = spans.sum(axis=0) / nonempty     # average prefix of a (non-empty) record
        self._modes: dict[int, tuple[Mode, int]] = {}
        self._records = int((spans[:, -1] > 0).sum())      # records with any bytes
        self._pins: dict[int, set[int]] = {}               # k -> records pinned at k (WINDOW mode)
        self._pins_off: set[int] = set()                   # fidelities where a pinned prefix was dropped
        self._pinned: frozenset[int] = frozenset()         # every pinned record (is_pinned; replaced whole)
        self._pinned_bytes = 0
        self._recent: deque[int] = deque()
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.announced = False  # a record-aware reader said what it reads (announce)
        self.fetches = 0  # counters for the mount's stats
        self.declined = 0
        self.deferred = 0  # reads of mixed records served image by image while the gate was shut
        self.pinned = 0    # prefixes fetched to be kept for reads that are not record-local

    @property
    def num_groups(self) -> int:
        return self.bounds.shape[1] - 1

    def mode(self, k: int) -> tuple[Mode, int]:
        """The mode for reads at fidelity ``k``, and how many average prefixes fit (WINDOW's size)."""
        k = min(max(k, 1), self.num_groups)
        got = self._modes.get(k)
        if got is None:
            got = self._decide(k)
            self._modes[k] = got
        return got

    def _decide(self, k: int) -> tuple[Mode, int]:
        need = int(self.view_bytes[k])
        for budget in (self.disk_bytes, self.memory_bytes):
            if budget and need <= self.headroom * budget:
                return Mode.VIEW, len(self.bounds)
        mean = float(self.mean_prefix[k])
        fit = int(self.headroom * max(self.disk_bytes, self.memory_bytes) // mean) if mean > 0 else 0
        if fit >= self.min_window:
            return Mode.WINDOW, fit
        return Mode.IMAGES, 0

    def fits_memory(self, k: int) -> bool:
        """Whether the memory cache holds the whole view's prefixes at fidelity ``k`` (with headroom)."""
        k = min(max(k, 1), self.num_groups)
        return bool(self.memory_bytes) and int(self.view_bytes[k]) <= self.headroom * self.memory_bytes

    def not_kept(self, k: int) -> None:
        """A prefix fetched for fidelity ``k`` fitted in neither cache (a disk that refuses
        writes, say): fetching more would only fetch them again; read image by image."""
        k = min(max(k, 1), self.num_groups)
        self._modes[k] = (Mode.IMAGES, 0)

    def access(self, record: int, k: int, held: int, image: int | None = None) -> PrefixPlan | None:
        """Note a read of ``image`` in ``record`` at fidelity ``k`` of which the caches hold
        groups 1..``held``; the prefix to fetch now, or None (serve this read image by image)."""
        k = min(max(k, 1), self.num_groups)
        if held >= k:
            return None
        mode, fit = self.mode(k)
        if mode is Mode.IMAGES:
            return None
        if self.announced:  # a record-aware sampler reads here (see announce): no evidence needed
            return self.plan(record, k, held)
        # a record with part of its prefix cached was fetched after the gate opened (or ahead
        # of its reads): extending it to a higher fidelity needs no new evidence
        if not held and self.gate is not None and not self.gate.note(image):
            with self._lock:
                self.deferred += 1
            return None
        if mode is Mode.WINDOW and not self._window_fetch(record, k, fit, held):
            with self._lock:
                self.declined += 1
            return None
        return self.plan(record, k, held)

    def _window_fetch(self, record: int, k: int, fit: int, held: int) -> bool:
        """WINDOW mode: fetch this record's prefix while the recent reads stay in at most ``fit``
        records, or pin it (:meth:`_pin`) once a full history shows they do not -- but never
        evict pins to follow locality: with the pins in the cache, the reads it sees are the
        unpinned records' only, which may look local without being so."""
        local, full = self._local(record, fit)
        if local:
            with self._lock:
                pins = self._pins.get(k)
                return not (pins and len(pins) >= fit and k not in self._pins_off)
        return full and self._pin(record, k, fit, held)

    def _pin(self, record: int, k: int, fit: int, held: int) -> bool:
        """WINDOW mode, a read that is not record-local: whether to fetch its record's prefix to
        keep. On a store whose records mix the dataset (every pass, shuffled or in path order,
        reads every record throughout), where the cache holds a large share of the records
        (``PIN_MIN_SHARE``), the first
        ``fit`` records such reads meet are fetched and kept: a uniform shuffle, or a path-order
        pass over mixed records, then reads that share of its images from prefixes fetched once
        (LRU keeps them: each is read again every few reads) instead of fetching prefixes that
        are evicted unread. A pinned record read again with nothing held was dropped -- the
        cache cannot keep the pins beside the other reads -- and pinning stops at ``k``."""
        if self.gate is None or fit < PIN_MIN_SHARE * self._records:
            # records of consecutive paths: a path-order pass is done with a record when it
            # leaves it, and a pin would hold a prefix no read comes back to
            return False
        span = int(self.bounds[record, k] - self.bounds[record, 0])
        with self._lock:
            if k in self._pins_off:
                return False
            pins = self._pins.setdefault(k, set())
            if record in pins:
                if held:
                    return True  # a higher fidelity of a kept prefix: extend it
                self._pins_off.add(k)
                self._pinned_bytes -= sum(int(self.bounds[r, k] - self.bounds[r, 0]) for r in pins)
                pins.clear()
                self._pinned = frozenset(r for rs in self._pins.values() for r in rs)
                return False
            # as many as fit, and never more bytes than the memory cache's headroom: the cache
            # evicts no pinned prefix (is_pinned), so the pins must leave room for other reads
            if len(pins) >= fit or self._pinned_bytes + span > self.headroom * self.memory_bytes:
                return False
            pins.add(record)
            self._pinned_bytes += span
            self._pinned = self._pinned | {record}
            self.pinned += 1
            return True

    def is_pinned(self, record: int) -> bool:
        """Whether ``record``'s prefix is pinned (the memory cache keeps it: ByteLRU.keep_while).
        Lock-free: the cache asks under its own lock."""
        return record in self._pinned

    def listed(self, c: int) -> None:
        """A listing of class ``c``'s directory (:meth:`EpochGate.listed`); nothing without a gate."""
        if self.gate is not None:
            self.gate.listed(c)

    def announce(self) -> None:
        """A reader told which records it reads next (``RecordShuffleSampler`` hinting the
        mount, ``ImageFolder.fetch_ahead``): its order keeps at most a cache's worth of records
        open, so from now on a read of a record whose prefix is not held fetches it at once --
        no epoch gate, no locality history (their warm-up read ~40 images one by one on a
        15-record store), as for the records it named."""
        self.announced = True

    def plan(self, record: int, k: int, held: int) -> PrefixPlan:
        """The fetch of groups held+1..k of ``record`` (counted as a fetch)."""
        k = min(max(k, 1), self.num_groups)
        start, end = int(self.bounds[record, held]), int(self.bounds[record, k])
        with self._lock:
            self.fetches += 1
        return PrefixPlan(record, held + 1, k, start, end, split_parts(start, end, self.part_bytes, self.max_parts))

    def prefetch(self, record: int, k: int) -> list[int]:
        """Note that a read fetched ``record``'s prefix at fidelity ``k``; the records whose
        prefixes to fetch ahead of their reads now (once per k, in VIEW mode, when this is
        the ``prefetch_after``-th distinct record), else []."""
        k = min(max(k, 1), self.num_groups)
        if self.prefetch_after <= 0 or self.mode(k)[0] is not Mode.VIEW:
            return []
        # mixed records: the open epoch gate already told an epoch from a look at a few files
        after = 1 if self.gate is not None and self.gate.open else self.prefetch_after
        with self._lock:
            if k in self._prefetched_at:
                return []
            seen = self._fetched_at.setdefault(k, set())
            seen.add(record)
            if len(seen) < after:
                return []
            self._prefetched_at.add(k)
        spans = self.bounds[:, k] - self.bounds[:, 0]
        return [int(r) for r in np.flatnonzero(spans > 0) if int(r) not in seen]

    def _local(self, record: int, fit: int) -> tuple[bool, bool]:
        """Count this read; (whether the recent reads, this one included, touch at most ``fit``
        records; whether the history is full, so that "no" means it)."""
        history = self.history_factor * fit
        with self._lock:
            self._recent.append(record)
            self._counts[record] += 1
            while len(self._recent) > history:
                old = self._recent.popleft()
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]
            full = len(self._recent) >= history
            return full and len(self._counts) <= fit, full

    def stats(self) -> dict[str, int | str]:
        out = {"fetches": self.fetches, "declined": self.declined, "deferred": self.deferred, "pinned": self.pinned}
        if self.gate is not None:
            out["epoch_gate"] = self.gate.opened_by or "shut"
        return out


def store_policy(bounds: np.ndarray, memory_bytes: int, disk_bytes: int,
                 classes_of: np.ndarray | None = None, readers: int = 1) -> RecordPrefixPolicy:
    """The policy a store opens with (and the one ``tools/sim_order_policy.py`` simulates):
    ``classes_of`` (each image's class) given where the records mix the dataset, which adds
    the epoch gate. ``readers`` processes sharing one cache each see 1/readers of the
    reads, so the gate's image count is divided among them."""
    gate = None
    if classes_of is not None:
        readers = max(1, int(readers))
        gate = EpochGate(classes_of, -(-int(EPOCH_GATE_FRACTION * len(classes_of)) // readers))
    return RecordPrefixPolicy(bounds, memory_bytes, disk_bytes, gate=gate)

