#!/usr/bin/env python3
"""Shuffle quality of RecordShuffleSampler against its window, per storage order.

An ImageNet-shaped catalogue -- ``--classes`` x ``--per-class`` images (1,000 x
1,281) in path order, i.e. class by class -- is cut into records by the
converter's own code: ``pcrfs.convert.plan.storage_order`` (``--order source``
keeps the path order, ``--order shuffled`` draws a permutation from ``--seed``)
then ``pcrfs.convert.plan.plan_batches`` (a record closes once its source bytes
reach ``--record-bytes``, 64 MiB). The catalogue's files are fabricated
``SourceFile``s whose sizes are drawn from a log-normal of mean
``record_bytes / per_record``, so records hold ~``--per-record`` images each
(``600,1100``: ImageNet's ~110 KB photos and ~58 KB ones in 64 MiB records).
In source order a record holds one or two classes -- the worst case for a
record-local shuffle; shuffled, it holds a sample of the whole dataset.

For each (records of ~N images, order, window) and for a uniform permutation,
over one epoch in batches of ``--batch``:

* ``classes_per_batch``: distinct labels in a batch (mean), and its ratio to a
  uniform shuffle's (issue 24's target: >= 0.95 for shuffled records);
* ``tv_distance``: total-variation distance between a batch's label histogram and
  the dataset's (mean; 0 = every batch looks like the dataset; a uniform shuffle
  of batches of 256 over 1,000 classes cannot go below ~0.6);
* ``label_run``: mean length of runs of equal consecutive labels (1.0 = uniform);
* ``cpu_s``: the sampler's CPU time for the epoch's order.

``--store PATH`` (repeatable) measures the same table on a store ``pcrfs convert``
wrote (``RecordShuffleSampler(PATH, window=w)``, labels from the store's class
directories; batches of at most a twentieth of its images, so that a small store
still gives 20 of them), and checks that the rule above -- the index's source sizes
(stored sizes for a copy of a store) in path order through ``storage_order`` and
``plan_batches`` with the manifest's order, seed and record size -- gives exactly
the store's storage order and records.

    python tools/bench_shuffle.py                     # ~1 minute; writes results/bench_shuffle.json
    python tools/bench_shuffle.py --windows 1,4,16 --store /tmp/demo-shuffled.pcr
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.proc import loadavg  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

from pcrfs.convert.plan import SourceFile, SourceListing, plan_batches, storage_order  # noqa: E402
from pcrfs.access.sampling import RecordShuffleSampler  # noqa: E402
from pcrfs.store import format as fmt  # noqa: E402

TARGET = 0.95  # shuffled classes per batch >= 0.95 x a uniform shuffle's (issue 24)


def quality(order: np.ndarray, labels: np.ndarray, classes: int, batch: int) -> dict:
    seq = labels[order]
    nb = len(seq) // batch
    batches = seq[:nb * batch].reshape(nb, batch)
    # distinct labels per batch and the TV distance, vectorized: one histogram per batch
    hist = np.zeros((nb, classes), dtype=np.int32)
    np.add.at(hist, (np.repeat(np.arange(nb), batch), batches.ravel()), 1)
    distinct = (hist > 0).sum(axis=1)
    q = np.bincount(labels, minlength=classes) / len(labels)
    tv = 0.5 * np.abs(hist / batch - q).sum(axis=1)
    changes = int((np.diff(seq) != 0).sum())
    return {"classes_per_batch": round(float(distinct.mean()), 1), "tv_distance": round(float(tv.mean()), 3),
            "label_run": round(len(seq) / (changes + 1), 2)}


def catalogue(classes: int, per_class: int, mean_bytes: float, sigma: float, seed: int) -> list[SourceFile]:
    """ImageNet-shaped SourceFiles in path order (``ino`` = image number, so the storage order
    can be read back from the listing ``storage_order`` returns)."""
    n = classes * per_class
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(0.0, sigma, n)
    sizes = np.maximum(1, np.round(sizes * (mean_bytes / sizes.mean()))).astype(np.int64)
    return [SourceFile(f"n{i // per_class:08d}/{i % per_class:05d}.JPEG", "", int(sizes[i]), 0, 0, i)
            for i in range(n)]


def records_by_rule(files: list[SourceFile], order: str, seed: int, record_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(record of each image in path order, the storage order) as ``pcrfs convert`` cuts them."""
    stored = storage_order(SourceListing(files), order, seed).files
    perm = np.fromiter((f.ino for f in stored), dtype=np.int64, count=len(stored))
    record_of = np.empty(len(files), dtype=np.int64)
    for b in plan_batches(stored, record_bytes):
        record_of[perm[b.start:b.end]] = b.record
    return record_of, perm


def window_rows(record_of: np.ndarray, labels: np.ndarray, classes: int, batch: int, windows: list[int],
                uniform: dict, make=None, **tags) -> list[dict]:
    rows = []
    records = int(record_of.max()) + 1
    for w in windows:
        s = RecordShuffleSampler.from_records(record_of, w, seed=0) if make is None else make(w)
        t0 = time.process_time()
        order = s.indices()
        cpu = time.process_time() - t0
        q = quality(order, labels, classes, batch)
        row = {**tags, "window": w, "records_per_window_share": round(w / records, 4), **q,
               "classes_vs_uniform": round(q["classes_per_batch"] / uniform["classes_per_batch"], 3),
               "tv_minus_uniform": round(q["tv_distance"] - uniform["tv_distance"], 3), "cpu_s": round(cpu, 2)}
        rows.append(row)
        log(str(row))
    return rows


def store_rows(path: Path, batch: int, windows: list[int]) -> dict:
    """The table on a converted store, and whether the rule reproduces its storage order and records."""
    from pcrfs.store.read.reader import open_store

    with open_store(path) as st:
        ix, m = st.index, st.manifest
        n = st.num_images
        labels_store = np.array([st.label(i) for i in range(n)], dtype=np.int64)
        order, seed = m.get("order", fmt.ORDER_SOURCE), int(m.get("seed", 0))
        # a conversion cuts records by source bytes; a copy of a store (convert OLD.pcr NEW.pcr) by stored bytes
        sizes = (np.asarray(ix.group_lengths, dtype=np.int64).sum(axis=1) if "migrated_from" in m
                 else np.asarray(ix.images["src_size"], dtype=np.int64))
        files = [SourceFile(ix.paths[i], "", int(sizes[i]), 0, 0, i) for i in range(n)]
        record_of_rule, perm = records_by_rule(files, order, seed, int(m["record_target_bytes"]))
        stored_order = np.arange(n) if ix.storage_order is None else ix.storage_order.astype(np.int64)
        record_of_store = ix.records_of(np.arange(n))
        check = {"storage_order_equal": bool(np.array_equal(perm, stored_order)),
                 "records_equal": bool(np.array_equal(record_of_rule, record_of_store))}
        classes = int(labels_store.max()) + 1
        first = RecordShuffleSampler(st, view="full", window=1, seed=0)
        labels = labels_store[first.images]  # the sampler's dataset order (ImageFolder's)
        uniform = quality(np.random.default_rng(0).permutation(n), labels, classes, min(batch, max(1, n // 20)))
        rows = window_rows(first.record_of, labels, classes, min(batch, max(1, n // 20)), windows, uniform,
                           make=lambda w: RecordShuffleSampler(st, view="full", window=w, seed=0),
                           store=str(path), order=order)
        return {"store": str(path), "format_version": m.get("format_version"), "order": order, "seed": seed,
                "images": n, "classes": classes, "records": len(ix.records),
                "batch": min(batch, max(1, n // 20)), "rule_reproduces_store": check,
                "uniform": uniform, "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--per-record", default="600,1100",
                   help="images per record to aim at (comma-separated): sizes drawn so that --record-bytes "
                        "holds about this many")
    p.add_argument("--record-bytes", type=int, default=fmt.DEFAULT_RECORD_BYTES)
    p.add_argument("--size-sigma", type=float, default=0.5, help="log-normal sigma of the file sizes")
    p.add_argument("--orders", default="source,shuffled")
    p.add_argument("--seed", type=int, default=0, help="the conversion's --seed")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--windows", default="1,2,4,8,16,32,64,128,256,1024")
    p.add_argument("--store", type=Path, action="append", default=[],
                   help="also measure a store pcrfs convert wrote (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_shuffle.json")
    a = p.parse_args()
    run = Run("tools/bench_shuffle.py")
    windows = [int(x) for x in a.windows.split(",")]
    labels = np.repeat(np.arange(a.classes), a.per_class)
    uniform_seeds = [quality(np.random.default_rng(s).permutation(len(labels)), labels, a.classes, a.batch)
                     for s in range(3)]
    uniform = {k: round(float(np.mean([u[k] for u in uniform_seeds])), 3) for k in uniform_seeds[0]}
    log(f"uniform: {uniform} (3 permutations: {uniform_seeds})")
    rows, cuts, targets = [], [], {}
    for per_record in [int(x) for x in a.per_record.split(",")]:
        files = catalogue(a.classes, a.per_class, a.record_bytes / per_record, a.size_sigma, a.seed)
        for order in a.orders.split(","):
            t0 = time.process_time()
            record_of, _ = records_by_rule(files, order, a.seed, a.record_bytes)
            plan_cpu = time.process_time() - t0
            counts = np.bincount(record_of)
            per_rec_classes = [len(np.unique(labels[record_of == r])) for r in range(min(50, len(counts)))]
            cuts.append({"per_record": per_record, "order": order, "records": len(counts),
                         "images_per_record_mean": round(float(counts.mean()), 1),
                         "images_per_record_min_max": [int(counts.min()), int(counts.max())],
                         "classes_per_record_mean_first50": round(float(np.mean(per_rec_classes)), 1),
                         "plan_cpu_s": round(plan_cpu, 2)})
            log(str(cuts[-1]))
            got = window_rows(record_of, labels, a.classes, a.batch, windows, uniform,
                              per_record=per_record, order=order)
            rows += got
            if order == fmt.ORDER_SHUFFLED:
                for r in got:
                    if r["window"] in (1, 4, 16):
                        targets[f"records_{per_record}_window_{r['window']}_classes_ge_{TARGET}_uniform"] = {
                            "value": r["classes_vs_uniform"], "met": r["classes_vs_uniform"] >= TARGET}
        del files
    stores = [store_rows(s, a.batch, windows) for s in a.store]
    for s in stores:
        log(f"{s['store']}: rule reproduces the store: {s['rule_reproduces_store']}")
    doc = run.doc(benchmark="bench_shuffle", date=run.started.isoformat(timespec="seconds"),
                  loadavg=loadavg(), images=len(labels), classes=a.classes, batch=a.batch,
                  record_bytes=a.record_bytes, size_sigma=a.size_sigma, seed=a.seed,
                  rule="pcrfs.convert.plan.storage_order(listing, order, seed) + plan_batches(files, record_bytes)",
                  uniform=uniform, uniform_permutations=uniform_seeds, records=cuts, rows=rows,
                  stores=stores, targets=targets)
    write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
