"""In-process lossless transcoding with libjpeg-turbo's TurboJPEG API (ctypes).

``tjTransform`` with ``TJXOPT_PROGRESSIVE`` re-entropy-codes the DCT coefficients of
a JPEG as a progressive JPEG with libjpeg's standard scan script
(``jpeg_simple_progression``) and optimized Huffman tables: byte-identical to
``jpegtran -copy none -optimize -progressive``, without a subprocess per image.
ctypes releases the GIL during the call, so threads scale across cores.

Written against the TurboJPEG 2.x ABI (Debian 12: libturbojpeg0 2.1.5); the 2.x
functions used here are still exported by libjpeg-turbo 3.x.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

# turbojpeg.h (2.1)
TJXOP_NONE = 0
TJXOPT_PROGRESSIVE = 32
TJXOPT_COPYNONE = 64
TJFLAG_STOPONWARNING = 8192  # corrupt data is an error, not a warning with a grey image
TJFLAG_LIMITSCANS = 32768  # refuse progressive inputs with > 500 scans (a known DoS)
TJERR_WARNING = 0

TJCS_NAMES = {0: "RGB", 1: "YCbCr", 2: "GRAY", 3: "CMYK", 4: "YCCK"}


class TurboJPEGUnavailable(RuntimeError):
    """libturbojpeg could not be loaded."""


class TransformError(ValueError):
    """libjpeg-turbo refused the input (corrupt, truncated or unsupported JPEG)."""


class _TJRegion(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _TJTransform(ctypes.Structure):
    _fields_ = [
        ("r", _TJRegion),
        ("op", ctypes.c_int),
        ("options", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("customFilter", ctypes.c_void_p),
    ]


_LIB_NAMES = ("libturbojpeg.so.0", "libturbojpeg.so")


def _load() -> ctypes.CDLL:
    names = list(_LIB_NAMES)
    found = ctypes.util.find_library("turbojpeg")
    if found:
        names.append(found)
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.tjInitTransform.restype = ctypes.c_void_p
        lib.tjInitTransform.argtypes = []
        lib.tjDestroy.argtypes = [ctypes.c_void_p]
        lib.tjFree.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.restype = ctypes.c_char_p
        lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]
        lib.tjTransform.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ulong),
            ctypes.POINTER(_TJTransform), ctypes.c_int,
        ]
        lib.tjDecompressHeader3.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong,
            ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
        ]
        return lib
    raise TurboJPEGUnavailable(
        "libturbojpeg is not installed (Debian/Ubuntu: apt-get install libturbojpeg0; "
        "Fedora: dnf install turbojpeg)"
    )


_lib: ctypes.CDLL | None = None
_local = threading.local()


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
    return _lib


class _Handle:
    """A TurboJPEG handle is not thread-safe: one per thread, freed with the thread."""

    def __init__(self) -> None:
        self.lib = _library()
        self.ptr = self.lib.tjInitTransform()
        if not self.ptr:
            raise TurboJPEGUnavailable("tjInitTransform failed")

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.tjDestroy(self.ptr)
            self.ptr = None

    def error(self) -> str:
        return self.lib.tjGetErrorStr2(self.ptr).decode("utf-8", "replace")


def _handle() -> _Handle:
    h = getattr(_local, "handle", None)
    if h is None:
        h = _local.handle = _Handle()
    return h


def available() -> bool:
    try:
        _library()
        return True
    except TurboJPEGUnavailable:
        return False


@dataclass(frozen=True)
class JPEGHeader:
    width: int
    height: int
    colorspace: str


def read_header(data: bytes) -> JPEGHeader:
    """Dimensions and colour space from the JPEG header, without decoding."""
    h = _handle()
    w, hh, ss, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    rc = h.lib.tjDecompressHeader3(h.ptr, data, len(data), ctypes.byref(w), ctypes.byref(hh),
                                   ctypes.byref(ss), ctypes.byref(cs))
    if rc != 0:
        msg = h.error()
        _local.handle = None  # the failed call leaves the decompressor mid-header
        raise TransformError(msg)
    return JPEGHeader(w.value, hh.value, TJCS_NAMES.get(cs.value, str(cs.value)))


def to_progressive(data: bytes, keep_metadata: bool = False) -> bytes:
    """Losslessly transcode a JPEG to a progressive, Huffman-optimized JPEG.

    The DCT coefficients are copied unchanged, so decoding the result gives exactly
    the pixels of the input. Warnings (corrupt entropy data, premature end) are
    errors: a silently grey-filled image is worse than a reported one.
    """
    h = _handle()
    if getattr(h, "keep_metadata", keep_metadata) != keep_metadata:
        _local.handle = None  # saved-marker setup persists in a handle
        h = _handle()
    h.keep_metadata = keep_metadata
    xform = _TJTransform()
    xform.op = TJXOP_NONE
    xform.options = TJXOPT_PROGRESSIVE | (0 if keep_metadata else TJXOPT_COPYNONE)
    out_ptr = ctypes.c_void_p()
    out_size = ctypes.c_ulong(0)
    rc = h.lib.tjTransform(h.ptr, data, len(data), 1, ctypes.byref(out_ptr), ctypes.byref(out_size),
                           ctypes.byref(xform), TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS)
    try:
        if rc != 0:
            msg = h.error()
            _local.handle = None
            raise TransformError(msg)
        return ctypes.string_at(out_ptr, out_size.value)
    finally:
        if out_ptr:
            h.lib.tjFree(out_ptr)
