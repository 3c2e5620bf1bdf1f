"""The quality table, target selection, the adaptive index and `pcrfs quality` (no FUSE here)."""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import pcrfs
from pcrfs.cli import main
from pcrfs.quality import luma, measure, msssim, scoring
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.store.write import install
from pcrfs.store import format as fmt
from pcrfs.access.views import ViewTree


@pytest.fixture(scope="module")
def table(reader):
    return measure.quality_table(reader, sample=24, seed=3, timing=True, workers=1)


@pytest.fixture
def store_copy(demo_store, tmp_path) -> Path:
    """A private copy of the demo store (the session's one must stay untouched)."""
    copy = tmp_path / "copy.pcr"
    shutil.copytree(demo_store, copy)
    return copy


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# ---- per-image scores and the table ------------------------------------------------------------

def test_measure_image_scores_every_k(reader):
    i = next(i for i in range(reader.num_images) if reader.n_groups(i) == reader.num_groups)
    s = measure.measure_image(reader, i, timing=True)
    n = reader.num_groups
    assert s.sizes.tolist() == [reader.size(i, k) for k in range(1, n + 1)]
    assert s.ms_ssim[-1] == 1.0 and s.psnr[-1] == msssim.PSNR_CAP
    assert np.all((s.ms_ssim > 0) & (s.ms_ssim <= 1)) and np.all(s.decode_s > 0)
    # the scores are those of the decoded k-group files against the full decode
    full = luma.decode_luma(reader.read(i, n))
    for k in (1, 2, 5):
        y = luma.decode_luma(reader.read(i, k))
        assert s.ms_ssim[k - 1] == pytest.approx(msssim.ms_ssim(full, y), abs=1e-12)
        assert s.psnr[k - 1] == pytest.approx(msssim.psnr(full, y), abs=1e-12)
    # chroma-only scans (3 and 4 of libjpeg's colour script) leave the luminance as it was
    assert s.ms_ssim[2] == s.ms_ssim[1] and s.ms_ssim[3] == s.ms_ssim[1]


def test_measure_image_stops_early(reader):
    s = measure.measure_image(reader, 0, stop_at=0.9)
    full = measure.measure_image(reader, 0)
    first = int(np.argmax(full.ms_ssim >= 0.9))  # the first k-1 reaching 0.9
    assert np.array_equal(s.ms_ssim[:first + 1], full.ms_ssim[:first + 1])
    assert np.all(np.isnan(s.ms_ssim[first + 1:s.n_groups - 1]))  # nothing decoded after it
    assert scoring.smallest_k(s.ms_ssim, s.n_groups, [0.9]).tolist() == \
        scoring.smallest_k(full.ms_ssim, full.n_groups, [0.9]).tolist()


def test_table_is_monotonic_in_k(table, reader):
    rows = table.fixed_rows()
    assert [r.k for r in rows] == list(range(1, reader.num_groups + 1))
    for key in ("bytes_mean", "fraction_total", "fraction_mean", "ms_ssim_mean", "ms_ssim_p5", "psnr_mean", "psnr_p5"):
        values = [getattr(r, key) for r in rows]
        assert all(a <= b for a, b in zip(values, values[1:])), (key, values)
    assert all(a.fraction_total < b.fraction_total for a, b in zip(rows, rows[1:]))  # every scan adds bytes
    assert rows[0].ms_ssim_mean < rows[1].ms_ssim_mean < rows[-1].ms_ssim_mean
    last = rows[-1]
    assert last.fraction_total == 1.0 and last.ms_ssim_p5 == 1.0 and last.psnr_p5 == msssim.PSNR_CAP
    assert all(r.ms_ssim_p5 <= r.ms_ssim_mean for r in rows)
    assert all(r.fraction_p5 <= r.fraction_mean <= r.fraction_p95 for r in rows)
    assert all(r.decode_ms_mean > 0 for r in rows)


def test_sample_is_reproducible(reader, table):
    assert table.sample == measure.sample_images(reader.num_images, 24, 3).tolist()
    assert len(set(table.sample)) == 24 and table.sample == sorted(table.sample)
    assert measure.sample_images(reader.num_images, 24, 4).tolist() != table.sample
    assert measure.sample_images(10, 50, 0).tolist() == list(range(10))


def test_worker_processes_give_the_same_table(reader):
    one = measure.quality_table(reader, sample=8, seed=1, timing=False, workers=1)
    two = measure.quality_table(reader, sample=8, seed=1, timing=False, workers=2)
    assert [(r.ms_ssim_mean, r.psnr_p5, r.fraction_std) for r in one.rows] == \
        [(r.ms_ssim_mean, r.psnr_p5, r.fraction_std) for r in two.rows]


# ---- targets: a synthetic case with a known answer ------------------------------------------------

def synthetic_scores(n_images: int, n_late: int) -> list[measure.ImageScores]:
    """Images that reach MS-SSIM 0.96 at k=2, except ``n_late`` of them, which only do at k=5."""
    g = 6
    out = []
    for i in range(n_images):
        late = i < n_late
        ssim = np.array([0.5, 0.6 if late else 0.96, 0.7 if late else 0.97, 0.8 if late else 0.98, 0.96, 1.0])
        psnr = np.array([20.0, 22 if late else 31, 24 if late else 33, 26 if late else 35, 31, msssim.PSNR_CAP])
        sizes = np.array([100, 200, 300, 400, 500, 1000]) * (1 + i % 3)
        out.append(measure.ImageScores(i, g, sizes, ssim, psnr))
    return out


def test_target_picks_the_smallest_k_meeting_the_5th_percentile():
    # 4 late images of 100: the 5th percentile (between the 5th and 6th lowest) is an early one
    rows = measure.aggregate(synthetic_scores(100, 4), 6)
    choice = measure.choose_k(rows, "ms_ssim", 0.95)
    assert choice.row.k == 2 and choice.value == pytest.approx(0.96)
    assert choice.saving == pytest.approx(0.8)  # k=2 reads 200 of 1000 bytes of every image
    # 6 late images: the 5th percentile is a late one, so k must be 5
    rows = measure.aggregate(synthetic_scores(100, 6), 6)
    assert measure.choose_k(rows, "ms_ssim", 0.95).row.k == 5
    assert measure.choose_k(rows, "ms_ssim", 0.97).row.k == 6
    assert measure.choose_k(rows, "ms_ssim", 0.5).row.k == 1
    assert measure.choose_k(rows, "psnr", 30).row.k == 5
    assert measure.choose_k(rows, "psnr", 20).row.k == 1
    assert measure.choose_k(rows, "psnr", 60).row.k == 6
    assert measure.choose_k(rows, "psnr", 61) is None
    with pytest.raises(ValueError):
        measure.choose_k(rows, "lpips", 0.1)


def test_adaptive_rows_use_each_images_k():
    scores = synthetic_scores(10, 2)
    ks = scoring.smallest_k(scores[0].ms_ssim, 6, [0.95]), scoring.smallest_k(scores[5].ms_ssim, 6, [0.95])
    assert ks[0].tolist() == [5] and ks[1].tolist() == [2]
    per_image = np.array([5, 5] + [2] * 8, dtype=np.uint8)
    rows = measure.aggregate(scores, 6, {"ssim95": per_image})
    row = rows[-1]
    assert row.view == "ssim95" and row.k is None
    assert row.ms_ssim_mean == pytest.approx(0.96)  # every image exactly at its threshold-crossing k
    scale = 1 + np.arange(10) % 3  # the synthetic sizes of image i are multiplied by this
    served = np.where(np.arange(10) < 2, 500, 200) * scale
    assert row.fraction_total == pytest.approx(served.sum() / (1000 * scale).sum())
    assert row.bytes_mean < rows[4].bytes_mean  # cheaper than fixed k=5, same worst case


def test_smallest_k():
    s = np.array([0.80, 0.91, 0.91, 0.94, 0.96, 0.99, 1.0])
    assert scoring.smallest_k(s, 7).tolist() == [2, 5, 6]
    assert scoring.smallest_k(s, 7, [0.5, 0.995]).tolist() == [1, 7]
    # an image with fewer groups than the store: its last group is its full decode
    assert scoring.smallest_k(np.array([0.5, 0.6, 1.0, 1.0]), 3).tolist() == [3, 3, 3]
    # unmeasured (NaN) scores after an early stop never qualify
    assert scoring.smallest_k(np.array([0.92, 0.99, np.nan, np.nan]), 4).tolist() == [1, 2, 2]


def test_view_names():
    assert [adaptive.view_name(t) for t in (0.9, 0.95, 0.98, 0.995, 0.5)] == \
        ["ssim90", "ssim95", "ssim98", "ssim995", "ssim50"]
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError):
            adaptive.view_name(bad)


# ---- the adaptive index on disk ------------------------------------------------------------------------

def test_compute_write_load_roundtrip(store_copy):
    s = pcrfs.open_store(store_copy)
    ks, failures = scoring.compute(s, workers=2)
    assert failures == [] and ks.shape == (s.num_images, 3) and ks.dtype == np.uint8
    assert np.all(ks >= 1) and np.all(ks[:, 0] <= ks[:, 1]) and np.all(ks[:, 1] <= ks[:, 2])
    for i in (0, 17, s.num_images - 1):  # the same answer as scoring every k
        full = measure.measure_image(s, i)
        assert ks[i].tolist() == scoring.smallest_k(full.ms_ssim, full.n_groups).tolist()
        for t, threshold in enumerate(adaptive.THRESHOLDS):
            assert full.ms_ssim[ks[i, t] - 1] >= threshold

    entry = install.adaptive_index(store_copy, ks)
    manifest = yaml.safe_load((store_copy / fmt.MANIFEST).read_text())
    assert manifest[adaptive.MANIFEST_KEY] == entry
    path = store_copy / fmt.INDEX_DIR / entry["file"]
    assert entry["size"] == path.stat().st_size and entry["crc32"] == zlib.crc32(path.read_bytes())
    assert entry["views"] == ["ssim90", "ssim95", "ssim98"] and entry["thresholds"] == [0.9, 0.95, 0.98]
    assert not list(store_copy.rglob("*.tmp"))

    reopened = pcrfs.open_store(store_copy)  # the rest of the store is untouched and still verifies
    loaded = adaptive.load(reopened)
    assert np.array_equal(loaded.ks, ks) and loaded.views == entry["views"]
    assert adaptive.load(s) is None  # the handle opened before the write saw no index


def test_rewrite_replaces_the_old_file(store_copy):
    s = pcrfs.open_store(store_copy)
    n, g = s.num_images, s.num_groups
    first = install.adaptive_index(store_copy, np.full((n, 3), 2, np.uint8))
    second = install.adaptive_index(store_copy, np.full((n, 3), g, np.uint8))
    files = sorted(p.name for p in (store_copy / fmt.INDEX_DIR).glob(adaptive.FILE_PREFIX + "*"))
    assert files == [second["file"]] != [first["file"]]
    assert int(adaptive.load(pcrfs.open_store(store_copy)).ks.max()) == g


def test_crash_before_the_manifest_keeps_the_old_index(store_copy, monkeypatch):
    s = pcrfs.open_store(store_copy)
    old = np.full((s.num_images, 3), 3, np.uint8)
    install.adaptive_index(store_copy, old)
    from pcrfs.store.sources import location

    real = location.write_atomic

    def crash_on_manifest(path, data):
        if path.name == fmt.MANIFEST:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(location, "write_atomic", crash_on_manifest)
    with pytest.raises(OSError):
        install.adaptive_index(store_copy, np.full((s.num_images, 3), 1, np.uint8))
    assert np.array_equal(adaptive.load(pcrfs.open_store(store_copy)).ks, old)


def test_damaged_or_stale_index_is_refused_and_the_mount_goes_on(store_copy, caplog):
    s = pcrfs.open_store(store_copy)
    entry = install.adaptive_index(store_copy, np.full((s.num_images, 3), 2, np.uint8))
    path = store_copy / fmt.INDEX_DIR / entry["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    damaged = pcrfs.open_store(store_copy)
    with pytest.raises(adaptive.AdaptiveIndexError, match="damaged"):
        adaptive.load(damaged)
    tree = ViewTree(damaged)
    assert "ssim95" not in tree.views and "full" in tree.views
    assert "no adaptive views" in caplog.text

    manifest = yaml.safe_load((store_copy / fmt.MANIFEST).read_text())
    manifest[adaptive.MANIFEST_KEY]["index_crc32"] += 1
    (store_copy / fmt.MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(adaptive.AdaptiveIndexError, match="stale"):
        adaptive.load(pcrfs.open_store(store_copy))


def test_write_refuses_a_wrong_shape(store_copy):
    s = pcrfs.open_store(store_copy)
    with pytest.raises(adaptive.AdaptiveIndexError, match="shape"):
        install.adaptive_index(store_copy, np.ones((s.num_images - 1, 3), np.uint8))
    with pytest.raises(adaptive.AdaptiveIndexError, match="scan groups"):
        install.adaptive_index(store_copy, np.full((s.num_images, 3), s.num_groups + 1, np.uint8))
    assert adaptive.MANIFEST_KEY not in pcrfs.open_store(store_copy).manifest


def test_view_tree_serves_each_image_at_its_own_k(store_copy):
    s = pcrfs.open_store(store_copy)
    rng = np.random.default_rng(5)
    ks = rng.integers(0, s.num_groups + 1, size=(s.num_images, 3)).astype(np.uint8)  # 0 = full
    install.adaptive_index(store_copy, ks)
    s = pcrfs.open_store(store_copy)
    tree = ViewTree(s)
    assert list(tree.views)[-4:] == ["full", "ssim90", "ssim95", "ssim98"]
    for t, view in enumerate(("ssim90", "ssim95", "ssim98")):
        for path, _ in tree.readdir(f"/{view}"):
            listed = dict(tree.readdir(f"/{view}/{path}"))
            for name, attr in listed.items():
                i = s.find(f"{path}/{name}")
                k = int(ks[i, t]) or s.num_groups
                assert attr.size == s.size(i, k) == tree.getattr(f"/{view}/{path}/{name}").size
                node = tree.resolve(f"/{view}/{path}/{name}")
                assert tree.read(node, 0, 1 << 30) == s.read(i, k)
    # inodes of the new views do not collide with the others
    inos = [tree.getattr(f"/{v}/{s.path(0)}").ino for v in tree.views]
    assert len(set(inos)) == len(inos)


# ---- the command line -------------------------------------------------------------------------------

def test_cli_table_json_and_target(demo_store, tmp_path):
    res = run_cli("quality", str(demo_store), "--sample", "12", "--seed", "2", "--json", "-q", "-j", "1",
                  "--target-ssim", "0.9", "--no-timing")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = doc["rows"]
    assert doc["sample_size"] == 12 and len(rows) == doc["num_groups"]
    expected = min(r["k"] for r in rows if r["ms_ssim_p5"] >= 0.9)
    assert doc["target"]["k"] == expected and doc["target"]["view"] == f"scan{expected}"
    assert doc["target"]["saving"] == pytest.approx(1 - rows[expected - 1]["fraction_total"])
    assert all(r["decode_ms_mean"] is None for r in rows)


def test_cli_terminal_table_and_plot(demo_store, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "q.png"
    res = run_cli("quality", str(demo_store), "--sample", "8", "-j", "1", "--plot", str(out), "--target-psnr", "25")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "MS-SSIM" in lines[1] and lines[3].startswith("scan1 ") and "scan10" in res.stdout
    assert "is the smallest view whose 5th-percentile PSNR" in res.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_write_index(store_copy):
    res = run_cli("quality", str(store_copy), "--write-index", "-q", "-j", "2")
    assert res.exit_code == 0, res.output
    assert "ssim90, ssim95, ssim98" in res.stdout
    index = adaptive.load(pcrfs.open_store(store_copy))
    assert index.ks.shape[0] == pcrfs.open_store(store_copy).num_images
    # the table now has rows for the adaptive views too
    res = run_cli("quality", str(store_copy), "--sample", "6", "-j", "1", "--json", "-q", "--no-timing")
    doc = json.loads(res.stdout)
    assert [r["view"] for r in doc["rows"][-3:]] == ["ssim90", "ssim95", "ssim98"]
    assert doc["rows"][-2]["ms_ssim_p5"] >= 0.95 - 1e-12  # every image of ssim95 reaches 0.95


@pytest.mark.parametrize("args, message", [
    (["--target-ssim", "1.5"], "Invalid value for '--target-ssim'"),
    (["--target-ssim", "0"], "Invalid value for '--target-ssim'"),
    (["--target-ssim", "abc"], "Invalid value for '--target-ssim'"),
    (["--target-psnr", "-3"], "Invalid value for '--target-psnr'"),
    (["--target-psnr", "80"], "at most 60 dB"),
    (["--target-ssim", "0.9", "--target-psnr", "30"], "not both"),
    (["--sample", "0"], "Invalid value for '--sample'"),
    (["-j", "0"], "Invalid value for '-j'"),
    (["--write-index", "--sample", "5"], "cannot be combined with --sample"),
    (["--write-index", "--target-ssim", "0.9"], "cannot be combined with --target-ssim"),
    (["--plot", "/no/such/dir/q.png"], "does not exist"),
    (["--plot", "q.unknownformat"], "cannot tell the image format"),
])
def test_cli_bad_arguments(demo_store, args, message):
    res = run_cli("quality", str(demo_store), *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_cli_bad_store(tmp_path):
    res = run_cli("quality", str(tmp_path / "missing"))
    assert res.exit_code == 1 and "pcrfs: error:" in res.output and "no such store" in res.output
    res = run_cli("quality", str(tmp_path))
    assert res.exit_code == 1 and "not a PCR store" in res.output
