#!/usr/bin/env python3
"""Client CPU per ranged GET: s3fs (pcrfs's fsspec path) vs obstore vs boto3, against one s3rver.

Issue 13, item 3: the mount daemon is one process and every GET costs it CPU.
Against the same s3rver on 127.0.0.1 (a 64 MiB object), sequentially:

* small GETs (``--small`` bytes, a scan group): CPU and wall per request;
* large GETs (``--large`` bytes, a record-prefix part): CPU per MB;
* obstore ``get_ranges`` with all small ranges in one call (its own coalescing off).

CPU is this process's ``time.process_time()`` (all threads, including the
clients' I/O threads), so it does not drift with the machine's load.

    python tools/bench_s3_client.py      # ~1 minute; writes results/bench_s3_client.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.proc import loadavg  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, S3rver  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

KEY = "client-bench/object.bin"


def timed(fn, n: int) -> dict:
    fn(0)  # connections, credentials, code warm
    c0, w0 = time.process_time(), time.perf_counter()
    for j in range(n):
        fn(j)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"n": n, "cpu_ms": round(1e3 * cpu / n, 3), "wall_ms": round(1e3 * wall / n, 3)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-client")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--object", type=int, default=64 << 20)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=8 << 20)
    p.add_argument("-n", type=int, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_s3_client.json")
    return p.parse_args()


def s3fs_costs(fs, starts: list[int], a: argparse.Namespace, large_n: int) -> dict:
    log("s3fs")
    return {"s3fs_small": timed(lambda j: fs.cat_file(f"{BUCKET}/{KEY}", start=starts[j],
                                                      end=starts[j] + a.small), a.n),
            "s3fs_large": timed(lambda j: fs.cat_file(f"{BUCKET}/{KEY}", start=starts[j],
                                                      end=starts[j] + a.large), large_n)}


def boto3_costs(endpoint: str, starts: list[int], a: argparse.Namespace, large_n: int) -> dict:
    log("boto3")
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)

    def boto_get(j: int, n: int) -> bytes:
        r = s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={starts[j]}-{starts[j] + n - 1}")
        return r["Body"].read()

    return {"boto3_small": timed(lambda j: boto_get(j, a.small), a.n),
            "boto3_large": timed(lambda j: boto_get(j, a.large), large_n)}


def obstore_costs(endpoint: str, starts: list[int], a: argparse.Namespace, large_n: int) -> dict:
    log("obstore")
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, access_key_id="S3RVER", secret_access_key="S3RVER",
                    region="us-east-1", virtual_hosted_style_request=False,
                    client_options={"allow_http": True})
    out = {}
    out["obstore_small"] = timed(lambda j: bytes(obstore.get_range(store, KEY, start=starts[j],
                                                                   length=a.small)), a.n)
    out["obstore_small_buffer"] = timed(lambda j: memoryview(obstore.get_range(store, KEY, start=starts[j],
                                                                               length=a.small)), a.n)
    out["obstore_large"] = timed(lambda j: memoryview(obstore.get_range(store, KEY, start=starts[j],
                                                                        length=a.large)), large_n)
    c0, w0 = time.process_time(), time.perf_counter()
    obstore.get_ranges(store, KEY, starts=starts, lengths=[a.small] * a.n, coalesce=0)
    out["obstore_get_ranges_small"] = {"n": a.n, "cpu_ms": round(1e3 * (time.process_time() - c0) / a.n, 3),
                                       "wall_ms": round(1e3 * (time.perf_counter() - w0) / a.n, 3)}
    return out


def main() -> int:
    a = parse_args()
    run = Run("tools/bench_s3_client.py")
    os.environ.update(S3RVER_ENV)
    (a.workdir / "logs").mkdir(parents=True, exist_ok=True)
    server = S3rver(a.npm_cache, a.workdir / "s3rver", a.workdir / "logs" / "s3rver.log")
    out: dict = {}
    try:
        from pcrfs.remote.fs import RemoteOptions, filesystem

        fs = filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=server.endpoint))
        fs.pipe_file(f"{BUCKET}/{KEY}", random.Random(0).randbytes(a.object))
        rng = random.Random(1)
        starts = [rng.randrange(0, a.object - a.large) for _ in range(a.n)]
        large_n = max(3, a.n // 30)
        out.update(s3fs_costs(fs, starts, a, large_n))
        out.update(boto3_costs(server.endpoint, starts, a, large_n))
        out.update(obstore_costs(server.endpoint, starts, a, large_n))
    finally:
        server.stop()
    for name, row in out.items():
        if name.endswith("_large"):
            row["cpu_ms_per_mb"] = round(row["cpu_ms"] / (a.large / 1e6), 3)
    doc = run.doc(benchmark="bench_s3_client", date=run.started.isoformat(timespec="seconds"),
                  loadavg=loadavg(), object_bytes=a.object, small_bytes=a.small, large_bytes=a.large,
                  server="s3rver 3.7.1 on 127.0.0.1", results=out)
    write_json(a.out, doc)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
