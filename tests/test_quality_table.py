"""The quality table's fast path (measure.score_image, search.FastReference.scores) against the
exhaustive float64 computation (measure.measure_image), the estimate for large images, the timed
subset, the progress advice, and tools/bench_quality.py's edge cases. No timings are asserted."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pcrfs
from corpus import make_edge_cases
from pcrfs.cli import main
from pcrfs.cli import quality as quality_cli
from pcrfs.convert import convert
from pcrfs.demo import demo_photos
from pcrfs.quality import luma, measure, msssim, search

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-6  # |fast - exhaustive| MS-SSIM: float32 window sums (measured worst 1.1e-6, at scores near 0.75)


def assert_same_scores(fast: measure.ImageScores, exact: measure.ImageScores) -> None:
    assert fast.n_groups == exact.n_groups and np.array_equal(fast.sizes, exact.sizes)
    np.testing.assert_allclose(fast.ms_ssim, exact.ms_ssim, rtol=0, atol=TOL)
    assert np.array_equal(fast.psnr, exact.psnr)  # exact: integer squared differences, float64 sums
    assert not fast.estimated


@pytest.fixture(scope="module")
def edge_store(tmp_path_factory):
    """tests/corpus.py's edge cases: grey, CMYK, subsamplings, restart markers, 1x1, odd sizes..."""
    root = tmp_path_factory.mktemp("edge-table")
    make_edge_cases(root / "src")
    convert(root / "src", root / "s.pcr", workers=2)
    s = pcrfs.open_store(root / "s.pcr")
    yield s
    s.close()


def grey_photo(name: str = "astronaut") -> np.ndarray:
    a = demo_photos()[name]
    return np.asarray(Image.fromarray(a).convert("L")) if a.ndim == 3 else a


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


# ---- the fast path is the exhaustive computation ------------------------------------------------

def test_every_k_of_demo_images_equals_the_exhaustive_scores(reader):
    with search.single_threaded_blas():
        for i in range(0, reader.num_images, 7):
            assert_same_scores(measure.score_image(reader, i, timing=True), measure.measure_image(reader, i))


def test_every_edge_case_equals_the_exhaustive_scores(edge_store):
    for i in range(edge_store.num_images):
        assert_same_scores(measure.score_image(edge_store, i), measure.measure_image(edge_store, i))


def test_fast_table_equals_the_exhaustive_table(reader):
    fast = measure.quality_table(reader, sample=10, seed=5, timing=False, workers=2)
    slow = measure.quality_table(reader, sample=10, seed=5, timing=False, workers=1, exhaustive=True)
    assert fast.sample == slow.sample and not fast.estimated
    for a, b in zip(fast.rows, slow.rows):
        assert (a.view, a.k, a.bytes_mean, a.fraction_total, a.fraction_p5) == \
            (b.view, b.k, b.bytes_mean, b.fraction_total, b.fraction_p5)
        assert (a.psnr_mean, a.psnr_p5) == (b.psnr_mean, b.psnr_p5)
        for key in ("ms_ssim_mean", "ms_ssim_p5", "ms_ssim_min"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), abs=TOL)


def test_scores_near_a_threshold_are_the_oracles(reader):
    i = 3
    n = reader.n_groups(i)
    full = luma.decode_luma(reader.read(i, n))
    y = luma.decode_luma(reader.read(i, 2))
    exact = msssim.Reference(full).ms_ssim(y)
    fast = search.FastReference(full)
    score, _psnr, estimated = fast.scores(y)
    assert score == pytest.approx(exact, abs=TOL) and not estimated
    # a reader comparing with a threshold within MARGIN of it gets the oracle's own value
    assert fast.scores(y, exact_near=[score + search.MARGIN / 2])[0] == exact


# ---- large images: a sample of the windows ------------------------------------------------------

def test_row_bands_cover_every_row_or_a_spread_sample():
    assert search.row_bands(100, 50) == [(0, 100)]
    bands = search.row_bands(5000, 4000)  # a 20 Mpx image: bands of BAND_WINDOWS windows
    assert bands[0][0] == 0 and bands[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert all((i1 - i0) * 4000 <= search.BAND_WINDOWS for i0, i1 in bands)
    sampled = search.row_bands(5000, 4000, max_windows=1 << 21)
    rows = sum(i1 - i0 for i0, i1 in sampled)
    assert abs(rows * 4000 - (1 << 21)) <= search.SAMPLE_BAND * 4000
    assert sampled[0][0] == 0 and sampled[-1][1] == 5000  # from the first row to the last
    assert all(a[1] <= b[0] for a, b in zip(sampled, sampled[1:]))
    assert search.row_bands(100, 50, max_windows=1 << 21) == [(0, 100)]  # small: every window


def test_estimate_of_a_large_image_is_close_and_flagged():
    ref = grey_photo()  # 512x512: 502x502 windows at scale 1, sampled with max_windows=2**16
    fast = search.FastReference(ref)
    for quality in (10, 40, 85):
        y = jpeg_roundtrip(ref, quality)
        exact, psnr, flag = fast.scores(y)
        est, psnr_est, estimated = fast.scores(y, max_windows=1 << 16)
        assert estimated and not flag
        assert psnr_est == psnr  # PSNR is always over every pixel
        assert est == pytest.approx(exact, abs=2e-3) and est != exact
        # close to a threshold a reader compares with: computed on every window after all
        assert fast.scores(y, exact_near=[est + search.ESTIMATE_MARGIN / 2], max_windows=1 << 16) == \
            (exact, psnr, False)


def test_table_records_estimated_images(reader):
    table = measure.quality_table(reader, sample=4, seed=1, timing=False, sample_windows=1 << 16)
    assert table.estimated == table.sample and table.sample_windows == 1 << 16
    exact = measure.quality_table(reader, sample=4, seed=1, timing=False, sample_windows=None)
    assert exact.estimated == [] and exact.sample_windows is None
    for a, b in zip(table.fixed_rows(), exact.fixed_rows()):
        assert a.ms_ssim_mean == pytest.approx(b.ms_ssim_mean, abs=5e-3)
        assert a.psnr_mean == b.psnr_mean


def blas_threads(_job) -> list[int]:
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_scoring_workers_keep_one_blas_thread(demo_store):
    """The workers' BLAS limit is set once and held (a dropped context manager undid it)."""
    with pcrfs.open_store(demo_store) as store:
        got = list(measure._in_processes(store, blas_threads, [0, 1, 2, 3], 2, 1, None,
                                         initializer=measure._init_search_worker))
    assert got and all(threads == [1] * len(threads) for threads in got), got


def test_a_blas_slower_than_the_cpu_is_named():
    """Only where the scoring filters with BLAS: the compiled filter does not use it."""
    old = [{"internal_api": "openblas", "architecture": "Nehalem"}]
    new = [{"internal_api": "openblas", "architecture": "SkylakeX"}]
    note = search.blas_kernel_note(old, {"sse2", "avx", "avx2"}, compiled=False)
    assert note and "Nehalem" in note and "OPENBLAS_CORETYPE=Haswell" in note and "_ssimfilter" in note
    assert search.blas_kernel_note(new, {"avx2", "avx512f"}, compiled=False) is None
    assert search.blas_kernel_note(old, {"sse2", "sse4_2"}, compiled=False) is None  # nothing newer to run
    assert search.blas_kernel_note(old, {"sse2", "avx", "avx2"}, compiled=True) is None


# ---- timing on a subset --------------------------------------------------------------------------

def test_timed_subset_is_spread_over_the_sample():
    assert measure.timed_subset(range(10), 32) == set(range(10))
    picked = sorted(measure.timed_subset(range(0, 2000, 10), 32))
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 1990


def test_table_times_a_subset(reader):
    table = measure.quality_table(reader, sample=9, seed=2, timing=True, timed_images=3)
    assert len(table.timed) == 3 and set(table.timed) <= set(table.sample)
    assert all(r.decode_ms_mean > 0 for r in table.rows)
    doc = table.as_dict()
    assert doc["timed"] == table.timed and doc["estimated"] == []


# ---- the command line ------------------------------------------------------------------------------

def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert "Traceback" not in result.output
    return result


def test_cli_advice_when_the_table_will_be_long(demo_store, monkeypatch):
    monkeypatch.setattr(quality_cli, "ADVICE_AFTER_S", 0.0)
    res = run_cli("quality", str(demo_store), "--sample", "6", "-j", "1", "-q")
    assert res.exit_code == 0, res.output
    assert "pcrfs: measuring 6 images will take about" in res.output
    assert "--sample 10" in res.output and "--no-timing skips" in res.output
    monkeypatch.setattr(quality_cli, "ADVICE_AFTER_S", 1e9)
    res = run_cli("quality", str(demo_store), "--sample", "6", "-j", "1", "-q")
    assert "will take about" not in res.output


def test_cli_exact_and_the_notes(demo_store):
    res = run_cli("quality", str(demo_store), "--sample", "5", "-j", "1", "-q", "--json", "--exact", "--no-timing")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["sample_windows"] is None and doc["estimated"] == [] and doc["timed"] == []
    res = run_cli("quality", str(demo_store), "--sample", "40", "-j", "2", "-q")
    assert res.exit_code == 0, res.output
    assert "decode: mean over 32 of the 40 images" in res.stdout
    res = run_cli("quality", str(demo_store), "--write-index", "--exact")
    assert res.exit_code == 2 and "cannot be combined with --exact" in res.output


# ---- tools/bench_quality.py -----------------------------------------------------------------------

def test_bench_quality_runs_without_dask_rounds(tmp_path):
    """--dask-rounds 0 used to divide by zero; the smallest run of the cost benchmark."""
    out = tmp_path / "bq"
    res = subprocess.run([sys.executable, "tools/bench_quality.py", "--per-class", "1", "--cost-images", "3",
                          "--cost-rounds", "1", "--convert-rounds", "0", "--dask-rounds", "0", "-j", "1",
                          "--no-table", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["dask_write_index"] is None and doc["scoring_cost"]["identical_ks"]
    assert doc["machine"]["cpu"]
