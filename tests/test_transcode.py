"""transcode(): lossless JPEG -> progressive JPEG, re-encoding of other formats, bad input.

The lossless claim is checked pixel-for-pixel (Pillow decode of the original vs the
full-fidelity output) over the demo photographs and the edge-case corpus, and
byte-for-byte against ``jpegtran -copy none -optimize -progressive``.
"""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corpus import JPEG_KEYS, NON_JPEG_KEYS, make_bad_files, make_edge_cases, sof_marker
from pcrfs.jpeg import turbojpeg
from pcrfs.jpeg.scans import EOI_BYTES, is_progressive, split_groups
from pcrfs.jpeg.transcode import BadImage, SkippedImage, TranscodeOptions, transcode

DEFAULT = TranscodeOptions()


@pytest.fixture(autouse=True)
def fresh_turbojpeg_handle():
    """Each test starts with a fresh per-thread TurboJPEG handle, so that the handle-state
    bugs shown by test_bad_header_does_not_poison_the_next_image and
    test_keep_metadata_does_not_leak_into_later_calls fail only those tests."""
    local = getattr(turbojpeg, "_local", None)
    if local is not None:
        local.__dict__.pop("handle", None)
    yield


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> dict[str, Path]:
    return make_edge_cases(tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    return make_bad_files(tmp_path_factory.mktemp("bad"))


def full(data: bytes, opts: TranscodeOptions = DEFAULT) -> bytes:
    out = transcode(data, opts)
    return b"".join(out.groups) + EOI_BYTES


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _jpegs(demo_src: Path, edge: dict[str, Path]) -> list[Path]:
    return sorted(demo_src.rglob("*.jpg")) + [edge[k] for k in sorted(JPEG_KEYS) if k in edge]


# ----------------------------------------------------------------- lossless


def test_lossless_pixels_demo_and_edge_cases(demo_src, edge):
    files = _jpegs(demo_src, edge)
    assert len(files) >= 96 + 12
    for path in files:
        src = path.read_bytes()
        out = transcode(src, DEFAULT)
        assert not out.reencoded, path
        prog = b"".join(out.groups) + EOI_BYTES
        assert is_progressive(prog), path
        a, b = pixels(src), pixels(prog)
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert np.array_equal(a, b), f"{path}: pixels differ after the lossless transcode"


def test_group_counts(demo_src, edge):
    assert len(transcode(edge["grey"].read_bytes(), DEFAULT).groups) == 6
    for k in ("ycc420", "ycc444", "ycc422", "progressive", "restart"):
        assert len(transcode(edge[k].read_bytes(), DEFAULT).groups) == 10, k
    # CMYK: libjpeg's script for 4 components has 2 + 4*4 scans
    assert len(transcode(edge["cmyk"].read_bytes(), DEFAULT).groups) == 18


@pytest.mark.skipif(shutil.which("jpegtran") is None, reason="jpegtran not installed")
def test_byte_identical_to_jpegtran(demo_src, edge):
    files = sorted(demo_src.rglob("*_0000.jpg"))[:4] + [
        edge[k] for k in ("grey", "ycc444", "cmyk", "restart", "progressive", "exif", "arithmetic")
        if k in edge]
    for path in files:
        src = path.read_bytes()
        ref = subprocess.run(["jpegtran", "-copy", "none", "-optimize", "-progressive"], input=src,
                             capture_output=True, check=True).stdout
        assert full(src) == ref, path


def test_cmyk_lossless(edge):
    src = edge["cmyk"].read_bytes()
    with Image.open(edge["cmyk"]) as im:
        assert im.mode == "CMYK"
    out = full(src)
    assert np.array_equal(pixels(src), pixels(out))


def test_arithmetic_coded_input(edge):
    if "arithmetic" not in edge:
        pytest.skip("cjpeg -arithmetic unavailable")
    src = edge["arithmetic"].read_bytes()
    assert sof_marker(src) == 0xC9
    try:
        out = transcode(src, DEFAULT)
    except BadImage as e:  # acceptable only with a clear reason
        assert "arithmetic" in str(e).lower() or "unsupported" in str(e).lower()
        return
    prog = b"".join(out.groups) + EOI_BYTES
    assert not out.reencoded
    assert sof_marker(prog) == 0xC2  # Huffman progressive, decodable everywhere
    assert np.array_equal(pixels(src), pixels(prog))


def test_tiny_and_odd_sizes(edge):
    for k, size in (("tiny_1x1", (1, 1)), ("odd_17x9", (17, 9)), ("odd_333x101", (333, 101))):
        prog = full(edge[k].read_bytes())
        with Image.open(io.BytesIO(prog)) as im:
            assert im.size == size
        for j in range(1, len(split_groups(prog)) + 1):
            pixels(b"".join(split_groups(prog)[:j]) + EOI_BYTES)


# ----------------------------------------------------------------- metadata


def _exif(data: bytes) -> dict:
    with Image.open(io.BytesIO(data)) as im:
        return dict(im.getexif())


def test_metadata_dropped_by_default(edge):
    src = edge["exif"].read_bytes()
    assert _exif(src)[0x010F] == "pcrfs test camera"
    out = full(src)
    assert _exif(out) == {}
    assert b"Exif\0\0" not in out
    if "icc" in edge:
        icc_out = full(edge["icc"].read_bytes())
        with Image.open(io.BytesIO(icc_out)) as im:
            assert not im.info.get("icc_profile")


def test_keep_metadata_keeps_exif_and_icc(edge):
    src = edge["exif"].read_bytes()
    out = full(src, TranscodeOptions(keep_metadata=True))
    ex = _exif(out)
    assert ex[0x010F] == "pcrfs test camera"
    assert ex[0x0112] == 6
    assert np.array_equal(pixels(src), pixels(out))
    if "icc" in edge:
        icc_src = edge["icc"].read_bytes()
        with Image.open(io.BytesIO(full(icc_src, TranscodeOptions(keep_metadata=True)))) as im, \
                Image.open(io.BytesIO(icc_src)) as orig:
            assert im.info.get("icc_profile") == orig.info["icc_profile"]


def test_keep_metadata_does_not_leak_into_later_calls(edge):
    """BUG (pcrfs/jpeg/turbojpeg.py): the per-thread TurboJPEG handle remembers that markers
    were saved by an earlier keep_metadata=True call, so a later keep_metadata=False call on
    the same thread still copies EXIF/ICC into the output."""
    src = edge["exif"].read_bytes()
    before = full(src)
    full(src, TranscodeOptions(keep_metadata=True))
    after = full(src)
    assert b"Exif\0\0" not in after, "EXIF kept although keep_metadata=False"
    assert after == before


# ----------------------------------------------------------------- other formats


@pytest.mark.parametrize("key", sorted(NON_JPEG_KEYS))
def test_non_jpeg_reencoded_and_flagged(edge, key):
    if key not in edge:
        pytest.skip(f"{key} not producible here")
    data = edge[key].read_bytes()
    out = transcode(data, DEFAULT)
    assert out.reencoded
    prog = b"".join(out.groups) + EOI_BYTES
    assert is_progressive(prog)
    assert len(out.groups) in (6, 10)
    with Image.open(edge[key]) as im:
        size = im.size
    with Image.open(io.BytesIO(prog)) as im:
        assert im.format == "JPEG" and im.size == size
        assert im.mode in ("L", "RGB")
    # every prefix decodes
    for j in range(1, len(out.groups) + 1):
        pixels(b"".join(out.groups[:j]) + EOI_BYTES)


@pytest.mark.parametrize("key", ["png_rgb", "bmp", "gif_palette", "webp"])
def test_reencoded_pixels_close_to_source(edge, key):
    if key not in edge:
        pytest.skip(f"{key} not producible here")
    with Image.open(edge[key]) as im:
        ref = np.asarray(im.convert("RGB"))
    got = pixels(full(edge[key].read_bytes()))
    assert got.shape == ref.shape
    assert psnr(got, ref) > 30


def test_rgba_composited_on_white(edge):
    with Image.open(edge["png_rgba"]) as im:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    ref = rgba[..., :3] * alpha + 255.0 * (1 - alpha)
    got = pixels(full(edge["png_rgba"].read_bytes()))
    assert got.shape == ref.shape
    assert psnr(got, ref) > 30
    assert got[:, 0].mean() > 250  # alpha 0 column -> white, not black


def test_16bit_png_keeps_its_tones(edge):
    """BUG (pcrfs/jpeg/transcode.py, _encode_with_pillow): ``img.convert("L")`` on an
    I;16 image clips every value > 255 to white instead of scaling 16 -> 8 bits."""
    with Image.open(edge["png16"]) as im:
        assert im.mode.startswith("I")
        ref = (np.asarray(im).astype(np.uint32) >> 8).astype(np.float64)
    out = transcode(edge["png16"].read_bytes(), DEFAULT)
    assert out.reencoded
    got = pixels(b"".join(out.groups) + EOI_BYTES)
    assert got.ndim == 2 and got.shape == ref.shape
    assert abs(got.mean() - ref.mean()) < 3, f"mean {got.mean():.1f}, expected about {ref.mean():.1f}"
    assert psnr(got, ref) > 30


def test_non_jpeg_skip_and_fail(edge):
    data = edge["png_rgb"].read_bytes()
    with pytest.raises(SkippedImage):
        transcode(data, TranscodeOptions(non_jpeg="skip"))
    with pytest.raises(BadImage, match="non-jpeg"):
        transcode(data, TranscodeOptions(non_jpeg="fail"))
    # JPEGs are never affected by the non-JPEG policy
    for policy in ("skip", "fail"):
        assert not transcode(edge["ycc420"].read_bytes(), TranscodeOptions(non_jpeg=policy)).reencoded


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("key", ["zero_byte", "truncated", "corrupt_entropy", "text_as_jpg",
                                 "random_bytes", "absurd_dims", "png_absurd_dims"])
def test_bad_files_are_bad_image(bad, key):
    t0 = time.monotonic()
    with pytest.raises(BadImage) as exc:
        transcode(bad[key].read_bytes(), DEFAULT)
    assert time.monotonic() - t0 < 2
    msg = str(exc.value)
    assert msg and "\n" not in msg


def test_truncated_everywhere(demo_src):
    src = sorted(demo_src.rglob("*.jpg"))[0].read_bytes()
    for cut in np.linspace(2, len(src) - 3, 40).astype(int):
        with pytest.raises(BadImage):
            transcode(src[:cut], DEFAULT)


def test_jpeg_bomb_is_refused_before_decoding(bad):
    t0 = time.monotonic()
    with pytest.raises(BadImage, match="max-pixels"):
        transcode(bad["absurd_dims"].read_bytes(), DEFAULT)
    assert time.monotonic() - t0 < 0.5


def test_png_bomb_reason_names_the_problem(bad):
    """BUG (minor, pcrfs/jpeg/transcode.py ``_identify``): Pillow raises DecompressionBombError
    in Image.open, ``_identify`` swallows it and the report says "not an image"."""
    with pytest.raises(BadImage) as exc:
        transcode(bad["png_absurd_dims"].read_bytes(), DEFAULT)
    msg = str(exc.value).lower()
    assert "bomb" in msg or "pixels" in msg, msg


def test_max_pixels_option(edge):
    with pytest.raises(BadImage, match="max-pixels"):
        transcode(edge["ycc420"].read_bytes(), TranscodeOptions(max_pixels=200 * 150 - 1))
    transcode(edge["ycc420"].read_bytes(), TranscodeOptions(max_pixels=200 * 150))
    with pytest.raises(BadImage, match="max-pixels"):
        transcode(edge["png_rgb"].read_bytes(), TranscodeOptions(max_pixels=100))


def test_max_pixels_governs_non_jpeg_too(edge, monkeypatch):
    """BUG (pcrfs/jpeg/transcode.py, _encode_with_pillow): Pillow's own bomb threshold
    (Image.MAX_IMAGE_PIXELS, 89.5 Mpx by default, turned into an error by
    ``simplefilter("error", DecompressionBombWarning)``) overrides --max-pixels for non-JPEG
    inputs: with the defaults a 100 Mpx PNG is refused although --max-pixels is 179 Mpx.
    Shrinking Pillow's threshold reproduces this cheaply."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    data = edge["png_rgb"].read_bytes()  # 160x120 = 19200 px: warning range, below 2x
    out = transcode(data, TranscodeOptions(max_pixels=1_000_000))
    assert out.reencoded


def test_unsupported_jpeg_processes_are_clear(edge):
    """Lossless (SOF3), hierarchical (SOF5) and 12-bit JPEGs: re-encoded or a clear BadImage."""
    src = edge["ycc420"].read_bytes()
    i = src.find(b"\xff\xc0")
    variants = {f"sof{m:02x}": src[:i + 1] + bytes([m]) + src[i + 2:] for m in (0xC3, 0xC5, 0xCB)}
    twelve = bytearray(src)
    twelve[i + 4] = 12
    variants["12bit"] = bytes(twelve)
    for name, data in variants.items():
        try:
            out = transcode(data, DEFAULT)
        except BadImage as e:
            assert str(e), name
            continue
        assert out.reencoded, name


def test_bad_header_does_not_poison_the_next_image(edge):
    """BUG (pcrfs/jpeg/turbojpeg.py, read_header): when tjDecompressHeader3 fails, the
    thread's TurboJPEG handle is left mid-header (no jpeg_abort_decompress), and every later
    read_header on that thread fails with garbage. In a conversion, one JPEG with a damaged
    header makes every following JPEG of that worker thread "bad" (or, for "Unsupported"
    messages, silently re-encoded lossy)."""
    good = edge["ycc420"].read_bytes()
    reference = full(good)
    i = good.find(b"\xff\xdb")  # DQT
    broken = bytearray(good)
    broken[i + 2:i + 4] = struct.pack(">H", 5)  # bogus segment length
    lossless = good[:good.find(b"\xff\xc0") + 1] + b"\xc3" + good[good.find(b"\xff\xc0") + 2:]
    for poison in (bytes(broken), lossless):
        with pytest.raises(BadImage):
            transcode(poison, DEFAULT)
        out = transcode(good, DEFAULT)  # BadImage here is the bug
        assert not out.reencoded, "a good JPEG was re-encoded after a bad one"
        assert b"".join(out.groups) + EOI_BYTES == reference
