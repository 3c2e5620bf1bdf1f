"""Scoring every fidelity of an image against its full decode, and the per-k table.

For one image, :func:`measure_image` decodes the first k scan groups for every
k (luminance only, straight from libjpeg: the Y plane, no colour conversion)
and scores it against the full decode with MS-SSIM and PSNR (float64,
:class:`.msssim.Reference`). Scans that carry only chroma (3, 4, 8 and 9 in
libjpeg's standard script for colour images) leave the luminance unchanged, so
such a k gets exactly the score of k-1 without being scored again. With
``timing`` it also times a complete RGB decode of each k, which is what a data
loader pays. It is the exhaustive oracle of the tests and the benchmark.

:func:`score_image` computes the same quantities with the index search's
machinery (:mod:`.search`): chroma-only scans are known from their headers and
not decoded, and MS-SSIM is filtered in float32 (:meth:`.search.FastReference.scores`,
within 2e-6 of the oracle; a score within 1e-5 of a threshold a reader compares
it with is the oracle's own). PSNR is bit-identical. :func:`quality_table`
uses it, on a reproducible sample, and aggregates per k; the RGB decode timing
is a mean over at most :data:`TIMED_IMAGES` of the sample. :func:`choose_k`
picks the smallest k whose 5th-percentile quality meets a target.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..store.read.reader import Store
from . import msssim
from .luma import decode_luma, luma_of

METRICS = ("ms_ssim", "psnr")
PERCENTILE = 5  # the "bad tail" statistic: 5th percentile over images (numpy's linear interpolation)
# images of a table's sample whose RGB decodes are timed (spread over the sample): a mean
# over 32 images is within a few percent, and timing every k of every image cost about as
# much as scoring it
TIMED_IMAGES = 32
# the table's MS-SSIM of a large image: a scale with more windows than this has its term (the
# mean over its windows) estimated on a systematic sample of this many (2M: an image of ~2 Mpx
# is scored exactly; 12-20 Mpx photos came within 2e-4 of the exact score, at half the cost)
SAMPLE_WINDOWS = 1 << 21


def time_rgb_decode(data: bytes) -> float:
    """Seconds for a full decode to RGB pixels, as an image loader does it."""
    t0 = time.perf_counter()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").load()
    return time.perf_counter() - t0


@dataclass
class ImageScores:
    """Every fidelity of one image. Arrays are indexed by k-1 for k = 1..G (the store's count)."""
    image: int
    n_groups: int
    sizes: np.ndarray     # int64[G] bytes of the file at fidelity k
    ms_ssim: np.ndarray   # float64[G] against the full decode (1.0 from n_groups on)
    psnr: np.ndarray      # float64[G] dB, capped at msssim.PSNR_CAP
    decode_s: np.ndarray | None = None  # float64[G] RGB decode seconds (with timing)
    estimated: bool = False  # MS-SSIM of some k estimated on a sample of a large image's windows


def measure_image(store: Store, i: int, timing: bool = False, stop_at: float | None = None) -> ImageScores:
    """Score image ``i`` at every k against its full decode.

    ``stop_at``: stop decoding once MS-SSIM reaches this value; the remaining ks
    are left as NaN (enough to find the smallest k reaching thresholds up to it).
    """
    n, sizes, ssim, psnr, decode_s = _blank_scores(store, i, timing)
    full = store.read(i, n)
    ref = msssim.Reference(decode_luma(full))
    previous = None
    for k in range(1, n):
        data = store.read(i, k)
        if timing:
            decode_s[k - 1] = time_rgb_decode(data)
        y = decode_luma(data)
        if previous is not None and np.array_equal(y, previous):
            ssim[k - 1], psnr[k - 1] = ssim[k - 2], psnr[k - 2]  # a chroma-only scan
        else:
            ssim[k - 1], psnr[k - 1] = ref.ms_ssim(y), ref.psnr(y)
        previous = y
        if stop_at is not None and ssim[k - 1] >= stop_at:
            break
    if timing:
        decode_s[n - 1:] = time_rgb_decode(full)
    return ImageScores(i, n, sizes, ssim, psnr, decode_s)


def _blank_scores(store: Store, i: int, timing: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray,
                                                                  np.ndarray | None]:
    """Image i's group count, its file size at every k, and MS-SSIM / PSNR / decode-time rows
    to fill: NaN below its own group count, exact (1.0, the PSNR cap) from it on."""
    g_store = store.num_groups
    n = store.n_groups(i)
    sizes = np.array([store.size(i, k) for k in range(1, g_store + 1)], dtype=np.int64)
    ssim = np.full(g_store, np.nan)
    psnr = np.full(g_store, np.nan)
    ssim[n - 1:] = 1.0
    psnr[n - 1:] = msssim.PSNR_CAP
    return n, sizes, ssim, psnr, np.full(g_store, np.nan) if timing else None


def score_image(store: Store, i: int, timing: bool = False, exact_near: Sequence[float] = (),
                max_windows: int | None = None) -> ImageScores:
    """:func:`measure_image` (no ``stop_at``) with the index search's machinery: the same
    sizes and PSNR, MS-SSIM within 2e-6 of it (exact within :data:`.search.MARGIN` of a
    value in ``exact_near``), and RGB decode times with ``timing``. ``max_windows``: a
    scale with more windows has its term estimated on a sample of them
    (:meth:`.search.FastReference.scores`); the result's ``estimated`` says if any was."""
    from .search import FastReference, reference_luma

    n, sizes, ssim, psnr, decode_s = _blank_scores(store, i, timing)
    full = store.read(i, n)
    estimated = False
    if n > 1:
        changes, y_full = reference_luma(full, n)
        ref = FastReference(y_full, max_windows)
        for k in range(1, n):
            if k > 1 and changes is not None and not changes[k - 1]:
                ssim[k - 1], psnr[k - 1] = ssim[k - 2], psnr[k - 2]  # a chroma-only scan: not decoded
            else:
                ssim[k - 1], psnr[k - 1], sampled = ref.scores(decode_luma(store.read(i, k)), exact_near,
                                                               max_windows)
                estimated |= sampled
    if timing:
        for k in range(1, n):
            decode_s[k - 1] = time_rgb_decode(store.read(i, k))
        decode_s[n - 1:] = time_rgb_decode(full)
    return ImageScores(i, n, sizes, ssim, psnr, decode_s, estimated)


def timed_subset(images: Sequence[int], count: int = TIMED_IMAGES) -> set[int]:
    """The images of a sample whose decodes are timed: ``count`` spread evenly over it (all if fewer)."""
    images = list(images)
    if len(images) <= count:
        return set(images)
    return {images[int(p)] for p in np.linspace(0, len(images) - 1, count).round()}


def sample_images(num_images: int, sample: int | None, seed: int) -> np.ndarray:
    """A reproducible sample (sorted image indices); all images if ``sample`` is None or >= n."""
    if sample is None or sample >= num_images:
        return np.arange(num_images)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_images, size=sample, replace=False))


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class MeasureFailed(Exception):
    """An image could not be scored (damaged data or an undecodable file)."""

    def __init__(self, image: int, reason: str) -> None:
        super().__init__(f"image {image}: {reason}")
        self.image = image
        self.reason = reason


_worker_store: Store | None = None


def _init_worker(root: str) -> None:
    global _worker_store
    from ..store.read.reader import open_store

    _worker_store = open_store(root, verify_index=False)  # the parent has verified it


def _measure_or_fail(store: Store, i: int, timing: bool, stop_at: float | None) -> ImageScores | MeasureFailed:
    try:
        return measure_image(store, i, timing=timing, stop_at=stop_at)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return MeasureFailed(i, str(e) or type(e).__name__)  # CorruptData is an OSError


def _measure_in_worker(job: tuple[int, bool, float | None]) -> ImageScores | MeasureFailed:
    i, timing, stop_at = job
    return _measure_or_fail(_worker_store, i, timing, stop_at)


def _in_processes(store: Store, fn: Callable, jobs: list, workers: int, chunksize: int,
                  on_done: Callable[[int], None] | None, initializer: Callable[[str], None] = _init_worker
                  ) -> Iterator:
    """``fn(job)`` for each job in ``workers`` processes, each with its own handle on the store; in order."""
    # fork: workers start in milliseconds and need no importable __main__ (spawn would
    # re-run the caller's script); each reopens the store, sharing nothing with the parent.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer,
                             initargs=(str(store.root),)) as pool:
        for result in pool.map(fn, jobs, chunksize=chunksize):
            yield result
            if on_done:
                on_done(1)


def _in_processes_possible(store: Store, workers: int, jobs: int) -> bool:
    # workers reopen the store from str(store.root) alone; a location that cannot be so reopened stays in-process
    return workers > 1 and jobs > 1 and store.location.workers_can_reopen()


def measure_many(store: Store, images: Iterable[int], *, timing: bool = False, stop_at: float | None = None,
                 workers: int = 1, on_done: Callable[[int], None] | None = None
                 ) -> Iterator[ImageScores | MeasureFailed]:
    """:func:`measure_image` over ``images``, in order; an image that cannot be
    scored yields a :class:`MeasureFailed` instead.

    ``workers`` > 1 uses that many processes (the Gaussian filtering holds the
    GIL, so threads would not scale), each with its own handle on the store.
    """
    jobs = [(int(i), timing, stop_at) for i in images]
    if _in_processes_possible(store, workers, len(jobs)):
        yield from _in_processes(store, _measure_in_worker, jobs, workers, 2, on_done)
        return
    for i, _t, _s in jobs:
        yield _measure_or_fail(store, i, timing, stop_at)
        if on_done:
            on_done(1)


def _score_or_fail(store: Store, i: int, timing: bool, exact_near: tuple[float, ...],
                   sample_windows: int | None) -> ImageScores | MeasureFailed:
    try:
        return score_image(store, i, timing=timing, exact_near=exact_near, max_windows=sample_windows)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return MeasureFailed(i, str(e) or type(e).__name__)


def _score_in_worker(job: tuple[int, bool, tuple[float, ...], int | None]) -> ImageScores | MeasureFailed:
    return _score_or_fail(_worker_store, *job)


def score_many(store: Store, images: Iterable[int], *, timed: Iterable[int] = (),
               exact_near: Sequence[float] = (), sample_windows: int | None = None, workers: int = 1,
               on_done: Callable[[int], None] | None = None) -> Iterator[ImageScores | MeasureFailed]:
    """:func:`score_image` over ``images`` (those in ``timed`` with timing), in order, like
    :func:`measure_many`; one BLAS thread per process, as for the index."""
    from .search import single_threaded_blas

    timed = set(int(i) for i in timed)
    exact_near = tuple(float(t) for t in exact_near)
    jobs = [(int(i), int(i) in timed, exact_near, sample_windows) for i in images]
    if _in_processes_possible(store, workers, len(jobs)):
        yield from _in_processes(store, _score_in_worker, jobs, workers, 1, on_done,
                                 initializer=_init_search_worker)
        return
    with single_threaded_blas():
        for job in jobs:
            yield _score_or_fail(store, *job)
            if on_done:
                on_done(1)


def _search_or_fail(store: Store, i: int, thresholds: tuple[float, ...]) -> tuple[int, np.ndarray] | MeasureFailed:
    from .search import file_reader, search_ks

    try:
        return i, search_ks(file_reader(store, i), store.n_groups(i), thresholds)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return MeasureFailed(i, str(e) or type(e).__name__)


_worker_blas_limit = None  # held for the worker's life: dropped, the limit would be undone at once


def _init_search_worker(root: str) -> None:
    """A scoring worker: the store, and one BLAS thread for the rest of its life (set
    once: entering the limit costs about a millisecond, too much per image).

    The entered context manager is kept: a generator-based one that nothing refers to
    is finalised at once, which exits its ``with`` and gives BLAS its threads back (it
    did: each worker ran OpenBLAS on every core, 5x the CPU per large image on 2 cores)."""
    global _worker_blas_limit
    from .search import single_threaded_blas

    _init_worker(root)
    _worker_blas_limit = single_threaded_blas()
    _worker_blas_limit.__enter__()  # the process ends with the pool; nothing to restore


def _search_in_worker(job: tuple[int, tuple[float, ...]]) -> tuple[int, np.ndarray] | MeasureFailed:
    return _search_or_fail(_worker_store, *job)


def search_many(store: Store, images: Iterable[int], thresholds: Sequence[float], *, workers: int = 1,
                on_done: Callable[[int], None] | None = None) -> Iterator[tuple[int, np.ndarray] | MeasureFailed]:
    """(image, u1[T] smallest k per threshold) for each of ``images``, in order, by
    :func:`.search.search_ks`; a :class:`MeasureFailed` for an image that cannot be scored."""
    from .search import single_threaded_blas

    thresholds = tuple(float(t) for t in thresholds)
    images = [int(i) for i in images]
    if _in_processes_possible(store, workers, len(images)):
        yield from _in_processes(store, _search_in_worker, [(i, thresholds) for i in images], workers, 4,
                                 on_done, initializer=_init_search_worker)
        return
    with single_threaded_blas():
        for i in images:
            yield _search_or_fail(store, i, thresholds)
            if on_done:
                on_done(1)


# ---- the table ------------------------------------------------------------------------------

@dataclass
class Row:
    """Quality of one view over the sample."""
    view: str
    k: int | None             # scan groups (None for an adaptive view: each image has its own)
    bytes_mean: float         # bytes per image
    fraction_total: float     # bytes of the view / bytes of the full view, over the sample
    fraction_mean: float      # per-image byte fraction: mean, standard deviation, 5th and 95th percentile
    fraction_std: float
    fraction_p5: float
    fraction_p95: float
    psnr_mean: float
    psnr_p5: float
    ms_ssim_mean: float
    ms_ssim_p5: float
    ms_ssim_min: float
    decode_ms_mean: float | None = None


@dataclass
class QualityTable:
    store: str
    images: int                # in the store
    sample: list[int]          # image indices measured
    seed: int
    num_groups: int
    rows: list[Row]            # scan1..scanG, then any adaptive views
    seconds: float = 0.0
    adaptive: dict = field(default_factory=dict)  # view -> threshold, when the store has the index
    timed: list[int] = field(default_factory=list)  # images whose RGB decodes the decode column averages
    estimated: list[int] = field(default_factory=list)  # images whose MS-SSIM was estimated (large images)
    sample_windows: int | None = None  # the estimates' windows per scale (None: every window, exact)

    def row(self, view: str) -> Row:
        return next(r for r in self.rows if r.view == view)

    def fixed_rows(self) -> list[Row]:
        return [r for r in self.rows if r.k is not None]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["sample_size"] = len(self.sample)
        out["psnr_cap_db"] = msssim.PSNR_CAP
        out["percentile"] = PERCENTILE
        return out


def _row(view: str, k: int | None, sizes: np.ndarray, full: np.ndarray, ssim: np.ndarray, psnr: np.ndarray,
         decode_s: np.ndarray | None) -> Row:
    frac = sizes / full
    return Row(
        view=view, k=k, bytes_mean=float(sizes.mean()), fraction_total=float(sizes.sum() / full.sum()),
        fraction_mean=float(frac.mean()), fraction_std=float(frac.std()),
        fraction_p5=float(np.percentile(frac, PERCENTILE)), fraction_p95=float(np.percentile(frac, 100 - PERCENTILE)),
        psnr_mean=float(psnr.mean()), psnr_p5=float(np.percentile(psnr, PERCENTILE)),
        ms_ssim_mean=float(ssim.mean()), ms_ssim_p5=float(np.percentile(ssim, PERCENTILE)),
        ms_ssim_min=float(ssim.min()),
        decode_ms_mean=None if decode_s is None else float(np.nanmean(decode_s) * 1000),
    )


def aggregate(scores: Sequence[ImageScores], num_groups: int,
              adaptive: dict[str, np.ndarray] | None = None) -> list[Row]:
    """Per-k rows from per-image scores; ``adaptive`` maps a view name to the
    k of every *store* image (0 = full), giving one more row each."""
    sizes = np.stack([s.sizes for s in scores])       # [n, G]
    ssim = np.stack([s.ms_ssim for s in scores])
    psnr = np.stack([s.psnr for s in scores])
    timing = any(s.decode_s is not None for s in scores)  # untimed images of a timed table: NaN rows
    decode = np.stack([s.decode_s if s.decode_s is not None else np.full(num_groups, np.nan)
                       for s in scores]) if timing else None
    full = sizes[:, -1].astype(np.float64)
    rows = [_row(f"scan{k}", k, sizes[:, k - 1], full, ssim[:, k - 1], psnr[:, k - 1],
                 decode[:, k - 1] if timing else None) for k in range(1, num_groups + 1)]
    images = np.array([s.image for s in scores])
    pick = np.arange(len(scores))
    for view, ks in (adaptive or {}).items():
        col = np.asarray(ks[images], dtype=np.int64)
        col = np.where(col == 0, num_groups, col) - 1
        rows.append(_row(view, None, sizes[pick, col], full, ssim[pick, col], psnr[pick, col],
                         decode[pick, col] if timing else None))
    return rows


def quality_table(store: Store, *, sample: int | None = 200, seed: int = 0, timing: bool = True,
                  workers: int = 1, adaptive: dict[str, tuple[float, np.ndarray]] | None = None,
                  exact_near: Sequence[float] = (), timed_images: int = TIMED_IMAGES,
                  sample_windows: int | None = SAMPLE_WINDOWS, exhaustive: bool = False,
                  on_start: Callable[[int], None] | None = None,
                  on_done: Callable[[int], None] | None = None) -> QualityTable:
    """Measure a reproducible sample of ``store`` and tabulate quality per k.

    ``adaptive``: view name -> (threshold, per-image k) for rows of the adaptive views.
    Images are scored by :func:`score_image`; MS-SSIM within :data:`.search.MARGIN` of one
    of ``exact_near``, of the adaptive thresholds or of the index's default ones is the
    exact float64 value. With ``timing`` the RGB decodes of ``timed_images`` images
    (:func:`timed_subset`) are timed. ``sample_windows``: a scale of an image with more
    windows than that has its MS-SSIM term estimated on a sample of them (None: every
    window). ``exhaustive``: :func:`measure_image` for every image, every decode timed
    (the oracle: slower, the same quantities).
    """
    from ..store.format.adaptiveindex import THRESHOLDS

    t0 = time.perf_counter()
    images = sample_images(store.num_images, sample, seed)
    if on_start:
        on_start(len(images))
    if len(images) == 0:
        raise ValueError("the store has no images to measure")
    timed = sorted(timed_subset(images.tolist(), timed_images)) if timing else []
    if exhaustive:
        timed = images.tolist() if timing else []
        results = measure_many(store, images, timing=timing, workers=workers, on_done=on_done)
    else:
        near = {*map(float, exact_near), *map(float, THRESHOLDS), *(t for t, _k in (adaptive or {}).values())}
        results = score_many(store, images, timed=timed, exact_near=sorted(near), sample_windows=sample_windows,
                             workers=workers, on_done=on_done)
    scores = []
    for result in results:
        if isinstance(result, MeasureFailed):
            raise result
        scores.append(result)
    ks = {v: k for v, (_t, k) in (adaptive or {}).items()}
    rows = aggregate(scores, store.num_groups, ks)
    return QualityTable(str(store.root), store.num_images, images.tolist(), seed, store.num_groups, rows,
                        time.perf_counter() - t0, {v: t for v, (t, _k) in (adaptive or {}).items()}, timed,
                        [s.image for s in scores if s.estimated], None if exhaustive else sample_windows)


@dataclass
class Choice:
    metric: str
    target: float
    row: Row
    value: float     # the row's 5th-percentile value of the metric
    saving: float    # 1 - byte fraction of the chosen view against full


def choose_k(rows: Sequence[Row], metric: str, target: float) -> Choice | None:
    """The fixed-k view with the smallest k whose 5th-percentile ``metric`` is at least ``target``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}")
    for r in sorted((r for r in rows if r.k is not None), key=lambda r: r.k):
        value = r.ms_ssim_p5 if metric == "ms_ssim" else r.psnr_p5
        if value >= target:
            return Choice(metric, target, r, value, 1.0 - r.fraction_total)
    return None
