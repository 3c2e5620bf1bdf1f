"""The adaptive-k index on disk: per image, the smallest k reaching each MS-SSIM threshold.

It is the one optional addition to a finished store (docs/format.md, "Adaptive
views"): ``index/adaptive_k-XXXXXXXX.npy``, a u1[n, T] array, described in
``pcr.yaml`` under ``adaptive_index``. The mount shows one view per threshold
(``ssim90``, ``ssim95``, ``ssim98``) serving image i with ``ks[i, t]`` groups.

This module is the format's side (names, encoding, checks, loading); it lives beside
the index because the view layer loads it at mount time, and needs numpy and PyYAML
only. Installing it in a store is :mod:`pcrfs.store.write.install`'s; computing the ks
(decoding, MS-SSIM) is :mod:`pcrfs.quality.scoring`'s.
"""
from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import format as fmt
from ..errors import StoreError
from .index import NPY_HEADER_MAX

if TYPE_CHECKING:  # the format of the adaptive index needs no reader, only a store's location
    from ..read.reader import Store

MANIFEST_KEY = "adaptive_index"
METRIC = "ms-ssim-luma"
THRESHOLDS = (0.90, 0.95, 0.98)
FILE_PREFIX = "adaptive_k-"
DTYPE = np.dtype("u1")
BINDS_TO = "group_crc32.npy"  # the index file whose CRC-32 ties the array to this store's content


class AdaptiveIndexError(ValueError):
    """The adaptive index is missing from the manifest's description, damaged or stale."""


def view_name(threshold: float) -> str:
    """ssim90 for 0.90, ssim95 for 0.95, ssim995 for 0.995."""
    if not 0 < threshold < 1:
        raise ValueError(f"an MS-SSIM threshold must lie strictly between 0 and 1, got {threshold}")
    digits = f"{threshold:.4f}"[2:].rstrip("0")
    return "ssim" + digits.ljust(2, "0")


@dataclass
class AdaptiveIndex:
    thresholds: list[float]
    views: list[str]
    ks: np.ndarray  # u1[n, T]; 0 = not measured (served at full fidelity)

    def column(self, view: str, num_groups: int) -> np.ndarray:
        """u1[n]: the k served for every image in ``view``, with 0 resolved to ``num_groups``."""
        col = np.asarray(self.ks[:, self.views.index(view)])
        return np.where(col == 0, num_groups, col).astype(DTYPE)


# ---- on disk ---------------------------------------------------------------------------------------

def npy_bytes(ks: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(ks, dtype=DTYPE), allow_pickle=False)
    return buf.getvalue()


def load(store: "Store") -> AdaptiveIndex | None:
    """The store's adaptive index, checked against the manifest; None if it has none.

    Raises :class:`AdaptiveIndexError` when the manifest describes one that is
    missing, damaged, or belongs to other store contents.
    """
    entry = store.manifest.get(MANIFEST_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise AdaptiveIndexError(f"'{MANIFEST_KEY}' in the manifest is not a table")
    try:
        name, size, crc = entry["file"], entry["size"], entry["crc32"]
        thresholds = [float(t) for t in entry["thresholds"]]
        views = [str(v) for v in entry["views"]]
        binds = entry["index_crc32"]
    except (KeyError, TypeError, ValueError) as e:
        raise AdaptiveIndexError(f"'{MANIFEST_KEY}' in the manifest is incomplete: {e}") from None
    if entry.get("metric") != METRIC:
        raise AdaptiveIndexError(f"adaptive index metric {entry.get('metric')!r} is not supported (expected {METRIC})")
    if not isinstance(name, str) or "/" in name or not name.startswith(FILE_PREFIX):
        raise AdaptiveIndexError(f"adaptive index file name {name!r} is not valid")
    try:
        expected = [view_name(t) for t in thresholds]
    except ValueError as e:
        raise AdaptiveIndexError(f"adaptive index: {e}") from None
    if views != expected or len(set(views)) != len(views):
        raise AdaptiveIndexError(f"adaptive index views {views} do not match its thresholds {thresholds}")
    if binds != store.manifest["index_files"].get(BINDS_TO, {}).get("crc32"):
        raise AdaptiveIndexError("adaptive index belongs to other store contents (stale); "
                                 "run `pcrfs quality STORE --write-index` again")
    path = store.location.describe(f"{fmt.INDEX_DIR}/{name}")
    if type(size) is not int or not 0 <= size <= NPY_HEADER_MAX + store.num_images * len(thresholds):
        raise AdaptiveIndexError(f"adaptive index {path}: size {size!r} is not that of u1[{store.num_images}, "
                                 f"{len(thresholds)}]")
    try:
        data = store.location.read_file(f"{fmt.INDEX_DIR}/{name}", max_bytes=size)
    except StoreError as e:
        raise AdaptiveIndexError(f"adaptive index: {e}") from None
    if len(data) != size or zlib.crc32(data) != crc:
        raise AdaptiveIndexError(f"adaptive index {path} is damaged (size or CRC-32 mismatch)")
    try:
        ks = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise AdaptiveIndexError(f"adaptive index {path} is unreadable: {e}") from None
    if ks.dtype != DTYPE or ks.shape != (store.num_images, len(thresholds)):
        raise AdaptiveIndexError(f"adaptive index {path} has dtype {ks.dtype} and shape {ks.shape}, expected "
                                 f"u1[{store.num_images}, {len(thresholds)}]")
    if ks.size and int(ks.max()) > store.num_groups:
        raise AdaptiveIndexError(f"adaptive index {path} names more scan groups than the store has")
    return AdaptiveIndex(thresholds, views, ks)
