"""MS-SSIM (Wang, Simoncelli, Bovik 2003) and PSNR on 8-bit luminance, with numpy.

The definitions follow the paper and its reference MATLAB code (``msssim.m``):

* SSIM statistics come from an 11x11 Gaussian window (sigma 1.5), applied as
  two separable 1-D passes over the *valid* region only (no padding), with
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L = 255`` and population
  (not sample) variances. At scale 1 the mean of the SSIM map equals
  scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)``.
* Between scales both images are low-passed with a 2x2 mean and subsampled by
  2 (an odd last row/column is repeated, like ``imfilter(..., 'symmetric')``).
* ``MS-SSIM = prod_{j<M} cs_j^w_j * (l_M cs_M)^w_M`` with the paper's weights
  ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` and M = 5, where ``cs_j`` is the
  mean contrast-structure term at scale j and ``l_M cs_M`` the mean SSIM at the
  coarsest scale. A negative mean term is clamped to 0 (as pytorch-msssim and
  TensorFlow do) so the fractional powers stay real.

Images too small for five scales (the coarsest must still be at least 11 px
on its short side, i.e. >= 161 px at full size) use as many scales as fit with
their weights renormalised to sum to 1; images under 11 px use a window as
large as they are.

:class:`Reference` precomputes the pyramid and window statistics of one image
so that comparing several decodes against it (every k of one image) costs
three filtered products per scale instead of five.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:  # C implementation of the 1-D correlation: ~2.5x faster than the numpy loop
    from scipy.ndimage import correlate1d as _correlate1d
except ImportError:  # pragma: no cover - exercised by forcing USE_SCIPY = False in the tests
    _correlate1d = None

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, Table/section 3.2
WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
DATA_RANGE = 255.0
C1 = (K1 * DATA_RANGE) ** 2
C2 = (K2 * DATA_RANGE) ** 2
PSNR_CAP = 60.0  # dB: identical (and near-identical) images count as this, so means stay finite

USE_SCIPY = _correlate1d is not None


def gaussian_taps(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian the 2-D window is the outer product of."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x * x) / (2 * sigma * sigma))
    return taps / taps.sum()


def _valid_1d(img: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along ``axis`` and keep only the positions the whole window covers."""
    n = len(taps)
    m = img.shape[axis] - n + 1
    if USE_SCIPY:
        half = n // 2
        full = _correlate1d(img, taps, axis=axis, mode="constant")
        return full[half:half + m] if axis == 0 else full[:, half:half + m]
    take = (lambda j: img[j:j + m]) if axis == 0 else (lambda j: img[:, j:j + m])
    out = taps[0] * take(0)
    for j in range(1, n):
        out += taps[j] * take(j)
    return out


def filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable Gaussian window over the valid region: (H-n+1, W-n+1)."""
    return _valid_1d(_valid_1d(img, taps, 0), taps, 1)


def downsample(img: np.ndarray) -> np.ndarray:
    """2x2 mean then every other pixel; an odd last row/column is repeated first."""
    h, w = img.shape
    if h % 2:
        img = np.concatenate([img, img[-1:]], axis=0)
    if w % 2:
        img = np.concatenate([img, img[:, -1:]], axis=1)
    return 0.25 * (img[0::2, 0::2] + img[1::2, 0::2] + img[0::2, 1::2] + img[1::2, 1::2])


def scales_for(shape: tuple[int, int], max_scales: int = len(WEIGHTS), window: int = WINDOW) -> int:
    """How many scales fit: the coarsest must still hold one whole window."""
    side = min(shape)
    m = 1
    while m < max_scales:
        side = (side + 1) // 2
        if side < window:
            break
        m += 1
    return m


def parameters(shape: tuple[int, int], max_scales: int = len(WEIGHTS)) -> tuple[np.ndarray, int, np.ndarray]:
    """(window taps, number of scales, scale weights) for an image of ``shape``."""
    window = min(WINDOW, min(shape) if min(shape) % 2 else min(shape) - 1)
    taps = gaussian_taps(max(window, 1))
    scales = scales_for(shape, max_scales, len(taps))
    w = np.asarray(WEIGHTS[:scales])
    # the paper's five weights as published (they sum to 1.0001); fewer scales: renormalised
    return taps, scales, (w if scales == len(WEIGHTS) else w / w.sum())


def _as_luma(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"MS-SSIM works on 2-D luminance arrays, got shape {a.shape}")
    return a.astype(np.float64, copy=False)


@dataclass
class _Level:
    img: np.ndarray
    mu: np.ndarray      # window mean
    var: np.ndarray     # window variance (population)


class Reference:
    """One reference image, ready to be compared with any number of distorted versions."""

    def __init__(self, ref: np.ndarray, max_scales: int = len(WEIGHTS)) -> None:
        ref = _as_luma(ref)
        self.shape = ref.shape
        self.taps, self.scales, self.weights = parameters(ref.shape, max_scales)
        self._ref = ref
        self.levels: list[_Level] = []
        img = ref
        for j in range(self.scales):
            if j:
                img = downsample(img)
            mu = filter_valid(img, self.taps)
            var = filter_valid(img * img, self.taps) - mu * mu
            self.levels.append(_Level(img, mu, var))

    def terms(self, img: np.ndarray) -> np.ndarray:
        """Per scale: the mean contrast-structure term, except at the coarsest
        scale, where it is the mean SSIM map (luminance times contrast-structure)."""
        x = _as_luma(img)
        if x.shape != self.shape:
            raise ValueError(f"image is {x.shape}, reference is {self.shape}")
        out = np.empty(self.scales)
        for j, lev in enumerate(self.levels):
            if j:
                x = downsample(x)
            mu_x = filter_valid(x, self.taps)
            var_x = filter_valid(x * x, self.taps) - mu_x * mu_x
            cov = filter_valid(x * lev.img, self.taps) - mu_x * lev.mu
            cs_map = (2 * cov + C2) / (var_x + lev.var + C2)
            if j == self.scales - 1:
                cs_map *= (2 * mu_x * lev.mu + C1) / (mu_x * mu_x + lev.mu * lev.mu + C1)
            out[j] = cs_map.mean()
        return out

    def ms_ssim(self, img: np.ndarray) -> float:
        terms = np.maximum(self.terms(img), 0.0)
        return float(np.prod(terms ** self.weights))

    def ssim(self, img: np.ndarray) -> float:
        """Single-scale SSIM: the mean SSIM map at scale 1 (no pyramid)."""
        x = _as_luma(img)
        lev = self.levels[0]
        mu_x = filter_valid(x, self.taps)
        var_x = filter_valid(x * x, self.taps) - mu_x * mu_x
        cov = filter_valid(x * lev.img, self.taps) - mu_x * lev.mu
        ssim_map = ((2 * mu_x * lev.mu + C1) * (2 * cov + C2)
                    / ((mu_x * mu_x + lev.mu * lev.mu + C1) * (var_x + lev.var + C2)))
        return float(ssim_map.mean())

    def psnr(self, img: np.ndarray) -> float:
        return psnr(self._ref, img)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM of ``b`` against ``a`` (symmetric), both 2-D 8-bit-range arrays of one shape."""
    return Reference(a).ms_ssim(b)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Single-scale SSIM with the same window and constants as MS-SSIM's first scale."""
    return Reference(a, max_scales=1).ssim(b)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (peak 255), capped at PSNR_CAP for identical images."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return psnr_of_mse(float(np.mean((a - b) ** 2)))


def psnr_of_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error (peak 255), capped at PSNR_CAP."""
    if mse == 0:
        return PSNR_CAP
    return min(PSNR_CAP, float(10.0 * np.log10(DATA_RANGE * DATA_RANGE / mse)))
