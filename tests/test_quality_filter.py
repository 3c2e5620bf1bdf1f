"""The compiled SSIM window (pcrfs/quality/_ssimfilter.c) against the BLAS fallback and float64.

The search's ks must not depend on which filter ran: both are compared with the exact
window on random stacks, their MS-SSIM terms on real decodes, and their ks on every demo
photo and edge case. The C module's argument checks raise, never crash, and it lets other
threads run while it filters (convert scores images from several threads).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pcrfs.quality import luma, msssim, search
from pcrfs.store.format.adaptiveindex import THRESHOLDS

compiled = pytest.mark.skipif(search._ssimfilter is None, reason="pcrfs.quality._ssimfilter was not built")


def run_filter(a: np.ndarray, taps: np.ndarray, use_compiled: bool, monkeypatch) -> np.ndarray:
    monkeypatch.setattr(search, "USE_COMPILED", use_compiled)
    return search.filter_stack(a, taps).copy()


def exact(a: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """The window in float64 along each axis, the valid region (msssim's oracle filter)."""
    return np.stack([msssim.filter_valid(x.astype(np.float64), np.asarray(taps, np.float64)) for x in a])


@compiled
@pytest.mark.parametrize("shape,n", [((3, 53, 71), 11), ((3, 375, 500), 11), ((1, 11, 11), 11),
                                     ((2, 12, 30), 11), ((2, 9, 7), 7), ((1, 6, 6), 6), ((1, 1, 1), 1)])
def test_compiled_equals_blas_and_the_exact_window(shape, n, monkeypatch):
    """Gaussian taps of every size the search uses (11, and as large as a small image)."""
    rng = np.random.default_rng(n)
    taps = msssim.gaussian_taps(n)
    d = rng.integers(-40, 41, shape).astype(np.float32)  # a decode's difference, and products like it
    a = np.concatenate([d, d * d, d * rng.integers(0, 511, shape)]).astype(np.float32)
    want = exact(a, taps)
    scale = np.abs(a).max() + 1
    got_c = run_filter(a, taps, True, monkeypatch)
    got_b = run_filter(a, taps, False, monkeypatch)
    assert got_c.shape == got_b.shape == want.shape
    # float32 sums of 11 terms: a few ulps of the largest input
    np.testing.assert_allclose(got_c, want, rtol=0, atol=4e-7 * scale)
    np.testing.assert_allclose(got_c, got_b, rtol=0, atol=4e-7 * scale)


@compiled
def test_taps_that_are_not_symmetric():
    """The unfolded loops (the search never needs them, but the module takes any taps)."""
    rng = np.random.default_rng(1)
    taps = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625], np.float32)
    a = rng.normal(size=(2, 20, 33)).astype(np.float32)
    out = np.empty((2, 16, 29), np.float32)
    assert search._ssimfilter.filter_valid(a, taps, out) is out
    np.testing.assert_allclose(out, exact(a, taps), rtol=0, atol=1e-6)


def test_filter_result_is_the_stack_of_each_image(monkeypatch):
    """Whichever filter runs: image i of the result is image i's window (no mixing in the stack)."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 30, 40)).astype(np.float32)
    taps = msssim.gaussian_taps()
    both = search.filter_stack(a, taps).copy()
    for i in range(3):
        np.testing.assert_allclose(both[i], search.filter_stack(a[i:i + 1], taps)[0], rtol=0, atol=1e-6)


@compiled
def test_bad_arguments_raise():
    f = search._ssimfilter.filter_valid
    taps = msssim.gaussian_taps().astype(np.float32)
    a = np.zeros((2, 20, 30), np.float32)
    out = np.zeros((2, 10, 20), np.float32)
    cases = [
        ((a.astype(np.float64), taps, out), "float32"),
        ((a, taps.astype(np.float64), out), "float32"),
        ((a, taps, out.astype(np.float64)), "float32"),
        ((a[:, :, ::2], taps, np.zeros((2, 10, 5), np.float32)), "C-contiguous"),
        ((a[0], taps, out[0]), "3 dimensions"),
        ((a, taps, np.zeros((2, 9, 20), np.float32)), "out must be \\(2, 10, 20\\)"),
        ((a, taps[:0], out), "taps must number"),
        ((a, np.ones(65, np.float32), out), "taps must number"),
        ((np.zeros((2, 5, 30), np.float32), taps, out), "smaller than the 11-tap window"),
        ((a, taps, b"\0" * out.nbytes), "writable"),
        ((a, taps, "not an array"), "float32 array"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            f(*args)
    read_only = out.copy()
    read_only.setflags(write=False)
    with pytest.raises(ValueError, match="writable"):
        f(a, taps, read_only)
    whole = np.zeros(2 * 20 * 30 + 2 * 10 * 20, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        f(whole[:a.size].reshape(a.shape), taps, whole[a.size - 1:a.size - 1 + out.size].reshape(out.shape))
    with pytest.raises(TypeError):
        f(a, taps)
    assert np.all(out == 0)  # nothing written by a refused call


@compiled
def test_other_threads_run_while_it_filters():
    """The GIL is released around the loops: the main thread keeps running during a long call."""
    taps = np.linspace(1, 2, 64, dtype=np.float32)  # the longest, unfolded: ~0.2 s on 12 Mpx
    a = np.ones((12, 1000, 1000), np.float32)
    out = np.empty((12, 937, 937), np.float32)
    for _ in range(3):  # a loaded machine may starve the main thread once; the GIL would every time
        done = threading.Event()
        worker = threading.Thread(target=lambda: (search._ssimfilter.filter_valid(a, taps, out), done.set()))
        t0 = time.perf_counter()
        worker.start()
        ticks, last, gap = 0, time.perf_counter(), 0.0
        while not done.is_set():
            now = time.perf_counter()
            gap, last, ticks = max(gap, now - last), now, ticks + 1
        worker.join()
        took = time.perf_counter() - t0
        if took > 0.05 and gap < took / 2:
            break
    else:
        pytest.fail(f"the main thread stalled {gap:.3f} s of a {took:.3f} s call ({ticks} ticks)")
    np.testing.assert_allclose(out[:, :3, :3], taps.sum(dtype=np.float64) ** 2, rtol=1e-5)  # both passes


# ---- the search with either filter ----------------------------------------------------------------

def ks_with(store, use_compiled: bool, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(search, "USE_COMPILED", use_compiled)
    return [search.search_ks(search.file_reader(store, i), store.n_groups(i), THRESHOLDS).tolist()
            for i in range(store.num_images)]


@compiled
def test_same_ks_with_either_filter_on_every_demo_image(reader, monkeypatch):
    assert ks_with(reader, True, monkeypatch) == ks_with(reader, False, monkeypatch)


@compiled
def test_same_ks_with_either_filter_on_every_edge_case(tmp_path, monkeypatch):
    """Grey, CMYK, 1x1 and odd sizes: the small windows and the fewer scales."""
    import pcrfs
    from corpus import make_edge_cases
    from pcrfs.convert import convert

    make_edge_cases(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "s.pcr", workers=1)
    with pcrfs.open_store(tmp_path / "s.pcr") as store:
        assert ks_with(store, True, monkeypatch) == ks_with(store, False, monkeypatch)


@compiled
def test_terms_agree_with_either_filter(reader, monkeypatch):
    """Every scale's term of every k of a few images, against the oracle's (float64): the
    compiled filter within 1e-6 (measured: 2.5e-7 on every k of 40 demo photos), the banded
    products within 5e-6 (measured: 2.6e-6; their float32 sums run over 26 taps, most of them
    zeros, in BLAS's order)."""
    worst = {True: 0.0, False: 0.0}
    for i in range(0, reader.num_images, max(1, reader.num_images // 6)):
        n = reader.n_groups(i)
        full = luma.decode_luma(reader.read(i, n))
        oracle = msssim.Reference(full)
        decodes = [luma.decode_luma(reader.read(i, k)) for k in range(1, n)]
        want = np.array([oracle.terms(y) for y in decodes])
        for use in (True, False):
            monkeypatch.setattr(search, "USE_COMPILED", use)
            fast = search.FastReference(full)
            got = np.array([fast.score_terms(y) for y in decodes])
            worst[use] = max(worst[use], float(np.abs(got - want).max()))
    assert worst[True] < 1e-6 and worst[False] < 5e-6, worst
