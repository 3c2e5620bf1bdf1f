"""The smallest k reaching each MS-SSIM threshold, as the exhaustive search finds it, for far less work.

The exhaustive search (:func:`.measure.measure_image` with ``stop_at``, then
:func:`.scoring.smallest_k`) decodes k = 1, 2, ... and scores each decode with
:class:`.msssim.Reference` until the highest threshold is reached. It is kept as
the oracle; :func:`search_ks` returns exactly its answer, with three savings:

* **Scans that cannot change the luminance are not decoded.** A scan whose SOS
  header lists only chroma components (3, 4, 8 and 9 of libjpeg's colour script)
  leaves the Y plane exactly as it was, so k scores what k-1 scored, and k-1
  reached none of the thresholds still open. This holds only where libjpeg's
  greyscale output *is* the first component, i.e. the JPEG is YCbCr (the rule of
  libjpeg's ``default_decompress_parms``); anything else is decoded at every k.
* **Faster filtering, nearly the same numbers.** The Gaussian window is applied in
  float32 to the three products of a decode stacked in one array, instead of
  ``scipy.ndimage.correlate1d`` (float64) per product: by the compiled separable filter
  ``_ssimfilter`` (pcrfs/quality/_ssimfilter.c), or where it was not built by a banded
  matrix product (BLAS) on small row/column blocks, whose speed is OpenBLAS's kernel
  set's (:func:`blas_kernel_note`). A decode enters as its difference from the
  reference, so the float32 sums stay small (:class:`FastReference`). Scores agree
  with the oracle's to better than 2e-6, 6e-7 at scores above 0.85, with the banded
  products, and to 1.1e-7 with the compiled filter (measured on every k of 40 demo
  photos; tests/test_quality_search.py checks every k of a sample of the test images,
  tests/test_quality_filter.py both filters).
* **Coarse scales first, stop at the bound.** Every MS-SSIM term is at most 1
  (Cauchy-Schwarz), so once the coarser scales are scored the product of their
  terms bounds the final score from above; a decode whose bound is already below
  every open threshold is rejected without its finest, most expensive scale.

Decisions use a margin :data:`MARGIN` far above the filtering's rounding error:
a score (or bound) within it of a threshold is decided by the oracle's own
:class:`.msssim.Reference` instead, so no k can differ from the exhaustive one
through rounding.
"""
from __future__ import annotations

import io
import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from ..jpeg.scans import scan_components
from . import msssim
from .luma import decode_luma, luma_of

try:  # the compiled window (setup.py builds it where a C compiler is at hand): no BLAS in its cost
    from . import _ssimfilter
except ImportError:  # pragma: no cover - the banded products below stand in
    _ssimfilter = None

# whether _filter runs the compiled window; False: the banded products (BLAS). The tests and
# tools/bench_quality.py set it to compare the two; nothing else should.
USE_COMPILED = _ssimfilter is not None

MARGIN = 1e-5   # |fast - oracle score| < 1.1e-6 measured (BLAS filter; 1.1e-7 compiled): float32 sums, FastReference
ESTIMATE_MARGIN = 1e-3  # a sampled estimate this close to a threshold is computed on every window
                        # (5x the worst estimate error measured on 12-20 Mpx photos)
BLOCK = 16      # rows/columns per banded product: small blocks waste few multiplications on zeros
CENTRE = np.float32(128)  # mid-grey, subtracted before squaring pixel values in float32
BAND_WINDOWS = 1 << 19  # windows per band of rows a term is computed in: the work arrays of a
                        # band stay within a few MB (a large image's are never whole-image size)
SAMPLE_BAND = 32        # rows of windows per band when a scale's windows are sampled
YCBCR_IDS = (1, 2, 3)  # component ids libjpeg takes for YCbCr when no JFIF/Adobe marker says


@dataclass
class SearchStats:
    """What :func:`search_ks` did (summed over images): for the benchmark and the tests."""
    images: int = 0
    decodes: int = 0         # partial decodes (the full decode of each image not counted)
    skipped: int = 0         # ks not decoded: their scan carries chroma only
    scored: int = 0          # decodes scored to the finest scale
    rejected_early: int = 0  # decodes rejected on the coarse scales' bound
    bounded: int = 0         # decodes decided on the bounds of the finest scale's term
    oracle: int = 0          # decisions too close to a threshold, left to the oracle
    source_references: int = 0  # full decodes taken from the convert's source JPEG instead

    def add(self, other: "SearchStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


# ---- the filter ------------------------------------------------------------------------------

class _Scratch(threading.local):
    """Work arrays reused from one decode to the next, one set per thread.

    Arrays this size (~1 MB) come straight from mmap and are zero-filled page by page
    on first touch; allocating them afresh for every product cost more than the
    products themselves. Each name keeps one buffer, grown to the largest image seen.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        # (name, shape) -> the shaped view: a decode asks for the same few dozen arrays
        # again and again, and building a view costs more than many of the small products
        self.views: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        self.generation = 0  # FastReferences made in this thread

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        view = self.views.get((name, shape))
        if view is not None:
            return view
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.size < size:
            buf = self.buffers[name] = np.empty(size, dtype=np.float32)
            self.views = {key: v for key, v in self.views.items() if key[0] != name}  # views of the old buffer
        if len(self.views) > 512:  # images of many shapes: start over rather than grow without bound
            self.views.clear()
        view = self.views[(name, shape)] = buf[:size].reshape(shape)
        return view


_scratch = _Scratch()


@dataclass(frozen=True)
class Window:
    """The separable window, made once per tap set: its taps (float32, what the compiled
    filter reads) and the banded matrices of the BLAS fallback (:func:`_banded`)."""
    taps: np.ndarray  # float32 (n,), read-only
    g: np.ndarray     # BLOCK x (BLOCK + n - 1), row i holding the taps at columns i..i+n-1
    gt: np.ndarray    # its transpose, contiguous (BLAS reads that faster than a view)


@lru_cache(maxsize=16)
def window_of(taps: tuple[float, ...]) -> Window:
    """The :class:`Window` of ``taps`` (a tuple, so that it can be cached)."""
    n = len(taps)
    t = np.array(taps, dtype=np.float32)
    g = np.zeros((BLOCK, BLOCK + n - 1), dtype=np.float32)
    for i in range(BLOCK):
        g[i, i:i + n] = t
    gt = np.ascontiguousarray(g.T)
    for arr in (t, g, gt):
        arr.setflags(write=False)
    return Window(t, g, gt)


def filter_stack(a: np.ndarray, taps: np.ndarray, name: str = "f") -> np.ndarray:
    """The separable window over the valid region of each image in ``a`` (float32 (c, H, W))
    -> (c, H-n+1, W-n+1). The result is a scratch array, valid until the next call with ``name``."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return _filter(a, window_of(tuple(float(t) for t in taps)), name)


def _filter(a: np.ndarray, win: Window, name: str = "f") -> np.ndarray:
    """:func:`filter_stack` of a C-contiguous float32 stack with the :class:`Window` made: the
    compiled filter (symmetric taps folded, SIMD, the GIL released: no BLAS in its cost) unless
    :data:`USE_COMPILED` is False, else :func:`_banded`. Each image of the result is
    contiguous: the elementwise work on it runs on whole arrays."""
    if USE_COMPILED:
        c, h, w = a.shape
        n = len(win.taps)
        return _ssimfilter.filter_valid(a, win.taps, _scratch.get(name + ".h", (c, h - n + 1, w - n + 1)))
    return _banded(a, win, name)


def _banded(a: np.ndarray, win: Window, name: str) -> np.ndarray:
    """The window as banded matrix products (BLAS sgemm). Vertical pass: one (stacked)
    product per row block covers the c images. Horizontal pass: the result seen as
    (c*m, W) rows, one product per column block (numpy's loops on the rows of a strided
    (m, c, m2) view cost about three times as much)."""
    g, gt = win.g, win.gt
    n = len(win.taps)
    c, h, w = a.shape
    m, m2 = h - n + 1, w - n + 1
    vert = _scratch.get(name + ".v", (c, m, w))
    for i in range(0, m, BLOCK):
        b = min(BLOCK, m - i)
        np.matmul(g[:b, :b + n - 1], a[:, i:i + b + n - 1], out=vert[:, i:i + b])
    flat = vert.reshape(c * m, w)
    out = _scratch.get(name + ".h", (c * m, m2))
    for j in range(0, m2, BLOCK):
        b = min(BLOCK, m2 - j)
        np.matmul(flat[:, j:j + b + n - 1], gt[:b + n - 1, :b], out=out[:, j:j + b])
    return out.reshape(c, m, m2)


def row_bands(m: int, m2: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Bands [i0, i1) of the ``m`` rows of windows (``m2`` to a row) of one scale: all rows,
    in bands of about :data:`BAND_WINDOWS` windows (one band for an ImageNet-size image);
    with ``max_windows``, if there are more windows than that, only bands of
    :data:`SAMPLE_BAND` rows holding about ``max_windows`` windows, spread evenly from
    the first row to the last (a systematic sample of the scale's windows)."""
    if max_windows is not None and m * m2 > max_windows:
        total = -(-m // SAMPLE_BAND)
        count = min(total, -(-max_windows // (m2 * SAMPLE_BAND)))
        picks = np.unique(np.linspace(0, total - 1, count).round().astype(int))
        return [(int(p) * SAMPLE_BAND, min(int(p) * SAMPLE_BAND + SAMPLE_BAND, m)) for p in picks]
    rows = max(BLOCK, BAND_WINDOWS // max(m2, 1) // BLOCK * BLOCK)
    return [(i, min(i + rows, m)) for i in range(0, m, rows)]


def _downsample(img: np.ndarray, name: str) -> np.ndarray:
    """msssim.downsample into a scratch array: 2x2 mean, an odd last row/column repeated
    (so an edge pixel pair averages with itself: half the pair's sum)."""
    h, w = img.shape
    he, we = h - h % 2, w - w % 2
    out = _scratch.get(name, ((h + 1) // 2, (w + 1) // 2))
    rows = _scratch.get(name + ".rows", (he // 2, w))
    np.add(img[0:he:2], img[1:he:2], out=rows)       # row pairs first: contiguous inner loops
    body = out[:he // 2, :we // 2]
    np.add(rows[:, 0:we:2], rows[:, 1:we:2], out=body)
    body *= np.float32(0.25)
    if w % 2:
        np.multiply(rows[:, -1], np.float32(0.5), out=out[:he // 2, -1])
    if h % 2:
        np.add(img[-1, 0:we:2], img[-1, 1:we:2], out=out[-1, :we // 2])
        out[-1, :we // 2] *= np.float32(0.5)
        if w % 2:
            out[-1, -1] = img[-1, -1]
    return out


# ---- one reference, many decodes -------------------------------------------------------------

class FastReference:
    """The full decode of one image, its pyramid and window statistics, for deciding thresholds.

    A decode x is compared through its difference d = x - ref, in float32: the oracle's
    terms rewritten with x = r + d (exact algebra) need the window sums of d, d*d and
    r*d, all small where x is close to r, and the reference's own sums are taken on
    r - 128; float32 then keeps every score within 6e-7 of the oracle's float64 one
    above 0.85, 1.1e-6 lower, with the BLAS filter, and within 1.1e-7 with the compiled one
    (measured on 40 demo photos; :data:`MARGIN` is 1e-5).
    """

    def __init__(self, ref: np.ndarray, max_windows: int | None = None) -> None:
        """``max_windows``: the statistics of a scale with more windows are first made only
        for the sample of them that :meth:`scores` with that ``max_windows`` uses (the rest
        when a term needs every window)."""
        ref = np.asarray(ref)
        if ref.ndim != 2:
            raise ValueError(f"MS-SSIM works on 2-D luminance arrays, got shape {ref.shape}")
        self.shape = ref.shape
        self.taps, self.scales, self.weights = msssim.parameters(ref.shape)
        self._window = window_of(tuple(float(t) for t in self.taps))
        self._w = [float(w) for w in self.weights]
        self._y = ref
        self._oracle: msssim.Reference | None = None
        # the statistics live in this thread's scratch arrays: one FastReference at a time
        _scratch.generation += 1
        self._generation = _scratch.generation
        # per scale: the image r, 2 r, the window mean mu_r, 2 mu_r and 2 var_r + C2 (the
        # doubled ones are what the terms use: doubling is exact in floating point)
        self.imgs, self.imgs2, self.mu, self.mu2, self.var2 = [], [], [], [], []
        self._max_windows = max_windows
        self._complete: list[bool] = []  # per scale: statistics made for every window
        img = _scratch.get("r0", ref.shape)
        img[...] = ref
        n = len(self.taps)
        for j in range(self.scales):
            if j:
                img = _downsample(img, f"r{j}")
            h, w = img.shape
            m = (h - n + 1, w - n + 1)
            self.imgs.append(img)
            self.imgs2.append(np.multiply(img, np.float32(2), out=_scratch.get(f"r2{j}", img.shape)))
            self.mu.append(_scratch.get(f"mu{j}", m))
            self.mu2.append(_scratch.get(f"mu2{j}", m))
            self.var2.append(_scratch.get(f"var2{j}", m))
            bands = row_bands(*m, max_windows)
            self._statistics(j, bands)
            self._complete.append(bands == row_bands(*m))
        self._weights1: np.ndarray | None = None  # made when a decode first needs the finest bound
        self._d_in_stack = False  # set by _pyramid

    def _statistics(self, j: int, bands: list[tuple[int, int]]) -> None:
        """mu_r, 2 mu_r and 2 var_r + C2 of scale j over the windows of ``bands``."""
        n = len(self.taps)
        img, mu, mu2, var2 = self.imgs[j], self.mu[j], self.mu2[j], self.var2[j]
        for i0, i1 in bands:
            # centred on mid-grey: the window sums of squares stay small enough for float32
            a = _scratch.get("ref", (2, i1 - i0 + n - 1, img.shape[1]))
            np.subtract(img[i0:i1 + n - 1], CENTRE, out=a[0])
            np.multiply(a[0], a[0], out=a[1])
            f = _filter(a, self._window)
            np.add(f[0], CENTRE, out=mu[i0:i1])
            np.multiply(mu[i0:i1], np.float32(2), out=mu2[i0:i1])
            var = _scratch.get("var", f.shape[1:])
            np.multiply(f[0], f[0], out=var)
            np.subtract(f[1], var, out=var)
            np.multiply(var, np.float32(2), out=var2[i0:i1])
            var2[i0:i1] += np.float32(msssim.C2)  # 2 var_r + C2, as each term uses it

    def _complete_statistics(self, j: int) -> None:
        if not self._complete[j]:
            self._statistics(j, row_bands(*self.mu[j].shape))
            self._complete[j] = True

    def _check_current(self) -> None:
        if _scratch.generation != self._generation:
            raise RuntimeError("another FastReference was made in this thread since; it holds the arrays")

    def _finest_bound_weights(self) -> np.ndarray:
        """h (flat) such that 1 - sum(d*d * h) bounds the finest scale's term from below.

        Per window p, cs_p = 1 - var_d / (var_x + var_r + C2) with var_d <= f(d*d)_p (the
        window's second moment of d) and var_x >= 0, so cs_p >= 1 - f(d*d)_p / D_p with
        D_p = var_r + C2. The mean over windows of f(d*d)/D is linear in d*d: it is
        sum_q (d*d)_q h_q with h = f^T(1/D) / windows, the window's adjoint (a full
        correlation, the taps being symmetric) applied once per reference. (Returned
        without the division by the number of windows, done on the sum.)
        """
        n = len(self.taps)
        self._complete_statistics(0)
        var2 = self.var2[0]  # 2 var_r + C2 (float32): var_r comes back to far better than 1
        m, m2 = var2.shape
        pad = n - 1
        inv = _scratch.get("inv", (1, m + 2 * pad, m2 + 2 * pad))
        if pad:  # the zero border of the full correlation (the inside is written below)
            inv[:, :pad] = 0
            inv[:, -pad:] = 0
            inv[:, :, :pad] = 0
            inv[:, :, -pad:] = 0
        inner = inv[0, pad:pad + m, pad:pad + m2]
        # var_r is float32 here, off by far less than 1: D is taken 1 lower, a safe lower bound
        np.subtract(var2, np.float32(msssim.C2), out=inner)
        inner *= np.float32(0.5)
        np.maximum(inner, np.float32(1), out=inner)
        inner += np.float32(msssim.C2 - 1)
        np.reciprocal(inner, out=inner)
        self._windows = var2.size  # h is f^T(1/D); the division by the window count is in the bound
        return _filter(inv, self._window, name="h")[0].ravel()

    def _finest_lower_bound(self, d: np.ndarray) -> float:
        if self._weights1 is None:
            self._weights1 = self._finest_bound_weights()
        d2 = _scratch.get("dd", d.shape)
        np.multiply(d, d, out=d2)
        deficit = float(np.dot(d2.ravel(), self._weights1)) / self._windows
        # float32 sums: allow 0.1% on the deficit, orders of magnitude above their rounding
        return max(0.0, 1.0 - deficit * 1.001)

    def _term(self, j: int, d: np.ndarray, max_windows: int | None = None) -> float:
        """Scale j's term of MS-SSIM(r + d, r): msssim.Reference.terms with x = r + d.

        Computed band by band (:func:`row_bands`); with ``max_windows`` (only the table
        asks for it) the mean over a systematic sample of about that many windows."""
        mu_r, mu2, var2, r2 = self.mu[j], self.mu2[j], self.var2[j], self.imgs2[j]
        n = len(self.taps)
        m, m2 = mu_r.shape
        last = j == self.scales - 1
        total, count = 0.0, 0
        bands = row_bands(m, m2, max_windows)
        if max_windows != self._max_windows:
            self._complete_statistics(j)
        in_place = j == 0 and self._d_in_stack and bands == [(0, m)]
        for i0, i1 in bands:
            rows, out = slice(i0, i1 + n - 1), slice(i0, i1)
            if in_place:  # d is already the stack's first image (_pyramid); d*d stays in the second
                a = _scratch.get("a0", (3, *d.shape))
            else:
                a = _scratch.get("a", (3, i1 - i0 + n - 1, d.shape[1]))
                a[0] = d[rows]
            np.multiply(a[0], a[0], out=a[1])
            np.multiply(a[0], r2[rows], out=a[2])  # 2 r d
            f = _filter(a, self._window)
            mu_d = f[0]
            cov2 = _scratch.get("t1", mu_d.shape)
            np.multiply(mu2[out], mu_d, out=cov2)
            np.subtract(f[2], cov2, out=cov2)      # 2 cov(r, d)
            cov2 += var2[out]                      # 2 cov(x, r) + C2 = 2 var_r + 2 cov(r, d) + C2
            den = _scratch.get("t2", mu_d.shape)
            np.multiply(mu_d, mu_d, out=den)
            np.subtract(f[1], den, out=den)        # var_d
            den += cov2                            # var_x + var_r + C2
            cs_map = np.divide(cov2, den, out=cov2)
            if last:
                mu_x = mu_r[out] + mu_d
                lum = (2 * mu_x * mu_r[out] + msssim.C1) / (mu_x * mu_x + mu_r[out] * mu_r[out] + msssim.C1)
                cs_map *= lum
            total += float(cs_map.sum(dtype=np.float64))
            count += cs_map.size
        return total / count

    def oracle_score(self, y: np.ndarray) -> float:
        if self._oracle is None:
            self._oracle = msssim.Reference(self._y)
        return self._oracle.ms_ssim(y)

    def _pyramid(self, y: np.ndarray) -> list[np.ndarray]:
        self._check_current()
        x = np.asarray(y)
        if x.shape != self.shape:
            raise ValueError(f"image is {x.shape}, reference is {self.shape}")
        # an image of one band has d made in place in the finest term's stack (one copy less)
        self._d_in_stack = len(row_bands(*self.mu[0].shape)) == 1
        d = _scratch.get("a0", (3, *self.shape))[0] if self._d_in_stack else _scratch.get("d0", self.shape)
        np.subtract(x, self.imgs[0], out=d)         # uint8 - float32: float32, exact (integers)
        out = [d]
        for j in range(1, self.scales):
            out.append(_downsample(out[-1], f"p{j}"))
        return out

    def score_terms(self, y: np.ndarray) -> np.ndarray:
        """Every scale's term (for the tests: compare with msssim.Reference.terms)."""
        pyramid = self._pyramid(y)
        return np.array([self._term(j, pyramid[j]) for j in range(self.scales)])

    def scores(self, y: np.ndarray, exact_near: Sequence[float] = (), max_windows: int | None = None
               ) -> tuple[float, float, bool]:
        """(MS-SSIM, PSNR, whether the MS-SSIM is an estimate) of ``y``, for the quality table.

        MS-SSIM from every scale's term as :meth:`score_terms` computes it (float32 sums,
        within 2e-6 of :class:`.msssim.Reference`); a score within :data:`MARGIN` of a
        value in ``exact_near`` (the thresholds a reader compares it with) is the oracle's
        own. With ``max_windows``, a scale with more windows than that has its term (a
        mean over windows) estimated on a systematic sample of them (:func:`row_bands`);
        an estimate within :data:`ESTIMATE_MARGIN` of a value in ``exact_near`` is
        computed on every window instead. PSNR is exact: the squared differences are
        integers, summed in float64 without rounding, so it equals :func:`.msssim.psnr`.
        """
        pyramid = self._pyramid(y)
        d = pyramid[0]
        psnr = None
        if max_windows is not None and any(mu.size > max_windows for mu in self.mu):
            psnr = msssim.psnr_of_mse(_sum_of_squares(d) / d.size)
            terms = np.array([self._term(j, pyramid[j], max_windows) for j in range(self.scales)])
            score = float(np.prod(np.maximum(terms, 0.0) ** self.weights))
            if not any(abs(score - t) <= ESTIMATE_MARGIN for t in exact_near):
                return score, psnr, True
        terms = np.array([self._term(j, pyramid[j]) for j in range(self.scales)])
        score = float(np.prod(np.maximum(terms, 0.0) ** self.weights))
        if psnr is None:
            # the finest term left d*d, every pixel of it, in its stack when d was made there
            squares = (float(_scratch.get("a0", (3, *d.shape))[1].sum(dtype=np.float64)) if self._d_in_stack
                       else _sum_of_squares(d))
            psnr = msssim.psnr_of_mse(squares / d.size)
        if any(abs(score - t) <= MARGIN for t in exact_near):
            score = self.oracle_score(y)
        return score, psnr, False

    def reached(self, y: np.ndarray, thresholds: Sequence[float], stats: SearchStats) -> list[bool]:
        """For each threshold, whether the MS-SSIM of ``y`` reaches it (score >= threshold)."""
        pyramid = self._pyramid(y)
        w = self._w
        lowest = min(thresholds)
        coarse = 1.0  # product of the scored coarse terms' powers; unscored ones count as 1, their maximum
        for j in reversed(range(1, self.scales)):
            coarse *= max(self._term(j, pyramid[j]), 0.0) ** w[j]
            if coarse < lowest - MARGIN:
                stats.rejected_early += 1
                return [False] * len(thresholds)
        upper = coarse
        if self.scales > 1:
            # the finest scale costs 3/4 of the work: first try deciding on its bounds
            lower = coarse * self._finest_lower_bound(pyramid[0]) ** w[0]
            decided = [True if lower >= t + MARGIN else False if upper < t - MARGIN else None
                       for t in thresholds]
            if None not in decided:
                stats.bounded += 1
                return decided
        score = coarse * max(self._term(0, pyramid[0]), 0.0) ** w[0]
        stats.scored += 1
        if any(abs(score - t) <= MARGIN for t in thresholds):
            stats.oracle += 1
            score = self.oracle_score(y)
        return [score >= t for t in thresholds]


def _sum_of_squares(d: np.ndarray) -> float:
    """Sum of d*d over an integer-valued float32 image, exactly (float64 sums of integers)."""
    h, w = d.shape
    rows = max(1, BAND_WINDOWS // max(w, 1))
    total = 0.0
    for i in range(0, h, rows):
        block = d[i:i + rows]
        sq = _scratch.get("sq", block.shape)
        np.multiply(block, block, out=sq)
        total += float(sq.sum(dtype=np.float64))
    return total


# ---- decoding --------------------------------------------------------------------------------

def _luma_is_first_component(im: Image.Image) -> bool:
    """Whether libjpeg's greyscale output of this JPEG is its first component alone.

    libjpeg (jdapimin.c, default_decompress_parms) takes a 3-component JPEG as YCbCr
    when it has a JFIF marker, when an Adobe marker says transform 1, or, with neither,
    unless the component ids spell 'R','G','B'; greyscale output of YCbCr is Y alone.
    Conservatively, only the cases that are surely YCbCr answer True.
    """
    layers = getattr(im, "layer", None) or []
    if len(layers) == 1:
        return True
    if len(layers) != 3 or im.mode not in ("RGB", "YCbCr"):
        return False
    if "jfif" in im.info:
        return True
    if "adobe" in im.info:
        return im.info.get("adobe_transform") == 1
    return tuple(c[0] for c in layers) == YCBCR_IDS


def luma_scans(data: bytes) -> list[bool] | None:
    """Per scan of ``data`` (one scan group each), whether it can change the luminance;
    None when that cannot be told (then every k is decoded)."""
    with Image.open(io.BytesIO(data)) as im:
        return _luma_scans_of(im, data)


def _luma_scans_of(im: Image.Image, data: bytes) -> list[bool] | None:
    if not _luma_is_first_component(im):
        return None
    luma = im.layer[0][0]
    return [luma in comps for comps in scan_components(data)]


def _source_luma(source: bytes, im: Image.Image) -> np.ndarray | None:
    """The luminance of ``source`` if it surely equals that of ``im`` (the full file), else None.

    ``source`` is the JPEG that ``convert`` transcoded losslessly into ``im``: the same DCT
    coefficients and quantisation tables, so libjpeg's greyscale output of either is the
    same Y plane (their first component through the same IDCT; a complete progressive
    file needs no block smoothing). A baseline file decodes in about a third of the time.
    Anything that does not look like that very pair (another size, other components or
    tables, a colour space whose grey output is a conversion) answers None.
    """

    try:
        with Image.open(io.BytesIO(source)) as src:
            if (src.format != "JPEG" or src.size != im.size or src.mode != im.mode
                    or getattr(src, "layer", None) != getattr(im, "layer", None)
                    or getattr(src, "quantization", None) != getattr(im, "quantization", None)
                    or not _luma_is_first_component(src)):
                return None
            y = luma_of(src)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return y


def reference_luma(full: bytes, n_groups: int, source: bytes | None = None,
                   stats: SearchStats | None = None) -> tuple[list[bool] | None, np.ndarray]:
    """(per scan group, whether it can change the luminance, or None if that cannot be
    told; the full decode's luminance) from one parse of the image's full file ``full``.
    ``source``: as for :func:`search_ks`."""
    with Image.open(io.BytesIO(full)) as im:  # one parse for both
        changes = _luma_scans_of(im, full)
        y_full = None
        if source is not None and changes is not None:
            y_full = _source_luma(source, im)
            if stats is not None:
                stats.source_references += y_full is not None
        if y_full is None:
            y_full = luma_of(im)
    if changes is not None and len(changes) != n_groups:
        changes = None
    return changes, y_full


def search_ks(file_at: Callable[[int], bytes], n_groups: int, thresholds: Sequence[float],
              stats: SearchStats | None = None, source: bytes | None = None) -> np.ndarray:
    """u1[T]: per threshold, the smallest k whose MS-SSIM reaches it (``n_groups`` if none below it does).

    ``file_at(k)`` is the image's file with its first k scan groups. Equal to
    ``adaptive.smallest_k(measure_image(..., stop_at=max(thresholds)).ms_ssim, n, thresholds)``.
    ``source``: the JPEG the store's file was losslessly transcoded from, if at hand (during
    ``convert``); its decode stands in for the full one (:func:`_source_luma`).
    Raises what decoding raises (OSError, ValueError, ...) for a damaged image.
    """

    local = SearchStats(images=1)
    ks = np.full(len(thresholds), n_groups, dtype=np.uint8)
    if n_groups > 1:
        changes, y_full = reference_luma(file_at(n_groups), n_groups, source, local)
        ref = FastReference(y_full)
        open_t = list(range(len(thresholds)))
        for k in range(1, n_groups):
            if not open_t:
                break
            if k > 1 and changes is not None and not changes[k - 1]:
                local.skipped += 1  # same luminance as k-1, which reached none of the open thresholds
                continue
            local.decodes += 1
            hits = ref.reached(decode_luma(file_at(k)), [thresholds[t] for t in open_t], local)
            for t, hit in zip(list(open_t), hits):
                if hit:
                    ks[t] = k
                    open_t.remove(t)
    if stats is not None:
        stats.add(local)
    return ks


def file_reader(store, i: int) -> Callable[[int], bytes]:
    """``file_at`` for :func:`search_ks` over image ``i`` of an open store."""
    return lambda k: store.read(i, k)


# OpenBLAS kernel sets (threadpoolctl's "architecture") older than AVX2: its sgemm there is
# 2-6x slower at the banded products of the fallback filter, and the search with it ~1.5x
# (measured with OPENBLAS_CORETYPE); the compiled filter uses no BLAS
PRE_AVX2_KERNELS = frozenset({
    "katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn", "dunnington",
    "nehalem", "athlon", "opteron", "opteron_sse3", "barcelona", "nano", "bobcat", "sandybridge",
    "bulldozer", "piledriver", "steamroller", "excavator"})


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def blas_kernel_note(blas: Sequence[dict] | None = None, cpu_flags: set[str] | None = None,
                     compiled: bool | None = None) -> str | None:
    """A line for a host that filters with BLAS (the compiled filter not built) and whose
    OpenBLAS runs kernels older than its CPU (AVX2 present, an SSE or AVX kernel set chosen:
    an unrecognised CPU model, OPENBLAS_CORETYPE), else None. ``blas``: threadpoolctl's
    records, ``cpu_flags``: /proc/cpuinfo's, ``compiled``: :data:`USE_COMPILED` (for the tests)."""
    if compiled is None:
        compiled = USE_COMPILED
    if compiled:
        return None  # the compiled filter's cost does not depend on BLAS
    if cpu_flags is None:
        cpu_flags = _cpu_flags()
    if "avx2" not in cpu_flags:
        return None  # the kernels are what the CPU can run
    if blas is None:
        try:
            from threadpoolctl import threadpool_info
        except ImportError:  # pragma: no cover - a dependency
            return None
        blas = threadpool_info()
    slow = sorted({str(i.get("architecture")) for i in blas if i.get("internal_api") == "openblas"
                   and str(i.get("architecture", "")).lower() in PRE_AVX2_KERNELS})
    if not slow:
        return None
    return (f"pcrfs was installed without its compiled SSIM filter (pcrfs.quality._ssimfilter: no C compiler "
            f"at install time?), and OpenBLAS runs its {'/'.join(slow)} kernels on this AVX2 CPU, so MS-SSIM "
            f"scoring takes about 1.5x the CPU time; OPENBLAS_CORETYPE=Haswell (or Zen, SkylakeX) set before "
            f"the command picks faster ones, reinstalling pcrfs with gcc at hand builds the filter")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS on one thread while scoring: the products are small, and OpenBLAS's threads
    would spin on the cores that other images (processes, Dask workers) are using.
    Enter it around a loop, not per image, and not from several threads at once."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it BLAS just keeps its threads
        ctx = nullcontext()
    else:
        ctx = threadpool_limits(1, user_api="blas")
    with ctx:
        yield
