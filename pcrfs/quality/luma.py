"""The image a score is computed on: the 8-bit luminance (Y) plane of a JPEG, as libjpeg
decodes it. Shared by the quality tables (:mod:`.measure`) and the per-image k search
(:mod:`.search`), so both score exactly the same pixels."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_luma(data: bytes) -> np.ndarray:
    """The luminance (Y) plane of a JPEG as uint8 [H, W]; libjpeg skips the chroma for colour images."""
    with Image.open(io.BytesIO(data)) as im:
        return luma_of(im)


def luma_of(im: Image.Image) -> np.ndarray:
    """:func:`decode_luma` of an opened, not yet decoded JPEG."""
    if im.mode in ("RGB", "YCbCr"):
        im.draft("L", None)  # libjpeg out_color_space = JCS_GRAYSCALE: Y only, no upsampling
    if im.mode != "L":  # CMYK and other rare colour spaces: Pillow's conversion
        return np.asarray(im.convert("L"))
    return np.asarray(im)
