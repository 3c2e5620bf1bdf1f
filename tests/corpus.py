"""Edge-case and broken source files for tests, cut from the demo photographs.

Plain functions (not fixtures) so any test or fixture can build a corpus in
whatever directory it likes. Each returns ``{short key: path}``; keys for
inputs this machine cannot produce (no cjpeg, no WebP, a filesystem that
refuses non-UTF-8 names...) are simply missing, so callers should iterate
the dict or look keys up with ``.get``.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

from pcrfs.demo import demo_photos

# Keys of make_edge_cases whose file is a JPEG (everything else is another format).
JPEG_KEYS = frozenset({
    "grey", "ycc444", "ycc420", "ycc422", "tiny_1x1", "odd_17x9", "odd_333x101",
    "restart", "exif", "icc", "progressive", "arithmetic", "cmyk",
    "unicode_name", "space_name", "bad_utf8_name",
})
# Keys of make_edge_cases that are not JPEG (a converter must re-encode or reject them).
NON_JPEG_KEYS = frozenset({"png_rgb", "png_rgba", "gif_palette", "bmp", "webp", "png16"})
# Keys of make_bad_files that Pillow cannot even open (header is unusable).
UNOPENABLE_BAD_KEYS = frozenset({"zero_byte", "text_as_jpg", "random_bytes",
                                 "absurd_dims", "png_absurd_dims"})

ABSURD_SIDE = 60000  # SOF0 dims patched into "absurd_dims"


# ---------------------------------------------------------------- pixels

def _photo(name: str, w: int, h: int, *, mode: str = "RGB") -> Image.Image:
    """A centre-ish crop of a demo photo resized to exactly w x h."""
    src = Image.fromarray(np.asarray(demo_photos()[name]))
    side = min(src.width, src.height)
    aspect = w / h
    cw, ch = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    x0, y0 = (src.width - cw) / 2, (src.height - ch) / 2
    im = src.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    return im.convert(mode)


def _jpeg_bytes(im: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    kwargs.setdefault("quality", 90)
    im.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _save(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- JPEG structure

def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset of the 0xFF, segment length incl. marker) up to and including SOS.

    Walks the header properly instead of searching for byte pairs, because
    DQT/APP payloads may contain any byte values.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI)")
    out = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"lost marker sync at {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        out.append((marker, pos, length + 2))
        if marker == 0xDA:  # entropy-coded data follows; stop here
            break
        pos += length + 2
    return out


def _find_segment(data: bytes, markers: set[int]) -> tuple[int, int, int]:
    for seg in jpeg_segments(data):
        if seg[0] in markers:
            return seg
    raise ValueError(f"no marker among {sorted(hex(m) for m in markers)}")


def sof_marker(data: bytes) -> int:
    """The SOFn marker byte (0xC0 baseline, 0xC2 progressive, 0xC9 arithmetic...)."""
    sofs = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}
    return _find_segment(data, sofs)[0]


def scan_data_span(data: bytes) -> tuple[int, int]:
    """[start, end) of the first scan's entropy-coded data (end = before the next marker)."""
    _, off, length = _find_segment(data, {0xDA})
    start = off + length
    end = start
    while end + 1 < len(data):
        if data[end] == 0xFF and data[end + 1] not in (0x00,) and not 0xD0 <= data[end + 1] <= 0xD7:
            break
        end += 1
    return start, end


# ---------------------------------------------------------------- cjpeg

def _cjpeg(im: Image.Image, *args: str) -> bytes | None:
    """Encode with libjpeg-turbo's cjpeg; None if it is missing or refuses the switches."""
    exe = shutil.which("cjpeg")
    if exe is None:
        return None
    ppm = io.BytesIO()
    im.save(ppm, format="PPM")  # cjpeg reads PPM/PGM from stdin
    proc = subprocess.run([exe, "-quality", "90", *args], input=ppm.getvalue(),
                          capture_output=True, check=False)
    if proc.returncode != 0 or proc.stdout[:2] != b"\xff\xd8":
        return None
    return proc.stdout


# ---------------------------------------------------------------- edge cases

def _jpeg_variants(d: Path) -> dict[str, Path]:
    colour = _photo("chelsea", 200, 150)
    out = {
        "grey": _save(d / "grey.jpg", _jpeg_bytes(_photo("moon", 200, 150, mode="L"))),
        "ycc444": _save(d / "ycc444.jpg", _jpeg_bytes(colour, subsampling=0)),
        "ycc420": _save(d / "ycc420.jpg", _jpeg_bytes(colour, subsampling=2)),
        "ycc422": _save(d / "ycc422.jpg", _jpeg_bytes(colour, subsampling=1)),
        "progressive": _save(d / "progressive.jpg", _jpeg_bytes(colour, progressive=True)),
        # Pillow writes CMYK JPEGs Adobe-style (inverted, APP14)
        "cmyk": _save(d / "cmyk.jpg", _jpeg_bytes(colour.convert("CMYK"))),
    }
    exif = Image.Exif()
    exif[0x010F] = "pcrfs test camera"   # Make
    exif[0x0110] = "Model 1"             # Model
    exif[0x0112] = 6                     # Orientation: rotate 90 CW on display
    exif[0x0132] = "2024:01:02 03:04:05"  # DateTime
    out["exif"] = _save(d / "exif.jpg", _jpeg_bytes(colour, exif=exif.tobytes()))
    icc = _srgb_icc()
    if icc is not None:
        out["icc"] = _save(d / "icc.jpg", _jpeg_bytes(colour, icc_profile=icc))

    restart = _cjpeg(colour, "-restart", "1")
    if restart is None:  # no cjpeg: Pillow can also emit DRI/RSTn
        restart = _jpeg_bytes(colour, restart_marker_rows=1)
    out["restart"] = _save(d / "restart.jpg", restart)
    arith = _cjpeg(colour, "-arithmetic")
    if arith is not None:
        out["arithmetic"] = _save(d / "arithmetic.jpg", arith)
    return out


def _srgb_icc() -> bytes | None:
    try:
        from PIL import ImageCms
        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except (ImportError, OSError):
        return None


def _odd_sizes(d: Path) -> dict[str, Path]:
    # sizes that leave partial MCUs in both directions under 4:2:0
    return {
        "tiny_1x1": _save(d / "tiny_1x1.jpg", _jpeg_bytes(_photo("astronaut", 1, 1))),
        "odd_17x9": _save(d / "odd_17x9.jpg", _jpeg_bytes(_photo("astronaut", 17, 9))),
        "odd_333x101": _save(d / "odd_333x101.jpg",
                             _jpeg_bytes(_photo("rocket", 333, 101), subsampling=2)),
    }


def _other_formats(d: Path) -> dict[str, Path]:
    colour = _photo("coffee", 160, 120)
    out = {}
    out["png_rgb"] = _write_image(d / "rgb.png", colour, "PNG")
    rgba = colour.copy()
    alpha = np.tile(np.linspace(0, 255, colour.width, dtype=np.uint8), (colour.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    out["png_rgba"] = _write_image(d / "rgba.png", rgba, "PNG")
    palette = colour.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out["gif_palette"] = _write_image(d / "palette.gif", palette, "GIF")
    out["bmp"] = _write_image(d / "image.bmp", _photo("coffee", 80, 60), "BMP")
    if features.check("webp"):
        out["webp"] = _write_image(d / "image.webp", colour, "WEBP", quality=80)
    out["png16"] = _write_image(d / "grey16.png", _grey16(), "PNG")
    return out


def _grey16() -> Image.Image:
    """16-bit grey whose low byte carries real information (not just x*257)."""
    grey = np.asarray(_photo("moon", 128, 96, mode="L"), dtype=np.uint16)
    low = np.random.default_rng(0).integers(0, 256, grey.shape, dtype=np.uint16)
    return Image.fromarray((grey << 8) | low)


def _write_image(path: Path, im: Image.Image, fmt: str, **kwargs) -> Path:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return _save(path, buf.getvalue())


def _awkward_names(d: Path) -> dict[str, Path]:
    data = _jpeg_bytes(_photo("chelsea", 120, 90))
    out = {
        "unicode_name": _save(d / "ünïcode café.jpg", data),
        "space_name": _save(d / "with space.jpg", data),
    }
    # not valid UTF-8: must go through the bytes API; Python maps it to a
    # surrogate-escaped str, which is what os.listdir would return too
    raw = os.fsencode(d) + b"/bad\xff.jpg"
    try:
        fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError:  # e.g. filesystems that enforce UTF-8 names
        return out
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    out["bad_utf8_name"] = Path(os.fsdecode(raw))
    return out


def make_edge_cases(dest: Path) -> dict[str, Path]:
    """Write unusual-but-valid inputs under ``dest/{jpeg,odd,other,names}/``.

    Keys: grey, ycc444, ycc420, ycc422, progressive, cmyk, exif (Orientation=6),
    icc, restart (DRI every MCU row), arithmetic*, tiny_1x1, odd_17x9,
    odd_333x101, png_rgb, png_rgba, gif_palette, bmp, webp*, png16,
    unicode_name, space_name, bad_utf8_name* (* only where supported).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    out.update(_jpeg_variants(dest / "jpeg"))
    out.update(_odd_sizes(dest / "odd"))
    out.update(_other_formats(dest / "other"))
    out.update(_awkward_names(dest / "names"))
    return out


# ---------------------------------------------------------------- bad files

def _corrupt_entropy(data: bytes, n: int = 32) -> bytes:
    """Flip n bytes mid-scan without creating or destroying markers.

    Keeping the marker structure intact is the nasty case: the file still
    parses and most decoders produce garbage pixels (with a warning at most)
    rather than an error.
    """
    start, end = scan_data_span(data)
    mid = (start + end) // 2
    buf = bytearray(data)
    for i in range(mid, min(mid + n, end - 1)):
        if buf[i] == 0xFF or buf[i - 1] == 0xFF:
            continue  # a marker or a stuffed zero: leave framing alone
        b = buf[i] ^ 0x5A
        buf[i] = 0xFE if b == 0xFF else b
    return bytes(buf)


def _absurd_dims(data: bytes, side: int = ABSURD_SIDE) -> bytes:
    _, off, _ = _find_segment(data, {0xC0})
    buf = bytearray(data)
    # SOF0: FF C0 | Lf(2) | P(1) | Y(2) | X(2)
    buf[off + 5:off + 9] = struct.pack(">HH", side, side)
    return bytes(buf)


def _png_absurd_dims(side: int = 100_000) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # signature(8) | length(4) 'IHDR' width(4) height(4) ... | crc(4)
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def make_bad_files(dest: Path) -> dict[str, Path]:
    """Write broken inputs under ``dest/bad/`` (all but png_absurd_dims named .jpg).

    Keys: zero_byte, truncated (first half of a real JPEG), corrupt_entropy
    (same length, bytes flipped mid-scan, markers intact), text_as_jpg,
    random_bytes, absurd_dims (SOF0 says 60000x60000), png_absurd_dims
    (IHDR says 100000x100000, valid CRC).
    """
    d = Path(dest) / "bad"
    d.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes(_photo("astronaut", 240, 180))
    tiny = _jpeg_bytes(_photo("astronaut", 16, 16))
    noise = bytearray(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    noise[0] = 0x00  # never accidentally a JPEG/PNG signature
    return {
        "zero_byte": _save(d / "zero_byte.jpg", b""),
        "truncated": _save(d / "truncated.jpg", good[: len(good) // 2]),
        "corrupt_entropy": _save(d / "corrupt_entropy.jpg", _corrupt_entropy(good)),
        "text_as_jpg": _save(d / "text.jpg", b"this is not a JPEG, just text\n" * 20),
        "random_bytes": _save(d / "random.jpg", bytes(noise)),
        "absurd_dims": _save(d / "absurd_dims.jpg", _absurd_dims(tiny)),
        "png_absurd_dims": _save(d / "absurd_dims.png", _png_absurd_dims()),
    }


def reference_jpeg_for_bad_files() -> bytes:
    """The intact JPEG that 'truncated' and 'corrupt_entropy' were derived from."""
    return _jpeg_bytes(_photo("astronaut", 240, 180))
