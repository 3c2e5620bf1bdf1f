"""The fast threshold search (pcrfs.quality.search) against the exhaustive oracle."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import pcrfs
from corpus import make_edge_cases
from pcrfs.convert import convert
from pcrfs.jpeg.scans import ScanError, scan_components, scan_ends
from pcrfs.quality import luma, measure, msssim, search
from pcrfs.quality import scoring as adaptive
from pcrfs.store.format.adaptiveindex import THRESHOLDS

T = THRESHOLDS


def oracle_ks(store, i: int, thresholds=T) -> np.ndarray:
    """Today's exhaustive answer: every k scored with msssim.Reference until the top threshold."""
    s = measure.measure_image(store, i, stop_at=max(thresholds))
    return adaptive.smallest_k(s.ms_ssim, s.n_groups, thresholds)


def fast_ks(store, i: int, thresholds=T, stats=None) -> np.ndarray:
    return search.search_ks(search.file_reader(store, i), store.n_groups(i), thresholds, stats)


@pytest.fixture(scope="module")
def edge_root(tmp_path_factory):
    """Every edge case of tests/corpus.py that converts: grey, 4:4:4/4:2:2/4:2:0, CMYK,
    restart markers, arithmetic coding, progressive input, 1x1 and odd sizes, non-JPEGs
    (sources in src/, the store in s.pcr)."""
    root = tmp_path_factory.mktemp("edge")
    make_edge_cases(root / "src")
    convert(root / "src", root / "s.pcr", workers=2)
    return root


@pytest.fixture(scope="module")
def edge_store(edge_root):
    s = pcrfs.open_store(edge_root / "s.pcr")
    yield s
    s.close()


@pytest.fixture(scope="module")
def oracle(reader) -> np.ndarray:
    """u1[n, T]: the exhaustive answer for every demo image."""
    ks, failures = adaptive.compute_exhaustive(reader)
    assert not failures
    return ks


# ---- identity with the exhaustive search -------------------------------------------------------

def test_same_ks_as_the_exhaustive_search_on_every_demo_image(reader, oracle):
    stats = search.SearchStats()
    for i in range(reader.num_images):
        assert fast_ks(reader, i, stats=stats).tolist() == oracle[i].tolist(), reader.path(i)
    # the savings happened: chroma-only scans skipped, decisions on bounds
    assert stats.skipped > 0 and stats.rejected_early + stats.bounded > 0


def test_same_ks_on_every_edge_case(edge_store):
    names = set()
    for i in range(edge_store.num_images):
        assert fast_ks(edge_store, i).tolist() == oracle_ks(edge_store, i).tolist(), edge_store.path(i)
        names.add(edge_store.path(i).rsplit("/", 1)[-1])
    assert {"grey.jpg", "cmyk.jpg", "tiny_1x1.jpg", "odd_17x9.jpg"} <= names


def test_same_ks_with_the_source_as_reference(reader, oracle, demo_src):
    """During convert the baseline source's decode stands in for the full decode: same ks."""
    stats = search.SearchStats()
    for i in range(reader.num_images):
        source = (demo_src / reader.path(i)).read_bytes()
        got = search.search_ks(search.file_reader(reader, i), reader.n_groups(i), T, stats, source=source)
        assert got.tolist() == oracle[i].tolist(), reader.path(i)
    assert stats.source_references == reader.num_images  # every demo photo is a baseline YCbCr/grey JPEG


def test_same_ks_with_the_source_on_every_edge_case(edge_root, edge_store):
    stats = search.SearchStats()
    for i in range(edge_store.num_images):
        source = (edge_root / "src" / edge_store.path(i)).read_bytes()
        got = search.search_ks(search.file_reader(edge_store, i), edge_store.n_groups(i), T, stats, source=source)
        assert got.tolist() == oracle_ks(edge_store, i).tolist(), edge_store.path(i)
    assert 0 < stats.source_references < edge_store.num_images  # CMYK, PNG, ... fall back to the full decode


def test_a_source_that_is_not_the_pair_is_not_used(reader):
    i, j = 0, next(j for j in range(1, reader.num_images)
                   if luma.decode_luma(reader.read(j, 1)).shape != luma.decode_luma(reader.read(0, 1)).shape)
    with Image.open(io.BytesIO(reader.read(i, reader.n_groups(i)))) as im:
        assert search._source_luma(reader.read(j, reader.n_groups(j)), im) is None   # another size
        assert search._source_luma(b"not a jpeg", im) is None
        assert np.array_equal(search._source_luma(reader.read(i, reader.n_groups(i)), im),
                              luma.decode_luma(reader.read(i, reader.n_groups(i))))


@pytest.mark.parametrize("thresholds", [(0.5,), (0.99, 0.7), (0.999, 0.95, 0.9, 0.8)])
def test_same_ks_for_other_thresholds(reader, thresholds):
    for i in range(0, reader.num_images, 7):
        assert fast_ks(reader, i, thresholds).tolist() == oracle_ks(reader, i, thresholds).tolist()


def test_decisions_near_a_threshold_go_to_the_oracle(reader, monkeypatch):
    """With a huge margin every decision is the oracle's: the same ks, by the other route."""
    monkeypatch.setattr(search, "MARGIN", 0.5)
    stats = search.SearchStats()
    for i in range(0, reader.num_images, 11):
        assert fast_ks(reader, i, stats=stats).tolist() == oracle_ks(reader, i).tolist()
    assert stats.oracle > 0 and stats.bounded == 0 and stats.rejected_early == 0


def test_compute_equals_compute_exhaustive(reader, oracle):
    fast, failures = adaptive.compute(reader, workers=2)
    assert np.array_equal(fast, oracle) and not failures


# ---- the parts ---------------------------------------------------------------------------------

def test_scores_agree_with_the_oracle_far_inside_the_margin(reader):
    worst = 0.0
    for i in range(0, reader.num_images, 13):
        n = reader.n_groups(i)
        full = luma.decode_luma(reader.read(i, n))
        exact, fast = msssim.Reference(full), search.FastReference(full)
        for k in range(1, n):
            y = luma.decode_luma(reader.read(i, k))
            a = exact.ms_ssim(y)
            b = float(np.prod(np.maximum(fast.score_terms(y), 0) ** fast.weights))
            worst = max(worst, abs(a - b))
    assert worst < search.MARGIN / 50, worst


def test_filter_stack_is_the_valid_gaussian_window():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (53, 71)).astype(np.float64)
    taps = msssim.gaussian_taps()
    a = np.stack([img - 128, (img - 128) ** 2]).astype(np.float32)
    got = search.filter_stack(a, taps)
    assert got.shape == (2, 43, 61)
    np.testing.assert_allclose(got[0], msssim.filter_valid(img - 128, taps), atol=1e-3)
    np.testing.assert_allclose(got[1], msssim.filter_valid((img - 128) ** 2, taps), rtol=1e-5)


def test_finest_lower_bound_is_below_the_term(reader):
    i = 0
    n = reader.n_groups(i)
    full = luma.decode_luma(reader.read(i, n))
    fast = search.FastReference(full)
    for k in range(1, n):
        y = luma.decode_luma(reader.read(i, k))
        term = msssim.Reference(full).terms(y)[0]
        d = fast._pyramid(y)[0]
        assert fast._finest_lower_bound(d) <= term + 1e-9


def test_one_fast_reference_per_thread():
    a = search.FastReference(np.full((40, 40), 100, np.uint8))
    search.FastReference(np.full((30, 30), 50, np.uint8))
    with pytest.raises(RuntimeError):
        a.score_terms(np.full((40, 40), 90, np.uint8))


def test_chroma_only_scans_leave_the_luminance_alone(reader):
    """The premise of skipping: a scan without the Y component decodes to the same Y plane."""
    i = next(i for i in range(reader.num_images) if reader.n_groups(i) == 10)
    changes = search.luma_scans(reader.read(i, 10))
    assert changes == [True, True, False, False, True, True, True, False, False, True]  # libjpeg's script
    previous = None
    for k in range(1, 11):
        y = luma.decode_luma(reader.read(i, k))
        if not changes[k - 1]:
            assert np.array_equal(y, previous)
        previous = y


def test_scan_components():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    comps = scan_components(data)
    assert len(comps) == len(scan_ends(data)) == 10
    assert comps[0] == (1, 2, 3) and comps[2] in ((3,), (2,)) and comps[1] == (1,)
    with pytest.raises(ScanError):
        scan_components(data[:200])


def test_colour_space_rule():
    class Fake:
        def __init__(self, ids, mode="RGB", **info):
            self.layer = [(c, 1, 1, 0) for c in ids]
            self.mode = mode
            self.info = info

    rule = search._luma_is_first_component
    assert rule(Fake([1]))                                     # grey: its only component
    assert rule(Fake([1, 2, 3]))                               # no marker, ids 1,2,3: YCbCr
    assert rule(Fake([82, 71, 66], jfif=257))                  # JFIF implies YCbCr
    assert not rule(Fake([82, 71, 66]))                        # 'R','G','B': RGB, all three make grey
    assert not rule(Fake([1, 2, 3], adobe=100, adobe_transform=0))
    assert rule(Fake([1, 2, 3], adobe=100, adobe_transform=1))
    assert not rule(Fake([1, 2, 3, 4], mode="CMYK"))
