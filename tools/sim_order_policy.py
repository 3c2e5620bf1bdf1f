#!/usr/bin/env python3
"""What the record-prefix policy does at ImageNet scale on a shuffled store: a simulation
with the mount's own policy code, no I/O (issue 24's remote targets, beyond the demo set).

The catalogue is tools/bench_shuffle.py's: ``--classes`` x ``--per-class`` images with
log-normal sizes of mean ``--mean-kb``, cut into records by the converter's rule
(``storage_order`` + ``plan_batches``, 64 MiB) in the ``--orders`` given. A record's
group regions are sized from ``--group-fractions`` (cumulative share of an image's bytes
in groups 1..k; the default is the demo store's). The policy is the store's own,
``pcrfs.store.read.prefixpolicy.store_policy`` (``group_bounds``, the cache budgets, and for a
shuffled store the epoch gate, image i's class being ``i // --per-class``), fed one
read at a time:

* ``path_epoch``: every image at ``--k`` in path order (``ImageFolder``, ``shuffle=False``);
* ``one_class``: the images of ``--copy-classes`` classes, each alone on a fresh policy
  (``cp -r MNT/scan5/CLASS``).

A read the policy answers with a plan fetches the record's prefix (one GET per part);
the records ``prefetch`` names are fetched at once (an optimistic, instant background
prefetch); any other read of an image whose record prefix is not held is a per-image
read of its ``k`` groups (``k`` GETs: its groups lie in ``k`` regions of the record --
the demo run measured ~2.9 GETs per such read at scan5, some images having fewer groups
or adjacent small ones). Per cache setting (``--caches``): ``default`` (memory 256M, no
disk cache: ImageNet's scan5 view of ~60 GB does not fit), ``disk10g`` (``--disk-cache``
with its default 10G cap: does not fit either), ``disk100g`` (a 100G disk cache, which
holds it: VIEW mode).

    python tools/sim_order_policy.py                  # ~30 s; writes results/sim_order_policy.json
    python tools/sim_order_policy.py --mean-kb 58 --out results/sim_order_policy_1100.json  # ~1,100 per record
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402
from bench_shuffle import catalogue, records_by_rule  # noqa: E402

from pcrfs.store import format as fmt  # noqa: E402
from pcrfs.store.read.prefixpolicy import group_bounds, store_policy  # noqa: E402

DEMO_FRACTIONS = "0.082,0.213,0.257,0.305,0.435,0.637,0.651,0.686,0.721,1.0"  # pcrfs info of the demo store
CACHES = {"default": (256 << 20, 0), "disk10g": (256 << 20, 10 << 30), "disk100g": (256 << 20, 100 << 30)}


def layout(sizes: np.ndarray, record_of: np.ndarray, perm: np.ndarray, fractions: np.ndarray):
    """(bounds [R, G+1], image bytes at each k [n, G+1]) of group-major records."""
    g = len(fractions)
    cum = np.concatenate([[0.0], fractions])
    image_k = np.outer(sizes, cum)  # bytes of groups 1..k of each image
    per_group = np.diff(image_k, axis=1)  # [n, G]
    r = int(record_of.max()) + 1
    region = np.zeros((r, g))
    np.add.at(region, record_of, per_group)
    offsets = fmt.RECORD_HEADER_SIZE + np.concatenate([np.zeros((r, 1)), np.cumsum(region, axis=1)], axis=1)
    bounds = np.round(offsets).astype(np.int64)  # [R, G+1]: b[r, G] = the record's size
    counts = np.bincount(record_of, minlength=r)
    return bounds, image_k, counts


def simulate(images: np.ndarray, record_of: np.ndarray, image_k: np.ndarray, bounds: np.ndarray, counts: np.ndarray,
             k: int, shuffled: bool, memory: int, disk: int, classes_of: np.ndarray) -> dict:
    policy = store_policy(bounds, memory, disk, classes_of=classes_of if shuffled else None)
    held = np.zeros(len(bounds), dtype=np.int64)
    gets = prefix_gets = image_gets = 0
    link = 0.0
    for i in images.tolist():
        r = int(record_of[i])
        if held[r] >= k:
            continue
        plan = policy.access(r, k, int(held[r]), i)
        if plan is None:
            gets += k
            image_gets += k
            link += image_k[i, k]
            continue
        todo = [r] + [q for q in policy.prefetch(r, k) if held[q] < k]
        for q in todo:
            p = policy.plan(q, k, int(held[q])) if q != r else plan
            prefix_gets += len(p.parts)
            gets += len(p.parts)
            link += p.end - p.start
            held[q] = k
    mode = policy.mode(k)
    class_bytes = float(image_k[images, k].sum())
    return {"reads": len(images), "gets": gets, "gets_per_image": round(gets / len(images), 4),
            "per_image_gets": image_gets, "prefix_gets": prefix_gets, "prefixes": int((held >= k).sum()),
            "link_bytes": int(link), "read_bytes": int(class_bytes),
            "link_over_read_bytes": round(float(link / class_bytes), 3), "mode": mode[0].value, "window_fit": mode[1],
            "policy": policy.stats()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--mean-kb", type=float, default=110.0, help="mean image size (ImageNet: ~110 KB)")
    p.add_argument("--size-sigma", type=float, default=0.5)
    p.add_argument("--record-bytes", type=int, default=fmt.DEFAULT_RECORD_BYTES)
    p.add_argument("--group-fractions", default=DEMO_FRACTIONS)
    p.add_argument("--k", type=int, default=5, help="the view read (scan5)")
    p.add_argument("--orders", default="shuffled",
                   help="storage orders (source: the per-image reads are what the mount's readahead serves in "
                        "path order, which this does not simulate)")
    p.add_argument("--caches", default="default,disk10g,disk100g")
    p.add_argument("--copy-classes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "sim_order_policy.json")
    a = p.parse_args()
    run = Run("tools/sim_order_policy.py")
    fractions = np.array([float(x) for x in a.group_fractions.split(",")])
    files = catalogue(a.classes, a.per_class, a.mean_kb * 1000, a.size_sigma, a.seed)
    sizes = np.array([f.size for f in files], dtype=np.float64)
    n = len(files)
    classes_of = np.arange(n) // a.per_class  # the catalogue is in path order, class by class
    rows = []
    for order in a.orders.split(","):
        record_of, perm = records_by_rule(files, order, a.seed, a.record_bytes)
        bounds, image_k, counts = layout(sizes, record_of, perm, fractions)
        view = float(image_k[:, a.k].sum())
        log(f"{order}: {len(counts)} records of {counts.mean():.0f} images; scan{a.k} view {view / 1e9:.1f} GB")
        for cache in a.caches.split(","):
            memory, disk = CACHES[cache]
            r = simulate(np.arange(n), record_of, image_k, bounds, counts, a.k, order == "shuffled", memory, disk, classes_of)
            rows.append({"what": "path_epoch", "order": order, "cache": cache, **r})
            log(str(rows[-1]))
            for c in range(a.copy_classes):
                klass = (a.classes // 2 + c * 97) % a.classes
                imgs = np.arange(klass * a.per_class, (klass + 1) * a.per_class)
                r = simulate(imgs, record_of, image_k, bounds, counts, a.k, order == "shuffled", memory, disk, classes_of)
                rows.append({"what": "one_class", "class": klass, "order": order, "cache": cache, **r})
                log(str(rows[-1]))
    doc = run.doc(benchmark="sim_order_policy", images=n, classes=a.classes, mean_kb=a.mean_kb,
                  record_bytes=a.record_bytes, k=a.k, group_fractions=fractions.tolist(),
                  caches={c: {"memory": m, "disk": d} for c, (m, d) in CACHES.items()},
                  assumptions="no I/O: prefetch instant, a per-image read = k GETs and the image's k-group bytes",
                  rows=rows)
    write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
