"""Converting a store into a new layout without its source (``pcrfs convert OLD.pcr NEW.pcr``).

A store made with records of consecutive paths (format version 1, or any other
storage order, record size or place) is rewritten with another: every image's scan
groups are copied exactly as stored -- each checked against its CRC-32 as it is read,
never transcoded -- into records cut from the new storage order (:mod:`.plan`, the
same rule as a conversion from images, with each image's stored bytes as its size).
The new store serves every view byte for byte as the old one did. The adaptive index
(``pcrfs quality --write-index``) is carried over, so the ``ssimNN`` views stay.

Damaged images (a group failing its CRC, a missing record) are named in the report
as bad and left out; nothing unchecked is written. An interrupted migration resumes
like a conversion: records already written are kept.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..remote.fs import RemoteOptions
from ..store import format as fmt
from ..store.errors import CorruptData, StoreUnavailable
from ..store.read.reader import ReadOptions, Store, open_store
from ..store.write.writer import ImageEntry, Problem, StoreWriter
from .plan import SourceListing, plan_batches, storage_order
from .target import FinishedButNotCleaned, StoreTarget


@dataclass(frozen=True)
class StoredImage:
    """One image of the source store, as the batch planner sees it (``size``: stored bytes)."""
    rel: str
    size: int
    image: int  # its number in the source store


def migrate(source: str | Path, store: Path | str, *, order: str = fmt.ORDER_SHUFFLED, seed: int = 0,
            record_bytes: int = fmt.DEFAULT_RECORD_BYTES, overwrite: bool = False,
            remote: RemoteOptions = RemoteOptions(), staging_dir: Path | None = None,
            on_start: Callable[[int, int], None] | None = None,
            on_progress: Callable[[int, int], None] | None = None):
    """Write the images of the store at ``source`` into a new store at ``store`` in the
    storage ``order`` (``docs/format.md``); a :class:`~pcrfs.convert.run.ConvertResult`.
    ``remote`` reaches either store if it is at a URL."""
    from .run import ConvertResult

    if order not in fmt.ORDERS:
        raise ValueError(f"unknown storage order {order!r} (one of: {', '.join(fmt.ORDERS)})")
    t0 = time.monotonic()
    with open_store(str(source), options=ReadOptions(remote=remote)) as old:
        target = StoreTarget.for_store(store, remote, staging_dir)
        if target.location.rstrip("/") == str(old.url).rstrip("/"):
            raise ValueError(f"{store} is the source store itself; write the new layout somewhere else")
        with target.locked():
            listing = storage_order(SourceListing(_stored_images(old)), order, seed)
            fp = _fingerprint(old, order, seed, record_bytes)
            try:
                writer = target.open_writer(overwrite)
            except FinishedButNotCleaned:
                manifest, report = target.finish_interrupted(fp)
                return ConvertResult(manifest["num_images"], report["bad"], report["skipped"], report["reencoded"],
                                     0, manifest["total_bytes"], time.monotonic() - t0, old.num_images, manifest,
                                     int(old.manifest.get("total_bytes") or 0))
            plan = plan_batches(listing.files, record_bytes)  # type: ignore[arg-type]
            writer.start(fp, [(b.start, b.end) for b in plan])
            resumed = writer.sources_done
            if on_start:
                on_start(len(listing.files), resumed)
            bytes_in = 0
            for b in plan:
                if b.record in writer.done:
                    continue
                entries, problems = _copy_batch(old, listing.files[b.start:b.end])
                writer.write_record(b.record, entries, problems, sources=(b.start, b.end))
                done = sum(e.nbytes for e in entries)
                bytes_in += done
                if on_progress:
                    on_progress(b.count, done)
            manifest = writer.finalize({
                "record_target_bytes": record_bytes, "order": order, "seed": int(seed),
                "options": old.manifest.get("options") or {},
                "migrated_from": {"store": str(old.url), "format_version": old.manifest["format_version"],
                                  "order": old.manifest.get("order", "shuffled" if old.index.shuffled else "source")},
            })
            report = json.loads((writer.root / fmt.REPORT).read_text())
            target.clean_up()
            _carry_adaptive_index(old, target.location, remote, report["bad"])
    return ConvertResult(manifest["num_images"], report["bad"], report["skipped"], report["reencoded"], bytes_in,
                         manifest["total_bytes"], time.monotonic() - t0, resumed, manifest,
                         int(old.manifest.get("total_bytes") or 0))


def _stored_images(old: Store) -> list[StoredImage]:
    lengths = np.asarray(old.index.group_lengths, dtype=np.int64).sum(axis=1)
    return [StoredImage(old.path(i), int(lengths[i]), i) for i in range(old.num_images)]


def _fingerprint(old: Store, order: str, seed: int, record_bytes: int) -> str:
    """What a resumed migration must share with the run it resumes: the source store's
    content (its index checksums), the order, the seed and the record size."""
    h = hashlib.sha256()
    h.update(json.dumps({"migrate": old.manifest["index_files"], "order": order, "seed": int(seed),
                         "record_bytes": record_bytes}, sort_keys=True).encode())
    return h.hexdigest()


def _copy_batch(old: Store, images: list[StoredImage]) -> tuple[list[ImageEntry], list[Problem]]:
    """The batch's images as the writer takes them, every group checked; damaged ones as problems."""
    entries, problems = [], []
    row = old.index.images
    for im in images:
        i = im.image
        try:
            groups = old.read_groups(i)
        except (CorruptData, StoreUnavailable) as e:
            problems.append(Problem(im.rel, f"damaged in the source store: {e.strerror or e}"))
            continue
        n = len(groups)
        entries.append(ImageEntry(im.rel, int(row[i]["src_size"]), int(row[i]["src_mtime_ns"]), int(row[i]["flags"]),
                                  groups, old.index.group_crc32[i, :n].tolist()))
    return entries, problems


def _carry_adaptive_index(old: Store, location: str, remote: RemoteOptions, bad: list[dict]) -> None:
    """The source's adaptive index, for the images the new store holds (by path: the image
    order is the path order in both, less the damaged images)."""
    from ..store.format import adaptiveindex as adaptive
    from ..store.write import install

    try:
        index = adaptive.load(old)
    except adaptive.AdaptiveIndexError:
        return  # the source's own is unusable: the new store has none, as `pcrfs info` will show
    if index is None:
        return
    dropped = {p["path"] for p in bad}
    kept = [i for i in range(old.num_images) if old.path(i) not in dropped] if dropped else slice(None)
    with open_store(location, options=ReadOptions(remote=remote)) as new:
        # the migration holds the store's lock (a second flock would wait for itself)
        install.adaptive_index(new, np.asarray(index.ks)[kept], index.thresholds, store_locked=True)
