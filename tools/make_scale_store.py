#!/usr/bin/env python3
"""Write an ImageNet-scale PCR store (1,281,167 entries in 1,000 classes) in minutes.

The index, manifest and directory structure are exactly what `pcrfs convert`
produces (same writer code: ``pcrfs.store.write.writer.publish``). To keep disk use
small, every record holds the same pool of tiny real progressive JPEGs (cut
from the demo photographs), repeated; each record file is still a real,
verifiable record, so reads through the reader or the mount return valid JPEGs.

    python tools/make_scale_store.py /tmp/scale.pcr                 # 1,281,167 entries
    python tools/make_scale_store.py /tmp/s100k.pcr --images 100000 --classes 100
    python tools/make_scale_store.py /tmp/scale2.pcr --order shuffled   # format version 2

``--order shuffled`` (``--seed``) writes a version-2 store: the storage order is drawn
by the converter's own rule (``pcrfs.convert.plan.storage_order``), so record r holds
the images at storage positions ``[r * per_record, ...)`` -- a sample of the whole
dataset -- and the index carries ``storage_order.npy``, as ``pcrfs convert --order
shuffled`` writes it. (Records are cut every ``--per-record`` images, not by bytes.)
``--order source`` (the default) writes version 1, as before.
"""
from __future__ import annotations

import argparse
import io
import shutil
import time
import zlib
from pathlib import Path

import numpy as np

from benchlib import log  # noqa: E402  (puts the checkout first on sys.path)
from pcrfs.jpeg import scans, turbojpeg  # noqa: E402
from pcrfs.convert.plan import SourceListing, storage_order  # noqa: E402
from pcrfs.store import format as fmt  # noqa: E402
from pcrfs.store.format.index import Index, StringTable  # noqa: E402
from pcrfs.store.write.writer import publish  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def class_counts(n_images: int, n_classes: int, full: int = 1300) -> np.ndarray:
    """ImageNet-like: most classes full, the shortfall spread over the last ones."""
    counts = np.full(n_classes, min(full, -(-n_images // n_classes)), dtype=np.int64)
    deficit = int(counts.sum()) - n_images
    i = n_classes - 1
    while deficit > 0:
        take = min(deficit, int(counts[i]) // 2, 600)
        counts[i] -= take
        deficit -= take
        i = (i - 1) % n_classes
    return counts


def pool_images(n: int, seed: int) -> list[list[bytes]]:
    """``n`` tiny progressive JPEGs (scan groups) cut from the demo photographs."""
    from PIL import Image

    from pcrfs.demo import demo_photos

    photos = [p for p in demo_photos().values() if p.ndim == 3]
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        photo = photos[j % len(photos)]
        h, w = photo.shape[:2]
        y, x = int(rng.integers(0, h - 64)), int(rng.integers(0, w - 64))
        img = Image.fromarray(np.ascontiguousarray(photo[y:y + 64, x:x + 64, :3])).resize((32, 24))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        prog = turbojpeg.to_progressive(buf.getvalue())
        out.append([bytes(g) for g in scans.split_groups(prog)])
    return out


def storage_permutation(n_images: int, order: str, seed: int) -> np.ndarray | None:
    """The image at each storage position, drawn as ``pcrfs convert`` draws it (None: the path order)."""
    if order == fmt.ORDER_SOURCE:
        return None
    # the converter's rule applied to a listing of image numbers (it only permutes the list)
    perm = storage_order(SourceListing(list(range(n_images))), order, seed).files  # type: ignore[arg-type]
    return np.asarray(perm, dtype=fmt.STORAGE_ORDER_DTYPE)


def pool_tables(groups: list[list[bytes]], n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Length and CRC of every scan group of each pool image (0 past its last group)."""
    p = len(groups)
    pool_len = np.zeros((p, n_groups), dtype=fmt.GROUP_LENGTH_DTYPE)
    pool_crc = np.zeros((p, n_groups), dtype=fmt.GROUP_CRC_DTYPE)
    for j, gs in enumerate(groups):
        pool_len[j, :len(gs)] = [len(g) for g in gs]
        pool_crc[j, :len(gs)] = [zlib.crc32(g) for g in gs]
    return pool_len, pool_crc


def record_body(groups: list[list[bytes]], slot: np.ndarray, n_groups: int) -> tuple[bytes, list[int]]:
    """The group-major body of a full record (pool image ``slot[s]`` in slot s) and the offset
    of each group in the record."""
    body_parts, group_offsets, off = [], [], fmt.RECORD_HEADER_SIZE
    for g in range(n_groups):
        group_offsets.append(off)
        for j in slot:
            if g < len(groups[j]):
                body_parts.append(groups[j][g])
                off += len(groups[j][g])
    return b"".join(body_parts), group_offsets


def write_records(dest: Path, n_records: int, n_images: int, per_record: int, body: bytes,
                  groups: list[list[bytes]], slot: np.ndarray, n_groups: int) -> None:
    for r in range(n_records):
        count = min(per_record, n_images - r * per_record)
        path = dest / fmt.record_name(r)
        with open(path, "wb") as f:
            f.write(fmt.record_header(r))
            if count == per_record:
                f.write(body)
            else:  # a short last record: write its own group-major body
                for g in range(n_groups):
                    for j in slot[:count]:
                        if g < len(groups[j]):
                            f.write(groups[j][g])


def image_arrays(pool_len: np.ndarray, pool_crc: np.ndarray, slot: np.ndarray, n_images: int, per_record: int,
                 perm: np.ndarray | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The index's images, group lengths and CRCs."""
    # Index arrays: the image at storage position q is slot q % per_record of record
    # q // per_record; in the path order (version 1) image i is at position i.
    position = np.arange(n_images)
    if perm is not None:
        position = np.empty(n_images, dtype=np.int64)
        position[perm.astype(np.int64)] = np.arange(n_images)
    idx_slot = slot[position % per_record]
    images = np.zeros(n_images, dtype=fmt.IMAGE_DTYPE)
    images["src_size"] = pool_len[idx_slot].sum(axis=1) + 2
    images["src_mtime_ns"] = 1_600_000_000_000_000_000 + rng.integers(0, 10**15, n_images)
    images["n_groups"] = (pool_len[idx_slot] > 0).sum(axis=1)
    return images, pool_len[idx_slot], pool_crc[idx_slot]


def record_arrays(n_records: int, n_images: int, per_record: int, record_size: int, group_offsets: list[int],
                  lengths: np.ndarray, perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The index's records and each record's group offsets (a short last record's its own)."""
    records = np.zeros(n_records, dtype=fmt.RECORD_DTYPE)
    records["first_image"] = np.arange(n_records) * per_record
    records["n_images"] = np.minimum(per_record, n_images - records["first_image"])
    records["size"] = record_size
    rec_offsets = np.tile(np.array(group_offsets, dtype=fmt.OFFSET_DTYPE), (n_records, 1))
    if n_images % per_record:
        last = n_records - 1
        at_last = np.arange(int(records[last]["first_image"]), n_images)  # storage positions
        last_len = lengths[at_last if perm is None else perm[at_last].astype(np.int64)].astype(np.uint64)
        sizes = last_len.sum(axis=0)
        rec_offsets[last] = fmt.RECORD_HEADER_SIZE + np.concatenate([[0], np.cumsum(sizes)[:-1]])
        records["size"][last] = fmt.RECORD_HEADER_SIZE + int(sizes.sum())
    return records, rec_offsets


def imagenet_names(rng: np.random.Generator, n_images: int, n_classes: int) -> tuple[list[str], list[str], list]:
    """(class names, image paths, each directory's range of images: the root's first)."""
    # Names like ImageNet's: n01440764/n01440764_10026.JPEG, sorted like convert sorts.
    wnids = sorted({f"n{v:08d}" for v in rng.choice(10**8, size=n_classes * 2, replace=False)})[:n_classes]
    counts = class_counts(n_images, n_classes)
    paths: list[str] = []
    dir_ranges = [[0, n_images]]
    for wnid, count in zip(wnids, counts):
        numbers = rng.choice(20_000, size=int(count), replace=False)
        names = sorted(f"{wnid}_{v}.JPEG" for v in numbers)
        dir_ranges.append([len(paths), len(paths) + int(count)])
        paths.extend(f"{wnid}/{name}" for name in names)
    return wnids, paths, dir_ranges


def make_scale_store(dest: Path, n_images: int = IMAGENET_TRAIN, n_classes: int = 1000,
                     per_record: int = 1000, pool: int = 1000, seed: int = 0,
                     order: str = fmt.ORDER_SOURCE, order_seed: int = 0) -> dict:
    if dest.exists():
        shutil.rmtree(dest)
    (dest / fmt.RECORDS_DIR).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    groups = pool_images(min(pool, per_record), seed)
    n_groups = max(len(g) for g in groups)
    pool_len, pool_crc = pool_tables(groups, n_groups)

    # One record body, reused by every record (only the header differs).
    slot = np.arange(per_record) % len(groups)  # pool image behind each slot of a record
    body, group_offsets = record_body(groups, slot, n_groups)
    record_size = fmt.RECORD_HEADER_SIZE + len(body)
    n_records = -(-n_images // per_record)
    write_records(dest, n_records, n_images, per_record, body, groups, slot, n_groups)

    perm = storage_permutation(n_images, order, order_seed)
    images, lengths, crcs = image_arrays(pool_len, pool_crc, slot, n_images, per_record, perm, rng)
    records, rec_offsets = record_arrays(n_records, n_images, per_record, record_size, group_offsets, lengths, perm)
    wnids, paths, dir_ranges = imagenet_names(rng, n_images, n_classes)
    index = Index(images, lengths, crcs, records, rec_offsets, StringTable.from_strings(paths),
                  StringTable.from_strings([""] + wnids), np.array(dir_ranges, dtype=fmt.OFFSET_DTYPE),
                  storage_order=perm)
    index.check_shapes()
    return publish(dest, index, [], {"record_target_bytes": record_size, "order": order, "seed": int(order_seed),
                                     "options": {"synthetic_scale_store": True}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--images", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-record", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the names, mtimes and tiny photos")
    ap.add_argument("--order", choices=fmt.ORDERS, default=fmt.ORDER_SOURCE,
                    help="storage order (default source: a version-1 store; shuffled: version 2)")
    ap.add_argument("--order-seed", type=int, default=0, help="the storage order's seed (convert --seed)")
    args = ap.parse_args()
    t0 = time.monotonic()
    m = make_scale_store(args.dest, args.images, args.classes, args.per_record, seed=args.seed,
                         order=args.order, order_seed=args.order_seed)
    du = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    log(f"{m['num_images']} images, {len(m['classes'])} classes, {m['num_records']} records, "
        f"format version {m['format_version']}, "
        f"{du / 2**20:.0f} MiB on disk in {time.monotonic() - t0:.1f}s -> {args.dest}")


if __name__ == "__main__":
    main()
