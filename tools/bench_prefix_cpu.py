#!/usr/bin/env python3
"""The reader's CPU per image for shuffled s3:// reads: record prefixes vs per-image reads, obstore vs s3fs.

What the mount daemon spends in pcrfs's own read path (FUSE aside): ``Store.read_at``
of whole files in a shuffled order, as the kernel asks for them, against s3rver
on 127.0.0.1. CPU is ``time.process_time()`` of this process (all threads: the
S3 client's too), so it does not drift with the machine's load. Epoch 1 fetches
(and checks) record prefixes; epoch 2 is served from the memory cache.

    python tools/bench_prefix_cpu.py --store DIR --view scan5   # writes results/bench_prefix_cpu.json
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.proc import loadavg  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, S3rver, store_files, upload  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402


def epoch_cpu(store, order: list[int], k: int) -> dict:
    c0, w0 = time.process_time(), time.perf_counter()
    for i in order:
        size = store.size(i, k)
        for off in range(0, size, 128 << 10):  # the kernel's read size
            store.read_at(i, k, off, min(128 << 10, size - off))
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_us_per_image": round(1e6 * cpu / len(order), 1), "wall_s": round(wall, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True, help="a local store to upload (e.g. bench_remote_epoch's)")
    p.add_argument("--view", default="scan5")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-prefix-cpu")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_prefix_cpu.json")
    a = p.parse_args()
    run = Run("tools/bench_prefix_cpu.py")
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.store.read.reader import ReadOptions, open_store

    os.environ.update(S3RVER_ENV)
    os.environ["XDG_CACHE_HOME"] = str(a.workdir / "xdg")
    (a.workdir / "logs").mkdir(parents=True, exist_ok=True)
    server = S3rver(a.npm_cache, a.workdir / "s3rver", a.workdir / "logs" / "s3rver.log")
    rows = []
    try:
        url = f"s3://{BUCKET}/cpu.pcr"
        upload(store_files(a.store, "cpu.pcr"), server.endpoint)
        for client in ("obstore", "s3fs"):
            os.environ["PCRFS_S3_CLIENT"] = client
            for prefix in (True, False):
                opts = ReadOptions(remote=RemoteOptions(endpoint_url=server.endpoint), cache_bytes=256 << 20,
                                   readahead_bytes=0, record_prefix=prefix)
                with open_store(url, options=opts) as s:
                    k = s.num_groups if a.view == "full" else int(a.view[4:])
                    order = list(range(s.num_images))
                    random.Random(0).shuffle(order)
                    e1 = epoch_cpu(s, order, k)
                    random.Random(1).shuffle(order)
                    e2 = epoch_cpu(s, order, k)
                    io = s.io_stats()["source"]
                row = {"client": client, "mode": "prefix" if prefix else "images", "view": a.view,
                       "images": len(order), "epoch1": e1, "epoch2": e2, "requests": io["requests"],
                       "bytes": io["bytes"], "loadavg": loadavg()[0]}
                rows.append(row)
                log(str(row))
    finally:
        server.stop()
    doc = run.doc(benchmark="bench_prefix_cpu", date=run.started.isoformat(timespec="seconds"), rows=rows)
    write_json(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
