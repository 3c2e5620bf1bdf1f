"""One source image in, its progressive JPEG scan groups out.

JPEG input is transcoded losslessly (same DCT coefficients) with libjpeg-turbo;
other formats Pillow can read are encoded to a progressive JPEG at a given quality
and flagged as re-encoded. Every failure is a ``BadImage`` with a one-line reason.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from . import turbojpeg
from .scans import ScanError, split_groups

# Pillow formats we accept as "an image to encode"; anything else is not an image.
NON_JPEG_FORMATS = frozenset({"PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "TGA", "ICO", "JPEG2000", "MPO"})
# libjpeg messages that mean "valid, but a kind of JPEG the lossless path cannot take"
# (12-bit, lossless or hierarchical processes); those may be re-encoded instead.
_UNSUPPORTED_HINTS = ("unsupported", "not supported", "incompatible", "bogus input colorspace")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb error threshold (2x its warning)


class BadImage(ValueError):
    """A source file that cannot become a scan-grouped JPEG; str() is the reason."""


class SkippedImage(Exception):
    """A non-JPEG input skipped on request (--non-jpeg skip)."""


@dataclass
class Transcoded:
    groups: list[memoryview]
    reencoded: bool


@dataclass(frozen=True)
class TranscodeOptions:
    keep_metadata: bool = False
    quality: int = 95
    non_jpeg: str = "encode"  # encode | skip | fail
    max_pixels: int = DEFAULT_MAX_PIXELS


def _groups(data: bytes) -> list[memoryview]:
    try:
        return split_groups(data)
    except ScanError as e:  # our own encoder output failed to split: a bug, but report it per file
        raise BadImage(f"scan split failed: {e}") from e


def _check_pixels(width: int, height: int, opts: TranscodeOptions) -> None:
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid dimensions {width}x{height}")
    if width * height > opts.max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} exceeds --max-pixels {opts.max_pixels}")


def _encode_with_pillow(data: bytes, opts: TranscodeOptions, what: str) -> Transcoded:
    if opts.non_jpeg == "skip":
        raise SkippedImage(what)
    if opts.non_jpeg == "fail":
        raise BadImage(f"{what} (use --non-jpeg encode to re-encode it)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_pixels(img.width, img.height, opts)
                img.load()
                if img.mode.startswith("I;16") or img.mode == "I":
                    img = img.convert("I").point(lambda v: v / 256).convert("L")
                elif img.mode in ("L", "1", "F"):
                    img = img.convert("L")
                elif img.mode != "RGB":
                    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                        rgba = img.convert("RGBA")
                        img = Image.new("RGB", rgba.size, (255, 255, 255))
                        img.paste(rgba, mask=rgba.getchannel("A"))
                    else:
                        img = img.convert("RGB")
                out = io.BytesIO()
                img.save(out, "JPEG", quality=opts.quality, progressive=True, optimize=True)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from e
    except Exception as e:  # Pillow raises many types for corrupt data; all are per-file errors
        raise BadImage(f"cannot decode: {e}") from e
    return Transcoded(_groups(out.getvalue()), reencoded=True)


def _identify(data: bytes) -> str | None:
    """Pillow's format name for ``data`` without decoding pixels, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return img.format
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from e
    except Exception:
        return None


def transcode(data: bytes, opts: TranscodeOptions) -> Transcoded:
    """Scan groups of ``data`` as a progressive JPEG."""
    if not data:
        raise BadImage("empty file")
    if data[:2] == b"\xff\xd8":
        try:
            header = turbojpeg.read_header(data)
            _check_pixels(header.width, header.height, opts)
            return Transcoded(_groups(turbojpeg.to_progressive(data, opts.keep_metadata)), reencoded=False)
        except turbojpeg.TransformError as e:
            msg = str(e)
            if any(h in msg.lower() for h in _UNSUPPORTED_HINTS):
                return _encode_with_pillow(data, opts, f"JPEG not losslessly transcodable ({msg})")
            raise BadImage(f"corrupt JPEG: {msg}") from e
    fmt = _identify(data)
    if fmt is None or fmt not in NON_JPEG_FORMATS:
        raise BadImage("not an image" if fmt is None else f"unsupported image format {fmt}")
    return _encode_with_pillow(data, opts, f"{fmt} input")
