"""MS-SSIM and PSNR (pcrfs.quality.msssim) against known values and a reference implementation."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcrfs.quality import msssim

skimage = pytest.importorskip("skimage")
from skimage.metrics import structural_similarity  # noqa: E402


def sample_photo(name: str) -> np.ndarray:
    """Luminance of one of the photographs scikit-image ships (read from disk, never downloaded)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    if not path.is_file():
        pytest.skip(f"scikit-image has no {name}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def box_blur3(img: np.ndarray) -> np.ndarray:
    """3x3 mean in integer arithmetic (exactly reproducible anywhere)."""
    a = np.pad(img.astype(np.int64), 1, mode="edge")
    h, w = img.shape
    return sum(a[i:i + h, j:j + w] for i in range(3) for j in range(3)) // 9


PHOTOS = ["astronaut.png", "camera.png", "coffee.png", "chelsea.png", "moon.png"]


def test_weights_and_window_are_the_papers():
    assert msssim.WEIGHTS == (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    taps = msssim.gaussian_taps()
    assert len(taps) == 11 and taps.sum() == pytest.approx(1.0, abs=1e-15)
    assert taps[5] == taps.max() and np.allclose(taps, taps[::-1])


@pytest.mark.parametrize("name", PHOTOS[:3])
def test_identical_images_score_one(name):
    img = sample_photo(name)
    assert msssim.ms_ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert msssim.ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert msssim.psnr(img, img) == msssim.PSNR_CAP


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("quality", [10, 40, 85])
def test_scale_one_agrees_with_scikit_image(name, quality):
    # at one scale, MS-SSIM's statistics are exactly scikit-image's Gaussian SSIM
    ref = sample_photo(name)
    test = jpeg_roundtrip(ref, quality)
    expected = structural_similarity(ref.astype(np.float64), test.astype(np.float64), gaussian_weights=True,
                                     sigma=1.5, use_sample_covariance=False, data_range=255)
    assert msssim.ssim(ref, test) == pytest.approx(expected, abs=1e-10)
    assert msssim.Reference(ref).ssim(test) == pytest.approx(expected, abs=1e-10)


def test_known_value_from_an_independent_implementation():
    # camera.png (512x480 crop) against its integer 3x3 box blur. 0.9805600863907028 is
    # pytorch-msssim 1.0.0's ms_ssim on the same float64 arrays with a float64 Gaussian
    # window (its default float32 window gives 0.98056035). Even sizes down to the last
    # scale, so both implementations downsample identically.
    ref = sample_photo("camera.png")[:512, :480]
    test = box_blur3(ref)
    assert msssim.ms_ssim(ref, test) == pytest.approx(0.9805600863907028, abs=1e-9)


def test_numpy_fallback_matches_scipy(monkeypatch):
    ref = sample_photo("coffee.png")[:301, :407]  # odd sizes on purpose
    test = jpeg_roundtrip(ref, 30)
    with_scipy = msssim.ms_ssim(ref, test)
    monkeypatch.setattr(msssim, "USE_SCIPY", False)
    assert msssim.ms_ssim(ref, test) == pytest.approx(with_scipy, abs=1e-12)


def test_degrades_monotonically():
    ref = sample_photo("astronaut.png")
    by_quality = [msssim.ms_ssim(ref, jpeg_roundtrip(ref, q)) for q in (95, 75, 50, 25, 10, 3)]
    assert all(a > b for a, b in zip(by_quality, by_quality[1:])), by_quality
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(ref.shape)
    by_noise = [msssim.ms_ssim(ref, np.clip(ref + s * noise, 0, 255)) for s in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:])), by_noise
    psnrs = [msssim.psnr(ref, jpeg_roundtrip(ref, q)) for q in (95, 50, 10)]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert 0 <= by_noise[-1] < by_quality[0] < 1


def test_symmetric_and_reference_reuse():
    ref = sample_photo("chelsea.png")
    a, b = jpeg_roundtrip(ref, 20), jpeg_roundtrip(ref, 60)
    assert msssim.ms_ssim(ref, a) == pytest.approx(msssim.ms_ssim(a, ref), abs=1e-12)
    r = msssim.Reference(ref)
    assert r.ms_ssim(a) == pytest.approx(msssim.ms_ssim(ref, a), abs=1e-15)
    assert r.ms_ssim(b) == pytest.approx(msssim.ms_ssim(ref, b), abs=1e-15)


def test_psnr_known_values():
    a = np.zeros((8, 8), np.uint8)
    b = a.copy()
    b[0, 0] = 255  # MSE = 255^2 / 64
    assert msssim.psnr(a, b) == pytest.approx(10 * np.log10(64), abs=1e-12)
    assert msssim.psnr(a, a + 1) == pytest.approx(48.1308036, abs=1e-6)  # MSE 1
    assert msssim.psnr(a, a) == msssim.PSNR_CAP


def test_small_images_use_fewer_scales():
    assert msssim.scales_for((500, 375)) == 5
    assert msssim.scales_for((161, 300)) == 5  # 161 -> 81 -> 41 -> 21 -> 11
    assert msssim.scales_for((160, 300)) == 4  # ... -> 20 -> 10: no fifth scale
    assert msssim.scales_for((40, 40)) == 2
    assert msssim.scales_for((12, 12)) == 1
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (60, 90)).astype(np.uint8)
    r = msssim.Reference(small)
    assert r.scales == 3 and r.weights.sum() == pytest.approx(1.0)
    assert msssim.ms_ssim(small, small) == pytest.approx(1.0)
    assert 0 <= msssim.ms_ssim(small, box_blur3(small)) < 1
    tiny = small[:5, :7]  # smaller than the window: the window shrinks to fit
    assert msssim.ms_ssim(tiny, tiny) == pytest.approx(1.0)


def test_bad_inputs():
    a = np.zeros((32, 32))
    with pytest.raises(ValueError, match="2-D"):
        msssim.ms_ssim(np.zeros((32, 32, 3)), np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="reference is"):
        msssim.ms_ssim(a, np.zeros((32, 30)))
    with pytest.raises(ValueError, match="shapes differ"):
        msssim.psnr(a, np.zeros((30, 32)))
