"""Computing the adaptive-k index: per image, the smallest k reaching each MS-SSIM threshold.

The index's format (its file, manifest entry, checks, writing and loading) is
:mod:`pcrfs.store.format.adaptiveindex`, beside the store's index; this module scores images
(decoding, MS-SSIM: :mod:`.measure`, :mod:`.search`) to fill it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..jpeg.scans import EOI_BYTES
from ..store.format.adaptiveindex import DTYPE, THRESHOLDS, view_name
from ..store.read.reader import Store


def smallest_k(ms_ssim: np.ndarray, n_groups: int, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """u1[T]: for each threshold, the smallest k (1-based) whose score reaches it.

    ``ms_ssim[k-1]`` is the score of k groups against the full decode (NaN where
    not measured); k = ``n_groups`` is the full image, which always qualifies.
    """
    scores = np.asarray(ms_ssim, dtype=np.float64)[:n_groups]
    out = np.empty(len(thresholds), dtype=DTYPE)
    for t, threshold in enumerate(thresholds):
        hits = np.flatnonzero(scores[:n_groups - 1] >= threshold)
        out[t] = hits[0] + 1 if len(hits) else n_groups
    return out


def compute(store: Store, thresholds: Sequence[float] = THRESHOLDS, *, workers: int = 1,
            on_start: Callable[[int], None] | None = None, on_done: Callable[[int], None] | None = None
            ) -> tuple[np.ndarray, list]:
    """Score every image of ``store``; returns (u1[n, T] ks, failures).

    Uses :func:`.search.search_ks`: the same ks as :func:`compute_exhaustive`, for a
    fraction of the work. Images that cannot be scored get k = 0 (served whole) and
    are returned as :class:`~.measure.MeasureFailed`.
    """
    from .measure import MeasureFailed, search_many

    thresholds = list(thresholds)
    n = store.num_images
    ks = np.zeros((n, len(thresholds)), dtype=DTYPE)
    failures = []
    if on_start:
        on_start(n)
    for result in search_many(store, range(n), thresholds, workers=workers, on_done=on_done):
        if isinstance(result, MeasureFailed):
            failures.append(result)
        else:
            ks[result[0]] = result[1]
    return ks, failures


def compute_exhaustive(store: Store, thresholds: Sequence[float] = THRESHOLDS, *, workers: int = 1
                       ) -> tuple[np.ndarray, list]:
    """The reference for :func:`compute`: every k scored with msssim.Reference in turn
    until the highest threshold is reached (the tests' oracle)."""
    from .measure import MeasureFailed, measure_many

    thresholds = list(thresholds)
    ks = np.zeros((store.num_images, len(thresholds)), dtype=DTYPE)
    failures = []
    for result in measure_many(store, range(store.num_images), stop_at=max(thresholds), workers=workers):
        if isinstance(result, MeasureFailed):
            failures.append(result)
        else:
            ks[result.image] = smallest_k(result.ms_ssim, result.n_groups, thresholds)
    return ks, failures


def summarize(store: Store, ks: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[dict]:
    """Per adaptive view, from the index alone: bytes, fraction of the full view, mean k, images per k."""
    g = store.num_groups
    full_total = 0
    totals = np.zeros(len(thresholds), dtype=np.int64)
    counts = np.zeros((len(thresholds), g + 1), dtype=np.int64)
    chunk = 1 << 16
    for start in range(0, store.num_images, chunk):  # bounded memory at ImageNet scale
        lengths = np.asarray(store.index.group_lengths[start:start + chunk], dtype=np.int64)
        sizes = np.cumsum(lengths, axis=1) + len(EOI_BYTES)  # file size at every k
        full_total += int(sizes[:, -1].sum())
        for t in range(len(thresholds)):
            col = np.asarray(ks[start:start + chunk, t], dtype=np.intp)
            col = np.where(col == 0, g, col)
            totals[t] += int(sizes[np.arange(len(col)), col - 1].sum())
            counts[t] += np.bincount(col, minlength=g + 1)
    out = []
    for t, threshold in enumerate(thresholds):
        n = int(counts[t].sum())
        out.append({
            "view": view_name(threshold), "threshold": float(threshold), "bytes": int(totals[t]),
            "fraction": totals[t] / full_total if full_total else 0.0,
            "mean_k": float((counts[t] * np.arange(g + 1)).sum() / n) if n else 0.0,
            "k_counts": {k: int(c) for k, c in enumerate(counts[t]) if c},
        })
    return out
