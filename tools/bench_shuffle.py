#!/usr/bin/env python3
"""Shuffle quality of RecordShuffleSampler against its window, on an ImageNet-shaped catalogue.

ImageNet-1k in ImageFolder order: 1,000 classes x 1,281 images, cut into records
of ``--per-record`` consecutive images (64 MiB records of ~58 KB photos hold
~1,100), so a record holds one or two classes -- the worst case for a
record-local shuffle. For each window (records open at once) and for a uniform
permutation, over one epoch in batches of ``--batch``:

* ``classes_per_batch``: distinct labels in a batch (mean), against a uniform
  shuffle's;
* ``tv_distance``: total-variation distance between a batch's label histogram and
  the dataset's (mean; 0 = every batch looks like the dataset);
* ``label_run``: mean length of runs of equal consecutive labels (1.0 = uniform);
* ``cpu_s``: the sampler's CPU time for the epoch's order.

    python tools/bench_shuffle.py         # ~1 minute; writes results/bench_shuffle.json
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

from pcrfs.sampling import RecordShuffleSampler  # noqa: E402


def quality(order: np.ndarray, labels: np.ndarray, classes: int, batch: int) -> dict:
    seq = labels[order]
    nb = len(seq) // batch
    batches = seq[:nb * batch].reshape(nb, batch)
    distinct = np.array([len(np.unique(b)) for b in batches])
    q = np.bincount(labels, minlength=classes) / len(labels)
    tv = np.array([0.5 * np.abs(np.bincount(b, minlength=classes) / batch - q).sum() for b in batches])
    changes = int((np.diff(seq) != 0).sum())
    return {"classes_per_batch": round(float(distinct.mean()), 1), "tv_distance": round(float(tv.mean()), 3),
            "label_run": round(len(seq) / (changes + 1), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--per-record", type=int, default=1100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--windows", default="1,2,4,8,16,32,64,128,256,1024")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_shuffle.json")
    a = p.parse_args()
    run = Run("tools/bench_shuffle.py")
    labels = np.repeat(np.arange(a.classes), a.per_class)
    record_of = np.arange(len(labels)) // a.per_record
    rows = []
    for w in [int(x) for x in a.windows.split(",")]:
        s = RecordShuffleSampler.from_records(record_of, w, seed=0)
        t0 = time.process_time()
        order = s.indices()
        cpu = time.process_time() - t0
        row = {"window": w, "records_per_window_share": round(w / (record_of[-1] + 1), 4),
               **quality(order, labels, a.classes, a.batch), "cpu_s": round(cpu, 2)}
        rows.append(row)
        log(str(row))
    uniform = quality(np.random.default_rng(0).permutation(len(labels)), labels, a.classes, a.batch)
    rows.append({"window": "uniform", **uniform})
    log(str(rows[-1]))
    doc = run.doc(benchmark="bench_shuffle", date=run.started.isoformat(timespec="seconds"),
                  loadavg=loadavg(), images=len(labels), classes=a.classes, per_record=a.per_record,
                  records=int(record_of[-1] + 1), batch=a.batch, rows=rows)
    write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
