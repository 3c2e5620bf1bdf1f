"""The demo dataset builder and the edge-case/bad-file corpus helpers."""
from __future__ import annotations

import hashlib
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import corpus
from pcrfs import demo
from pcrfs.demo import make_demo


def _md5s(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- make_demo

@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> tuple[Path, demo.DemoSummary]:
    dest = tmp_path_factory.mktemp("demo") / "photos"
    return dest, make_demo(dest, per_class=6, seed=7)


def test_same_seed_same_bytes(tmp_path):
    a = make_demo(tmp_path / "a", per_class=4, seed=3)
    b = make_demo(tmp_path / "b", per_class=4, seed=3)
    assert a.count == b.count and a.total_bytes == b.total_bytes
    assert _md5s(tmp_path / "a") == _md5s(tmp_path / "b")


def test_other_seed_other_bytes(tmp_path):
    make_demo(tmp_path / "a", per_class=2, seed=3)
    make_demo(tmp_path / "b", per_class=2, seed=4)
    a, b = _md5s(tmp_path / "a"), _md5s(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_growing_per_class_keeps_earlier_images(tmp_path):
    make_demo(tmp_path / "a", per_class=2, seed=5)
    make_demo(tmp_path / "b", per_class=3, seed=5)
    a, b = _md5s(tmp_path / "a"), _md5s(tmp_path / "b")
    assert a.items() <= b.items()


def test_layout_and_summary(small_demo):
    dest, summary = small_demo
    assert 6 <= len(summary.classes) <= 8
    assert {"astronaut", "cat", "coffee", "texture"} <= set(summary.classes)
    assert sorted(p.name for p in dest.iterdir()) == sorted(summary.classes)
    for cls in summary.classes:
        names = sorted(p.name for p in (dest / cls).iterdir())
        assert names == [f"{cls}_{i:04d}.jpg" for i in range(6)]
    files = [p for p in dest.rglob("*") if p.is_file()]
    assert summary.count == len(files) == 6 * len(summary.classes)
    assert summary.total_bytes == sum(p.stat().st_size for p in files)


def test_every_file_is_a_plausible_baseline_jpeg(small_demo):
    dest, summary = small_demo
    modes, samplings, sizes = set(), set(), set()
    for path in summary.files:
        data = path.read_bytes()
        assert corpus.sof_marker(data) == 0xC0, f"{path.name} is not baseline"
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert not im.info.get("progressive") and not im.info.get("progression")
            im.load()
            w, h = im.size
            modes.add(im.mode)
            samplings.add(JpegImagePlugin.get_sampling(im))
            sizes.add(im.size)
        assert 290 <= min(w, h) and max(w, h) <= 660, f"{path.name}: {w}x{h}"
        assert 2_000 < len(data) < 400_000
    assert modes == {"RGB", "L"}             # some greyscale JPEGs among the colour ones
    assert {0, 2} <= samplings               # 4:4:4 and 4:2:0
    assert len(sizes) > 5                    # not all one size


def test_refuses_non_empty_dest(tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        make_demo(dest, per_class=1)
    assert sorted(os.listdir(dest)) == ["precious.txt"]

    summary = make_demo(dest, per_class=1, overwrite=True)
    assert (dest / "precious.txt").read_text() == "keep me"
    assert summary.count == len(summary.classes)


def test_refuses_file_as_dest_and_bad_count(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(ValueError):
        make_demo(f, per_class=1)
    with pytest.raises(ValueError):
        make_demo(tmp_path / "new", per_class=0)


def test_empty_existing_dest_is_fine(tmp_path):
    assert make_demo(tmp_path, per_class=1).count > 0


def test_demo_photos_are_real_and_read_only():
    photos = demo.demo_photos()
    assert {"astronaut", "chelsea", "coffee"} <= photos.keys()
    for name, arr in photos.items():
        assert arr.dtype == np.uint8 and arr.ndim in (2, 3), name
        assert min(arr.shape[:2]) >= 250, name
        assert not arr.flags.writeable
        assert arr.std() > 10, f"{name} looks flat, not a photograph"


def test_missing_scikit_image_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    demo._load_photos.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"pcrfs\[demo\]"):
            make_demo(tmp_path / "x", per_class=1)
        assert not (tmp_path / "x").exists()
    finally:
        monkeypatch.undo()
        demo._load_photos.cache_clear()


# ---------------------------------------------------------------- corpus helpers

@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> dict[str, Path]:
    return corpus.make_edge_cases(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return corpus.make_bad_files(tmp_path_factory.mktemp("bad"))


def test_edge_cases_all_open_with_pillow(edge):
    required = (corpus.JPEG_KEYS | corpus.NON_JPEG_KEYS) - {"arithmetic", "webp", "bad_utf8_name"}
    assert required <= edge.keys()
    for key, path in edge.items():
        assert path.is_file(), key
        assert path.stat().st_size < 50_000, key
        with Image.open(path) as im:
            im.load()
            if key in corpus.JPEG_KEYS:
                assert im.format == "JPEG", key


def test_edge_case_jpeg_structure(edge):
    expected_sof = {"progressive": 0xC2, "arithmetic": 0xC9}
    for key in corpus.JPEG_KEYS & edge.keys():
        assert corpus.sof_marker(edge[key].read_bytes()) == expected_sof.get(key, 0xC0), key

    markers = [m for m, _, _ in corpus.jpeg_segments(edge["restart"].read_bytes())]
    assert 0xDD in markers  # DRI
    with Image.open(edge["ycc444"]) as im:
        assert JpegImagePlugin.get_sampling(im) == 0
    with Image.open(edge["ycc422"]) as im:
        assert JpegImagePlugin.get_sampling(im) == 1
    with Image.open(edge["ycc420"]) as im:
        assert JpegImagePlugin.get_sampling(im) == 2
    with Image.open(edge["grey"]) as im:
        assert im.mode == "L"
    with Image.open(edge["cmyk"]) as im:
        assert im.mode == "CMYK"
    with Image.open(edge["exif"]) as im:
        assert im.getexif()[0x0112] == 6
    if "icc" in edge:
        with Image.open(edge["icc"]) as im:
            assert im.info.get("icc_profile")


def test_edge_case_sizes_and_formats(edge):
    sizes = {"tiny_1x1": (1, 1), "odd_17x9": (17, 9), "odd_333x101": (333, 101)}
    for key, size in sizes.items():
        with Image.open(edge[key]) as im:
            assert im.size == size, key
    with Image.open(edge["png16"]) as im:
        assert im.mode.startswith("I;16") or im.mode == "I"
    with Image.open(edge["png_rgba"]) as im:
        assert im.mode == "RGBA"
    with Image.open(edge["gif_palette"]) as im:
        assert im.mode == "P"


def test_edge_case_awkward_names(edge):
    assert edge["unicode_name"].name == "ünïcode café.jpg"
    assert edge["space_name"].name == "with space.jpg"
    if "bad_utf8_name" in edge:
        raw = os.fsencode(edge["bad_utf8_name"])
        assert raw.endswith(b"bad\xff.jpg")
        assert b"bad\xff.jpg" in os.listdir(os.fsencode(edge["bad_utf8_name"].parent))


def test_bad_files_are_what_they_claim(bad):
    ref = corpus.reference_jpeg_for_bad_files()
    assert bad["zero_byte"].stat().st_size == 0

    truncated = bad["truncated"].read_bytes()
    assert len(truncated) == len(ref) // 2 and ref.startswith(truncated)

    corrupt = bad["corrupt_entropy"].read_bytes()
    start, end = corpus.scan_data_span(ref)
    diff = [i for i, (a, b) in enumerate(zip(ref, corrupt)) if a != b]
    assert len(corrupt) == len(ref) and diff
    assert all(start <= i < end for i in diff)  # headers untouched, only scan data

    assert bad["text_as_jpg"].read_bytes().decode("ascii").startswith("this is not")
    assert bad["random_bytes"].read_bytes()[:2] != b"\xff\xd8"

    absurd = bad["absurd_dims"].read_bytes()
    _, off, _ = next(s for s in corpus.jpeg_segments(absurd) if s[0] == 0xC0)
    assert struct.unpack(">HH", absurd[off + 5:off + 9]) == (corpus.ABSURD_SIDE,) * 2


def test_bad_files_fail_in_pillow(bad):
    for key in corpus.UNOPENABLE_BAD_KEYS:
        with pytest.raises(Exception):
            with Image.open(bad[key]) as im:
                im.load()
    with pytest.raises(OSError):
        with Image.open(bad["truncated"]) as im:
            im.load()
