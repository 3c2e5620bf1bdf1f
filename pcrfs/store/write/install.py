"""Installing the adaptive index (:mod:`pcrfs.store.format.adaptiveindex`) in a finished store.

It never leaves a reader with a half-written state: the array goes to a new file named
after its CRC-32, the manifest is then replaced atomically (write, fsync, rename; one PUT
on an object store) to point at it, and only then is any previous array removed. Until
the rename the old manifest and its old array stay valid; after it, the new ones are.
"""
from __future__ import annotations

import datetime
import os
import zlib
from typing import TYPE_CHECKING, Sequence

import numpy as np
import yaml

from ..._version import __version__
from .. import format as fmt
from ..format.adaptiveindex import (BINDS_TO, FILE_PREFIX, MANIFEST_KEY, METRIC, THRESHOLDS, AdaptiveIndexError,
                                    npy_bytes, view_name)
from ..format.manifest import parse_manifest
from ..sources.location import StoreLocation, open_location

if TYPE_CHECKING:
    from ..read.reader import Store


def adaptive_index(target: "Store | str | os.PathLike", ks: np.ndarray, thresholds: Sequence[float] = THRESHOLDS,
          *, store_locked: bool = False) -> dict:
    """Install ``ks`` (u1[n, T]) as the adaptive index of ``target`` (an open Store, a
    store directory or a store URL); returns the manifest entry.

    A local store is locked against concurrent writers for the duration (``flock`` on
    its directory, as ``convert`` does); a caller that holds that lock already says
    ``store_locked`` (a second flock through another descriptor would wait for itself).
    On an object store the last writer wins (each PUT is atomic, so readers never see a mix).
    """
    location = target.location if hasattr(target, "location") else open_location(target)  # an open Store
    if store_locked:
        return _install(location, ks, thresholds)
    with location.writer_lock():
        return _install(location, ks, thresholds)


def _install(location: StoreLocation, ks: np.ndarray, thresholds: Sequence[float]) -> dict:
    thresholds = [float(t) for t in thresholds]
    views = [view_name(t) for t in thresholds]
    manifest = parse_manifest(location.manifest_bytes(), location.describe(fmt.MANIFEST))
    n, g = manifest["num_images"], manifest["num_groups"]
    ks = np.asarray(ks)
    if ks.shape != (n, len(thresholds)):
        raise AdaptiveIndexError(f"adaptive index has shape {ks.shape}, the store needs ({n}, {len(thresholds)})")
    if ks.size and int(ks.max()) > g:
        raise AdaptiveIndexError(f"adaptive index names k = {int(ks.max())} > {g} scan groups")
    data = npy_bytes(ks)
    crc = zlib.crc32(data)
    name = f"{FILE_PREFIX}{crc:08x}.npy"
    location.write_file(f"{fmt.INDEX_DIR}/{name}", data)
    previous = manifest.get(MANIFEST_KEY) or {}
    entry = {
        "file": name, "size": len(data), "crc32": crc, "metric": METRIC,
        "thresholds": thresholds, "views": views,
        "index_crc32": manifest["index_files"][BINDS_TO]["crc32"],
        "pcrfs_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest[MANIFEST_KEY] = entry
    # the array is in place before the manifest names it; the old one goes only after
    location.write_file(fmt.MANIFEST, yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True).encode())
    old = previous.get("file") if isinstance(previous, dict) else None
    if isinstance(old, str) and old != name and old.startswith(FILE_PREFIX) and "/" not in old:
        location.remove_file(f"{fmt.INDEX_DIR}/{old}")
    return entry
