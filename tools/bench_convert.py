#!/usr/bin/env python3
"""Benchmark `pcrfs convert` against the PCR paper's conversion approach and the
bare libjpeg-turbo transform, on the same photographs with the same worker count.

Three ways, measured side by side in one run (rounds interleaved, medians reported,
because a shared machine is noisy):

  pcrfs      ``pcrfs.convert.convert(src, store, workers=W)``, in process and end to
             end: listing, reading, header check, lossless transform, scan split,
             CRC-32s, group-major record files (fsynced) and the index/manifest.
  reference  the PCR paper code's approach: per image a
             ``jpegtran -copy none -optimize -progressive`` subprocess writing a temp
             file, then a separate scan-offset helper *process* per image (a tiny C
             program compiled here, like the reference's C helper; a ``python3 -c``
             script if no C compiler is found or with ``--helper python``), then the
             file is read back, split at the printed offsets and written into
             group-major record files in Python. A thread pool of W workers.
  bare       ``pcrfs.jpeg.turbojpeg.to_progressive`` over bytes already in memory, a
             ThreadPool of W: no reading, splitting, checksums or writing. The floor.
  pcrfs_source  with ``--order both``: ``convert(src, store, workers=W, order="source")``
             beside ``pcrfs`` (``order="shuffled"``, the default), rounds interleaved, so
             the storage order's cost (issue 24: shuffled >= 0.95x source) is measured side
             by side, per round and as medians.
  daskN      ``convert(src, store, client=...)`` on a Dask LocalCluster of N worker
             processes (one thread each; ``--dask-workers 1,2``): one task per record
             batch (``--dask-record-size``, default 8M, so a small set still makes
             enough tasks). Cluster startup is timed apart and not in the rate; CPU
             counts the client and the worker processes. Needs ``pcrfs[dask]``
             (skipped with a note without it, or with ``--dask-workers ''``).

All three produce the same JPEG bytes (checked): pcrfs stores each image's scan
groups without the 2-byte EOI, so pcrfs bytes + 2 * images == sum of jpegtran outputs.

Usage (from the repository root):

    python3 tools/bench_convert.py                      # ~2000 demo photos, all cores
    python3 tools/bench_convert.py --images 500 --rounds 5 --workers 1
    python3 tools/bench_convert.py --src /data/photos   # reuse (or create) a photo set
    python3 tools/bench_convert.py --rounds 1 --dask-workers 1,2 --no-breakdown   # quick
    python3 tools/bench_convert.py --order both --dask-workers '' --rounds 5   # shuffled vs source

Writes results/bench_convert.json and results/bench_convert.png (needs matplotlib;
without it the plot is skipped with a note).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.pool import ThreadPool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

import pcrfs  # noqa: E402
from pcrfs.convert import convert, list_sources  # noqa: E402
from pcrfs.jpeg import turbojpeg  # noqa: E402
from pcrfs.store import format as fmt  # noqa: E402
from pcrfs.store.write.sink import LocalSink  # noqa: E402

METHODS = ("pcrfs", "reference", "bare")
JPEGTRAN_ARGS = ("-copy", "none", "-optimize", "-progressive")
TARGET_VS_REFERENCE = 1.3
TARGET_VS_BARE = 0.85
TARGET_SHUFFLED_VS_SOURCE = 0.95
QUIET_SHARE = 0.10  # a round is quiet when other processes took less than this share of the CPUs

# ---- the reference's scan-offset helper --------------------------------------------
# Prints the end offset of every scan's entropy-coded data (T.81 Annex B marker walk),
# the same cut points as pcrfs.jpeg.scans.scan_ends.

C_HELPER = r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc != 2) return 2;
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(n > 0 ? n : 1);
    if (!b || fread(b, 1, n, f) != (size_t)n) return 2;
    fclose(f);
    if (n < 4 || b[0] != 0xFF || b[1] != 0xD8) return 3;
    long pos = 2; int scans = 0;
    for (;;) {
        if (pos + 1 >= n || b[pos] != 0xFF) return 3;
        while (pos + 1 < n && b[pos + 1] == 0xFF) pos++;
        if (pos + 1 >= n) return 3;
        int m = b[pos + 1];
        if (m == 0xD9) break;
        if (m == 0x01 || (m >= 0xD0 && m <= 0xD7)) { pos += 2; continue; }
        if (pos + 4 > n) return 3;
        long seg_end = pos + 2 + ((b[pos + 2] << 8) | b[pos + 3]);
        if (seg_end > n) return 3;
        if (m == 0xDA) {
            long p = seg_end;
            for (;;) {
                while (p < n && b[p] != 0xFF) p++;
                if (p + 1 >= n) return 3;
                int c = b[p + 1];
                if (c == 0x00 || (c >= 0xD0 && c <= 0xD7)) { p += 2; continue; }
                break;
            }
            pos = p;
            printf(scans++ ? " %ld" : "%ld", pos);
        } else {
            pos = seg_end;
        }
    }
    printf("\n");
    free(b);
    return scans ? 0 : 3;
}
"""

PY_HELPER = r"""
import sys
d = open(sys.argv[1], 'rb').read(); n = len(d); p = 2; out = []
while True:
    while d[p + 1] == 0xFF: p += 1
    m = d[p + 1]
    if m == 0xD9: break
    if m == 0x01 or 0xD0 <= m <= 0xD7: p += 2; continue
    e = p + 2 + int.from_bytes(d[p + 2:p + 4], 'big')
    if m == 0xDA:
        q = e
        while True:
            i = d.index(b'\xff', q)
            if d[i + 1] == 0 or 0xD0 <= d[i + 1] <= 0xD7: q = i + 2; continue
            break
        p = i; out.append(str(p))
    else:
        p = e
print(' '.join(out))
"""


def build_helper(kind: str, workdir: Path) -> tuple[list[str], str]:
    """The helper command (prefix; the JPEG path is appended) and a description."""
    if kind in ("auto", "c"):
        cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc:
            src = workdir / "scan_offsets.c"
            exe = workdir / "scan_offsets"
            src.write_text(C_HELPER)
            r = subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True)
            if r.returncode == 0:
                return [str(exe)], f"C helper compiled with {cc} -O2 (one process per image)"
            if kind == "c":
                raise SystemExit(f"compiling the C helper failed:\n{r.stderr}")
        elif kind == "c":
            raise SystemExit("--helper c: no C compiler (cc/gcc/clang) found")
    return [sys.executable, "-c", PY_HELPER], f"{sys.executable} -c script (one process per image)"


# ---- data set ------------------------------------------------------------------------

def jpeg_files(src: Path) -> list[tuple[str, str]]:
    """(relative path, absolute path) of every non-hidden regular file, in store order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            absp = os.path.join(dirpath, name)
            out.append((os.path.relpath(absp, src).replace(os.sep, "/"), absp))
    out.sort(key=lambda t: fmt.path_sort_key(t[0]))
    return out


def prepare_source(args, tmp_root: Path) -> tuple[Path, dict]:
    """Reuse ``--src`` if it holds files, else build the demo photo set (into --src if given)."""
    if args.src is not None and args.src.is_dir() and any(args.src.iterdir()):
        return args.src, {"origin": "reused (--src; every file in it is used, --images does not apply)",
                          "path": str(args.src)}
    from pcrfs.demo import CLASSES, make_demo
    dest = args.src if args.src is not None else tmp_root / "src"
    n_classes = len(CLASSES)
    per_class = max(1, math.ceil(args.images / n_classes))
    t0 = time.monotonic()
    print(f"building the demo photo set: {per_class} per class into {dest} ...", flush=True)
    summary = make_demo(dest, per_class=per_class, seed=args.seed, progress=sys.stderr.isatty(),
                        overwrite=True)
    info = {"origin": "pcrfs.demo.make_demo", "path": str(dest), "per_class": per_class,
            "seed": args.seed, "classes": summary.classes,
            "build_seconds": round(time.monotonic() - t0, 2), "kept": args.src is not None or args.keep}
    return dest, info


def describe_dataset(files: list[tuple[str, str]]) -> dict:
    from PIL import Image
    sizes = [os.path.getsize(a) for _, a in files]
    dims = []
    modes = {}
    for _, a in files[:: max(1, len(files) // 200)]:  # a sample is enough for a description
        with Image.open(a) as im:
            dims.append(im.size)
            modes[im.mode] = modes.get(im.mode, 0) + 1
    return {
        "images": len(files),
        "bytes": sum(sizes),
        "mean_kb": round(statistics.mean(sizes) / 1024, 1) if sizes else 0,
        "median_kb": round(statistics.median(sizes) / 1024, 1) if sizes else 0,
        "sample_median_width": statistics.median(w for w, _ in dims) if dims else 0,
        "sample_median_height": statistics.median(h for _, h in dims) if dims else 0,
        "sample_modes": modes,
    }


# ---- the three ways ------------------------------------------------------------------

def run_pcrfs(src: Path, out: Path, workers: int, order: str = fmt.ORDER_SHUFFLED) -> dict:
    store = out / "store"
    t0 = time.perf_counter()
    res = convert(src, store, workers=workers, order=order)
    dt = time.perf_counter() - t0
    if res.bad or res.skipped:
        raise RuntimeError(f"pcrfs reported problems: {res.bad[:3]} {res.skipped[:3]}")
    return {"seconds": dt, "images": res.images, "bytes_out": res.bytes_out, "store": store}


def _ordered_bounded(pool, fn, items, window):
    """pool.submit(fn, item) for each item, results in order, at most ``window`` in flight."""
    pending = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    while pending:
        fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield fut.result()


def run_reference(src: Path, out: Path, workers: int, helper: list[str], jpegtran: str,
                  record_bytes: int) -> dict:
    """The PCR reference pipeline: two subprocesses per image, Python record writing."""
    t0 = time.perf_counter()
    tmpdir = out / "tmp"
    recdir = out / "records"
    tmpdir.mkdir(parents=True)
    recdir.mkdir()
    files = jpeg_files(src)

    def one(item):
        i, (rel, absp) = item
        prog = str(tmpdir / f"{i:08d}.jpg")
        subprocess.run([jpegtran, *JPEGTRAN_ARGS, "-outfile", prog, absp],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        r = subprocess.run([*helper, prog], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ends = [int(x) for x in r.stdout.split()]
        with open(prog, "rb") as f:
            data = f.read()
        starts = [0] + ends[:-1]
        return rel, [data[s:e] for s, e in zip(starts, ends)]

    index = []
    batch, batch_bytes = [], 0
    total = 0

    def flush():
        nonlocal batch, batch_bytes
        r = len(index)
        n_groups = max(len(g) for _, g in batch)
        offsets, off, chunks = [], 0, []
        for g in range(n_groups):  # group-major
            offsets.append(off)
            for _, groups in batch:
                if g < len(groups):
                    chunks.append(groups[g])
                    off += len(groups[g])
        with open(recdir / f"{r:05d}.rec", "wb") as f:
            f.writelines(chunks)
        index.append({"record": r, "group_offsets": offsets, "size": off,
                      "images": [[rel, [len(x) for x in g]] for rel, g in batch]})
        batch, batch_bytes = [], 0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for rel, groups in _ordered_bounded(pool, one, enumerate(files), workers * 4):
            batch.append((rel, groups))
            n = sum(len(g) for g in groups)
            batch_bytes += n
            total += n
            if batch_bytes >= record_bytes:
                flush()
    if batch:
        flush()
    (out / "index.json").write_text(json.dumps(index))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "images": len(files), "bytes_out": total, "tmpdir": tmpdir}


def run_bare(datas: list[bytes], workers: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPool(workers) as pool:
        outs = pool.map(turbojpeg.to_progressive, datas, chunksize=4)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "images": len(outs), "bytes_out": sum(len(o) for o in outs), "outs": outs}


def _worker_cpu(client) -> float:
    """User+system CPU seconds of all the cluster's worker processes so far."""
    return sum(t[0] + t[1] for t in client.run(os.times).values())


def run_dask(src: Path, out: Path, n_workers: int, record_bytes: int, order: str = fmt.ORDER_SHUFFLED) -> dict:
    """``convert`` on a fresh LocalCluster of ``n_workers`` processes; startup timed apart.

    ``seconds``, ``cpu_seconds`` (client + workers) and ``busy_seconds`` (the whole
    machine, for the noise estimate) cover the conversion only.
    """
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        with Client(cluster) as client:
            client.run(lambda: None)  # every worker up and answering
            startup = time.perf_counter() - t0
            store = out / "store"
            w0, c0, b0 = _worker_cpu(client), os.times(), machine_busy_seconds()
            t1 = time.perf_counter()
            res = convert(src, store, record_bytes=record_bytes, client=client, order=order)
            dt = time.perf_counter() - t1
            w1, c1, b1 = _worker_cpu(client), os.times(), machine_busy_seconds()
    finally:
        cluster.close()
    if res.bad or res.skipped:
        raise RuntimeError(f"pcrfs on Dask reported problems: {res.bad[:3]} {res.skipped[:3]}")
    return {"seconds": dt, "images": res.images, "bytes_out": res.bytes_out, "store": store,
            "startup_seconds": startup, "records": res.manifest["num_records"],
            "cpu_seconds": (w1 - w0) + (c1[0] + c1[1]) - (c0[0] + c0[1]),
            "busy_seconds": None if b0 is None else b1 - b0}


def check_dask_store(pcrfs_store: Path, dask_store: Path) -> bool:
    """The image part of the index (names, sizes, group lengths and CRCs) does not depend on
    record boundaries: it must be byte-identical to the local conversion's."""
    same = ("images.npy", "group_lengths.npy", "group_crc32.npy", "paths.bin", "path_offsets.npy")
    return all((pcrfs_store / fmt.INDEX_DIR / f).read_bytes() == (dask_store / fmt.INDEX_DIR / f).read_bytes()
               for f in same)


# ---- a serial stage breakdown of pcrfs (where the time goes) --------------------------

class TimedSink(LocalSink):
    """The store sink convert uses, its puts (write, fsync, rename) and its fsyncs timed
    through the sink's own ``fsync`` option: nothing patched."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=self._fsync)
        self.put_seconds = self.fsync_seconds = 0.0

    def _fsync(self, fd: int) -> None:
        a = time.perf_counter()
        os.fsync(fd)
        self.fsync_seconds += time.perf_counter() - a

    def put(self, name, data) -> None:
        a = time.perf_counter()
        super().put(name, data)
        self.put_seconds += time.perf_counter() - a


def stage_breakdown(src: Path, out: Path, limit: int, record_bytes: int = fmt.DEFAULT_RECORD_BYTES) -> dict:
    """One thread, no pool: time each stage of the path ``pcrfs.convert.convert`` runs, with
    its own functions and nothing patched: the listing and batch plan; per image
    ``transcode_source`` (what each pool thread runs: read, header check, lossless transform,
    scan split, CRC-32s); per batch ``StoreWriter.write_record`` (record assembly and its
    ``.partial`` description), whose put into the store goes through a ``LocalSink`` timed
    here, with the record's fsync timed through the sink's ``fsync`` option; ``finalize``
    (index, report, manifest). Read and transform are also timed apart on the same images
    (``transcode_source_parts``), outside the stages' total.
    """
    from pcrfs.convert.local import transcode_source
    from pcrfs.convert.plan import fingerprint, plan_batches, without_bad_names
    from pcrfs.jpeg.transcode import TranscodeOptions
    from pcrfs.store.write.writer import Problem, StoreWriter

    pc = time.perf_counter
    t = dict.fromkeys(("listing_and_plan", "transcode_source", "write_record_excl_put"), 0.0)
    a = pc()
    listing = without_bad_names(list_sources(src))
    files = listing.files[:limit] if limit else listing.files
    opts = TranscodeOptions()
    plan = plan_batches(files, record_bytes)
    fp = fingerprint(listing, opts, record_bytes)
    t["listing_and_plan"] = pc() - a
    (out / "breakdown-store").mkdir()
    sink = TimedSink(out / "breakdown-store")
    writer = StoreWriter(sink.root, sink)
    writer.start(fp, [(b.start, b.end) for b in plan])
    for batch in plan:
        entries, problems = [], []
        for sf in files[batch.start:batch.end]:
            a = pc()
            r = transcode_source(sf, opts)
            t["transcode_source"] += pc() - a
            (problems if isinstance(r, Problem) else entries).append(r)
        a = pc()
        writer.write_record(batch.record, entries, problems, (batch.start, batch.end))
        t["write_record_excl_put"] += pc() - a
    t["write_record_excl_put"] -= sink.put_seconds
    t["record_put_excl_fsync"] = sink.put_seconds - sink.fsync_seconds
    t["record_fsync"] = sink.fsync_seconds
    a = pc()
    writer.finalize({})
    t["finalize"] = pc() - a
    n, total = len(files), sum(t.values())
    return {
        "images": n,
        "records": len(plan),
        "note": "single thread, no pool; ms per image for each stage of the path pcrfs.convert runs "
                "(record_fsync = the records' fsyncs; the descriptions', index's and manifest's are in "
                "write_record_excl_put and finalize)",
        "ms_per_image": {k: round(v / n * 1000, 4) for k, v in t.items()},
        "share_of_total": {k: round(v / total, 4) for k, v in t.items()},
        "total_ms_per_image": round(total / n * 1000, 4),
        "transcode_source_parts": _read_and_transform(files),
    }


def _read_and_transform(files) -> dict:
    """ms per image of reading and of the bare lossless transform, timed apart on the same images:
    how much of ``transcode_source`` is the transform (the rest: header check, scan split, CRC-32s)."""
    pc = time.perf_counter
    read = transform = 0.0
    for sf in files:
        a = pc()
        with open(sf.abs, "rb") as f:
            data = f.read()
        b = pc()
        turbojpeg.to_progressive(data)
        transform += pc() - b
        read += b - a
    n = len(files) or 1
    return {"read_ms_per_image": round(read / n * 1000, 4), "transform_ms_per_image": round(transform / n * 1000, 4)}


# ---- verification --------------------------------------------------------------------

def verify(files, pcrfs_store: Path, ref_tmpdir: Path, bare_outs: list[bytes], sample: int,
           seed: int) -> dict:
    from pcrfs.store.read.reader import open_store
    n = len(files)
    jt_sizes = [os.path.getsize(ref_tmpdir / f"{i:08d}.jpg") for i in range(n)]
    jt_total = sum(jt_sizes)
    with open_store(pcrfs_store) as st:
        pcrfs_bytes = int(st.manifest["total_bytes"])
        pcrfs_images = st.num_images
        idx = list(range(n)) if sample <= 0 or sample >= n else sorted(random.Random(seed).sample(range(n), sample))
        mismatches = []
        for i in idx:
            rel = files[i][0]
            j = st.find(rel)
            stored = st.read(j, st.n_groups(j))
            jt = (ref_tmpdir / f"{i:08d}.jpg").read_bytes()
            if stored != jt:
                mismatches.append({"path": rel, "what": "pcrfs != jpegtran"})
            if bare_outs[i] != jt:
                mismatches.append({"path": rel, "what": "bare != jpegtran"})
    bare_total = sum(len(o) for o in bare_outs)
    return {
        "images": n,
        "pcrfs_images": pcrfs_images,
        "pcrfs_stored_bytes": pcrfs_bytes,
        "pcrfs_stored_plus_eoi": pcrfs_bytes + 2 * pcrfs_images,
        "jpegtran_output_bytes": jt_total,
        "bare_output_bytes": bare_total,
        "sizes_equal": pcrfs_bytes + 2 * pcrfs_images == jt_total == bare_total,
        "byte_identity_checked": len(idx),
        "byte_identity_mismatches": mismatches[:20],
        "byte_identical": not mismatches,
    }


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# ---- machine info --------------------------------------------------------------------

def _cmd(args: list[str]) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(jpegtran: str, tmp_root: Path) -> dict:
    """benchlib's machine facts (as every tool records them), plus what matters for conversion."""
    from benchlib.machine import machine_facts

    info = machine_facts(packages=("numpy", "pillow"))
    info.update({
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": info["cpu"],
        "jpegtran": _cmd([jpegtran, "-version"]).splitlines()[0] if jpegtran else None,
        "libturbojpeg": None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "tmp_filesystem": _cmd(["df", "-T", str(tmp_root)]).splitlines()[-1:] or None,
        "git_dirty": bool(_cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
    })
    try:
        lib = turbojpeg._library()
        info["libturbojpeg"] = getattr(lib, "_name", None)
    except Exception as e:  # noqa: BLE001
        info["libturbojpeg"] = f"unavailable: {e}"
    pkg = _cmd(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "libturbojpeg0", "libjpeg-turbo-progs"])
    if pkg:
        info["packages"] = pkg.splitlines()
    return info


# ---- plot ----------------------------------------------------------------------------

def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    labels = {"pcrfs": "pcrfs convert\n(end to end)",
              "reference": "PCR reference\n(jpegtran + helper\nprocess per image)",
              "bare": "bare tjTransform\n(in memory, floor)"}
    colors = {"pcrfs": "#2a7ab0", "reference": "#b0b0b0", "bare": "#6a6a6a"}
    m = result["methods"]
    ways = [k for k in m if k in METHODS or k == "pcrfs_source" or k.startswith("dask")]
    labels["pcrfs"] = f"pcrfs convert\n(end to end,\n--order {result.get('order_of_pcrfs', 'shuffled')})"
    labels["pcrfs_source"] = "pcrfs convert\n(end to end,\n--order source)"
    colors["pcrfs_source"] = "#5aa0d0"
    for k in ways:
        if k.startswith("dask"):
            labels[k] = f"pcrfs on Dask\n{k[4:]} worker\nprocess{'es' if k[4:] != '1' else ''}"
            colors[k] = "#7fb8de"
    fig, axes = plt.subplots(1, 3, figsize=(14 + 1.6 * (len(ways) - len(METHODS)), 4.6))
    for ax, key, unit in ((axes[0], "images_per_s", "images/s (higher is better)"),
                          (axes[1], "mb_per_s", "MB/s of source JPEG (higher is better)"),
                          (axes[2], "cpu_ms_per_image", "CPU ms per image, all processes (lower is better)")):
        xs = range(len(ways))
        vals = [m[k][key] for k in ways]
        bars = ax.bar(xs, vals, color=[colors[k] for k in ways], width=0.6)
        for x, k in zip(xs, ways):  # every round as a dot: the spread is the noise
            per = m[k]["per_round_" + key]
            ax.plot([x] * len(per), per, "k.", ms=4, alpha=0.6)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}", (b.get_x() + b.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(xs), [labels[k] for k in ways], fontsize=8 if len(ways) <= 3 else 7)
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(vals) * 1.18)
        ax.spines[["top", "right"]].set_visible(False)
    r = result["ratios"]
    d = result["dataset"]
    fig.suptitle(f"Converting {d['images']} ImageNet-size JPEGs ({d['bytes'] / 1e6:.0f} MB), "
                 f"{result['workers']} workers, median of {result['rounds']} rounds: "
                 f"pcrfs = {r['pcrfs_over_reference']:.2f}x reference, {r['pcrfs_over_bare']:.2f}x bare",
                 fontsize=10)
    busy = result.get("max_other_processes_cpu_share")
    fig.text(0.01, 0.01, f"{result['machine']['cpu_model']}, nproc={result['machine']['nproc']}, "
             f"{result['machine'].get('jpegtran') or ''}; dots = rounds"
             + ("" if busy is None else f"; other processes took up to {busy:.0%} of the CPUs during a run"),
             fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


# ---- main ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; ``dask_workers`` (a list) and ``dask_record_bytes`` parsed from their text."""
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000,
                   help="demo photos to build (rounded up to a multiple of the class count; default 2000)")
    p.add_argument("--src", type=Path, default=None,
                   help="photo tree to reuse; if missing or empty the demo set is built there and kept")
    p.add_argument("--workers", type=int, default=ncores, help=f"workers for all three ways (default {ncores})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="demo seed (default 0)")
    p.add_argument("--helper", choices=("auto", "c", "python"), default="auto",
                   help="reference scan-offset helper process (default: C if a compiler exists)")
    p.add_argument("--tmp", type=Path, default=None, help="where temporary outputs go (default: system temp)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_convert.json")
    p.add_argument("--plot", type=Path, default=REPO / "results" / "bench_convert.png")
    p.add_argument("--verify-sample", type=int, default=0,
                   help="images to compare byte for byte (0 = all, default)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the serial per-stage breakdown of pcrfs")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--dask-workers", default="1,2",
                   help="worker process counts of the Dask LocalCluster ways, comma-separated; '' for none "
                        "(default 1,2)")
    p.add_argument("--dask-record-size", default="8M",
                   help="record size of the Dask ways: one task per record batch (default 8M)")
    p.add_argument("--order", choices=(*fmt.ORDERS, "both"), default=fmt.ORDER_SHUFFLED,
                   help="storage order of the pcrfs and Dask ways (default shuffled, convert's default); "
                        "both: also a pcrfs_source way (--order source) beside pcrfs (shuffled), interleaved")
    args = p.parse_args(argv)
    from pcrfs.units import parse_size
    try:
        args.dask_workers = [int(x) for x in args.dask_workers.split(",") if x.strip()]
        args.dask_record_bytes = parse_size(args.dask_record_size)
    except ValueError as e:
        p.error(f"--dask-workers / --dask-record-size: {e}")
    if args.workers < 1 or args.rounds < 1 or args.images < 1:
        p.error("--workers, --rounds and --images must be >= 1")
    return args


class Bench:
    """One benchmark run: the options, the photo set, the ways and, round by round, their figures."""

    def __init__(self, args: argparse.Namespace, jpegtran: str, tmp_root: Path) -> None:
        self.args, self.jpegtran, self.tmp_root = args, jpegtran, tmp_root
        self.notes: list[str] = []
        self.machine = machine_info(jpegtran, tmp_root)
        self.src, src_info = prepare_source(args, tmp_root)
        self.files = jpeg_files(self.src)
        if not self.files:
            raise SystemExit(f"no files under {self.src}")
        self.dataset = {**src_info, **describe_dataset(self.files)}
        self.helper, self.helper_desc = build_helper(args.helper, tmp_root)
        self.dask_ways = [f"dask{k}" for k in args.dask_workers]
        if self.dask_ways:
            try:
                import distributed  # noqa: F401
            except ImportError as e:
                self.notes.append(f"Dask ways skipped: {e} (pip install 'pcrfs[dask]')")
                print(self.notes[-1])
                self.dask_ways = []
        self.order = fmt.ORDER_SHUFFLED if args.order == "both" else args.order
        self.extra_ways = ["pcrfs_source"] if args.order == "both" else []
        self.ways = list(METHODS) + self.extra_ways + self.dask_ways
        self.datas: list[bytes] | None = None
        self.times: dict[str, list[float]] = {m: [] for m in self.ways}
        self.cpu: dict[str, list[float]] = {m: [] for m in self.ways}
        self.foreign: dict[str, list[float | None]] = {m: [] for m in self.ways}  # other processes' CPU share
        self.startup: dict[str, list[float]] = {m: [] for m in self.dask_ways}
        self.last: dict[str, dict] = {}

    def warm_up(self) -> None:
        """Outside the clock: sources in the page cache, the bare set in memory, jpegtran and
        the helper run once, libturbojpeg loaded."""
        self.datas = []
        for _, a in self.files:
            with open(a, "rb") as f:
                self.datas.append(f.read())
        warm = self.tmp_root / "warm.jpg"
        subprocess.run([self.jpegtran, *JPEGTRAN_ARGS, "-outfile", str(warm), self.files[0][1]], check=True)
        subprocess.run([*self.helper, str(warm)], check=True, stdout=subprocess.DEVNULL)
        turbojpeg.to_progressive(self.datas[0])

    def run_way(self, m: str, out: Path) -> dict:
        a = self.args
        if m == "pcrfs":
            return run_pcrfs(self.src, out, a.workers, self.order)
        if m == "pcrfs_source":
            return run_pcrfs(self.src, out, a.workers, fmt.ORDER_SOURCE)
        if m == "reference":
            return run_reference(self.src, out, a.workers, self.helper, self.jpegtran, fmt.DEFAULT_RECORD_BYTES)
        if m == "bare":
            return run_bare(self.datas, a.workers)
        return run_dask(self.src, out, int(m[4:]), a.dask_record_bytes, self.order)

    def run_rounds(self) -> None:
        for rnd in range(self.args.rounds):
            order = self.ways[rnd % len(self.ways):] + self.ways[:rnd % len(self.ways)]  # rotate who goes first
            if self.extra_ways:  # the two orders back to back, alternating which goes first
                pair = ["pcrfs", "pcrfs_source"] if rnd % 2 == 0 else ["pcrfs_source", "pcrfs"]
                order = pair + [m for m in order if m not in pair]
            for m in order:
                self.run_once(m, rnd)

    def run_once(self, m: str, rnd: int) -> None:
        out = self.tmp_root / f"out-{m}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir()
        self.last.pop(m, None)
        os.sync()  # the previous way's dirty pages are not this way's bill
        b0, c0 = machine_busy_seconds(), os.times()
        r = self.run_way(m, out)
        if r["images"] != len(self.files):
            raise RuntimeError(f"{m} converted {r['images']} of {len(self.files)} images")
        c1, b1 = os.times(), machine_busy_seconds()
        self.times[m].append(r["seconds"])
        if "cpu_seconds" in r:  # Dask: measured around the conversion only, workers included
            self.cpu[m].append(r["cpu_seconds"])
            self.startup[m].append(r["startup_seconds"])
            b0, b1 = (None, None) if r["busy_seconds"] is None else (0.0, r["busy_seconds"])
        else:
            self.cpu[m].append(sum(c1[:4]) - sum(c0[:4]))  # user+sys, this process and reaped children
        # other processes' share of the machine while this way ran: the noise
        self.foreign[m].append(None if b0 is None else
                               max(0.0, (b1 - b0) - self.cpu[m][-1]) / (r["seconds"] * (self.machine["nproc"] or 1)))
        self.last[m] = r
        busy = "" if self.foreign[m][-1] is None else f"  (other processes: {self.foreign[m][-1]:4.0%} of the CPUs)"
        extra = f"  (+{r['startup_seconds']:.2f} s cluster startup)" if "startup_seconds" in r else ""
        print(f"  round {rnd + 1}/{self.args.rounds}  {m:<9} {r['seconds']:7.2f} s  "
              f"{len(self.files) / r['seconds']:8.1f} img/s{busy}{extra}", flush=True)

    def descriptions(self) -> dict[str, str]:
        a = self.args
        desc = {
            "pcrfs": f"pcrfs.convert.convert(src, store, workers={a.workers}, order={self.order!r}): listing, "
                     "read, header, tjTransform (ctypes), scan split, CRC-32, group-major records (fsync), index, "
                     "manifest",
            "pcrfs_source": f"pcrfs.convert.convert(src, store, workers={a.workers}, order='source'): the same, "
                            "the storage order the path order (a version-1 store)",
            "reference": f"ThreadPool({a.workers}); per image: `jpegtran {' '.join(JPEGTRAN_ARGS)} -outfile tmp` "
                         f"subprocess + scan-offset helper subprocess ({self.helper_desc}); read back, split, "
                         "group-major records + JSON index written in Python (no fsync)",
            "bare": f"multiprocessing.pool.ThreadPool({a.workers}).map(pcrfs.jpeg.turbojpeg.to_progressive) "
                    "over bytes preloaded in memory; nothing read, split or written",
        }
        for m in self.dask_ways:
            desc[m] = (f"pcrfs.convert.convert(src, store, record_bytes={a.dask_record_bytes}, order={self.order!r}, "
                       f"client=Client("
                       f"LocalCluster(n_workers={m[4:]}, threads_per_worker=1, processes=True))): one Dask task "
                       "per record batch (read, transcode, split, CRC-32, write the record, fsync); the client "
                       "writes descriptions, index and manifest. Cluster startup not included (see "
                       "cluster_startup_seconds_per_round); CPU = client + worker processes")
        return desc

    def methods(self) -> dict[str, dict]:
        n, mb = len(self.files), self.dataset["bytes"] / 1e6
        desc, methods = self.descriptions(), {}
        for m in self.ways:
            times, cpu = self.times[m], self.cpu[m]
            med = statistics.median(times)
            methods[m] = {
                "description": desc[m],
                "seconds_per_round": [round(x, 4) for x in times],
                "median_seconds": round(med, 4),
                "images_per_s": round(n / med, 2),
                "mb_per_s": round(mb / med, 3),
                "best_seconds": round(min(times), 4),
                "best_images_per_s": round(n / min(times), 2),
                "per_round_images_per_s": [round(n / x, 2) for x in times],
                "per_round_mb_per_s": [round(mb / x, 3) for x in times],
                "cpu_seconds_per_round": [round(x, 3) for x in cpu],
                "cpu_ms_per_image": round(statistics.median(cpu) / n * 1000, 4),
                "per_round_cpu_ms_per_image": [round(x / n * 1000, 4) for x in cpu],
                "other_processes_cpu_share_per_round": [None if x is None else round(x, 3) for x in self.foreign[m]],
                "bytes_out": self.last[m]["bytes_out"],
            }
            if m in self.dask_ways:
                methods[m].update({
                    "workers": int(m[4:]), "record_bytes": self.args.dask_record_bytes,
                    "records": self.last[m]["records"],
                    "cluster_startup_seconds_per_round": [round(x, 3) for x in self.startup[m]],
                    "speedup_over_pcrfs_local": round(methods[m]["images_per_s"] / methods["pcrfs"]["images_per_s"], 3),
                })
        return methods

    def ratios(self, methods: dict[str, dict]) -> dict:
        ips = {m: methods[m]["images_per_s"] for m in METHODS}
        orders = {}
        if "pcrfs_source" in methods:  # shuffled over source, per round (side by side) and of medians
            per_round = [s / t for t, s in zip(self.times["pcrfs"], self.times["pcrfs_source"])]
            orders = {
                "shuffled_over_source": round(ips["pcrfs"] / methods["pcrfs_source"]["images_per_s"], 3),
                "shuffled_over_source_per_round": [round(x, 3) for x in per_round],
                "shuffled_over_source_median_of_rounds": round(statistics.median(per_round), 3),
                "best_shuffled_over_source": round(min(self.times["pcrfs_source"]) / min(self.times["pcrfs"]), 3),
                "cpu_per_image_source_over_shuffled": round(methods["pcrfs_source"]["cpu_ms_per_image"]
                                                            / methods["pcrfs"]["cpu_ms_per_image"], 3),
                "source_over_bare": round(methods["pcrfs_source"]["images_per_s"] / ips["bare"], 3),
            }
            quiet = [x for x, a, b in zip(per_round, self.foreign["pcrfs"], self.foreign["pcrfs_source"])
                     if a is not None and b is not None and max(a, b) < QUIET_SHARE]
            orders["shuffled_over_source_quiet_rounds"] = [round(x, 3) for x in quiet]
            orders["shuffled_over_source_quiet_median"] = round(statistics.median(quiet), 3) if quiet else None
        return {**orders,
            "pcrfs_over_reference": round(ips["pcrfs"] / ips["reference"], 3),
            "pcrfs_over_bare": round(ips["pcrfs"] / ips["bare"], 3),
            "reference_over_bare": round(ips["reference"] / ips["bare"], 3),
            "cpu_per_image_bare_over_pcrfs": round(methods["bare"]["cpu_ms_per_image"]
                                                   / methods["pcrfs"]["cpu_ms_per_image"], 3),
            "best_pcrfs_over_reference": round(min(self.times["reference"]) / min(self.times["pcrfs"]), 3),
            "best_pcrfs_over_bare": round(min(self.times["bare"]) / min(self.times["pcrfs"]), 3),
            "note": "ratios of median throughputs (higher = pcrfs faster); best_* use each way's fastest "
                    "round (the least disturbed one on a shared machine); cpu_per_image_bare_over_pcrfs is "
                    "bare CPU ms/image over pcrfs CPU ms/image (load-insensitive efficiency)",
        }

    def check_outputs(self) -> dict:
        print("verifying outputs ...", flush=True)
        last = self.last
        check = verify(self.files, last["pcrfs"]["store"], last["reference"]["tmpdir"], last["bare"]["outs"],
                       self.args.verify_sample, self.args.seed)
        check["dask_index_equals_local"] = {m: check_dask_store(last["pcrfs"]["store"], last[m]["store"])
                                            for m in self.dask_ways}
        if "pcrfs_source" in last:  # the same images, names, group lengths and CRCs in either order
            check["source_order_index_equals_shuffled"] = check_dask_store(last["pcrfs"]["store"],
                                                                           last["pcrfs_source"]["store"])
            from pcrfs.store.read.reader import open_store
            with open_store(last["pcrfs"]["store"]) as a, open_store(last["pcrfs_source"]["store"]) as b:
                check["format_versions"] = {"pcrfs": a.manifest["format_version"],
                                            "pcrfs_source": b.manifest["format_version"]}
        last["bare"]["outs"] = None
        self.datas = None
        return check

    def result(self, methods: dict, ratios: dict, check: dict, breakdown: dict | None) -> dict:
        targets = {
            "pcrfs_over_reference_min": TARGET_VS_REFERENCE,
            "pcrfs_over_bare_min": TARGET_VS_BARE,
            "vs_reference_met": ratios["pcrfs_over_reference"] >= TARGET_VS_REFERENCE,
            "vs_bare_met": ratios["pcrfs_over_bare"] >= TARGET_VS_BARE,
            "output_size_equal_met": check["sizes_equal"] and check["byte_identical"]
                                     and all(check["dask_index_equals_local"].values()),
        }
        if "shuffled_over_source" in ratios:
            targets.update({
                "shuffled_over_source_min": TARGET_SHUFFLED_VS_SOURCE,
                "shuffled_over_source_met": ratios["shuffled_over_source"] >= TARGET_SHUFFLED_VS_SOURCE,
                "shuffled_over_source_median_of_rounds_met":
                    ratios["shuffled_over_source_median_of_rounds"] >= TARGET_SHUFFLED_VS_SOURCE,
                "source_order_store_same_images_met": check["source_order_index_equals_shuffled"],
            })
        self.machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        result = {
            "benchmark": "pcrfs convert vs PCR reference conversion vs bare libjpeg-turbo transform",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "workers": self.args.workers,
            "order": self.args.order,
            "order_of_pcrfs": self.order,
            "rounds": self.args.rounds,
            "interleaving": "each round runs every way, the starting way rotating; medians over rounds",
            "reference_helper": self.helper_desc,
            "machine": self.machine,
            "dataset": self.dataset,
            "methods": methods,
            "ratios": ratios,
            "targets": targets,
            "output_check": check,
            "pcrfs_stage_breakdown": breakdown,
            "notes": self.notes,
        }
        shares = [x for m in self.ways for x in self.foreign[m] if x is not None]
        if shares and max(shares) > 0.10:
            self.notes.append(f"the machine was shared: other processes took up to {max(shares):.0%} of the CPUs "
                              "during a timed run; wall-clock ratios are unreliable then (a way that spawns "
                              "processes wins more of a contended CPU), compare cpu_ms_per_image instead")
            print("WARNING: " + self.notes[-1])
        result["max_other_processes_cpu_share"] = round(max(shares), 3) if shares else None
        d = self.dataset
        if d["images"] and d["bytes"] / d["images"] < 80_000:
            self.notes.append(f"mean source JPEG is {d['mean_kb']} KB (ImageNet's is ~110 KB): fixed "
                              "per-image costs (process spawns, Python bookkeeping) weigh more than on ImageNet")
        return result


def print_summary(result: dict, dask_ways: list[str]) -> None:
    methods, ratios, targets, check = result["methods"], result["ratios"], result["targets"], result["output_check"]
    print()
    print(f"{'way':<10} {'median s':>9} {'img/s':>9} {'MB/s':>8} {'CPU ms/img':>11}")
    for m, r in methods.items():
        startup_note = (f"   (+{statistics.median(r['cluster_startup_seconds_per_round']):.2f} s cluster startup, "
                        f"{r['records']} tasks)" if m in dask_ways else "")
        print(f"{m:<10} {r['median_seconds']:9.2f} {r['images_per_s']:9.1f} {r['mb_per_s']:8.2f} "
              f"{r['cpu_ms_per_image']:11.3f}{startup_note}")
    print(f"pcrfs / reference = {ratios['pcrfs_over_reference']:.2f}x (target >= {TARGET_VS_REFERENCE}: "
          f"{'met' if targets['vs_reference_met'] else 'MISSED'})")
    print(f"pcrfs / bare      = {ratios['pcrfs_over_bare']:.2f}x (target >= {TARGET_VS_BARE}: "
          f"{'met' if targets['vs_bare_met'] else 'MISSED'})")
    if "shuffled_over_source" in ratios:
        print(f"shuffled / source = {ratios['shuffled_over_source']:.2f}x of medians, "
              f"{ratios['shuffled_over_source_median_of_rounds']:.2f}x median of rounds "
              f"{ratios['shuffled_over_source_per_round']} (target >= {TARGET_SHUFFLED_VS_SOURCE}: "
              f"{'met' if targets['shuffled_over_source_met'] else 'MISSED'}); CPU per image source/shuffled "
              f"{ratios['cpu_per_image_source_over_shuffled']:.2f}; quiet rounds (others < {QUIET_SHARE:.0%}) "
              f"{ratios['shuffled_over_source_quiet_rounds']}")
    print(f"best rounds: pcrfs/reference {ratios['best_pcrfs_over_reference']:.2f}x, pcrfs/bare "
          f"{ratios['best_pcrfs_over_bare']:.2f}x; CPU per image bare/pcrfs "
          f"{ratios['cpu_per_image_bare_over_pcrfs']:.2f}")
    print(f"output: pcrfs {check['pcrfs_stored_bytes']} B + 2*{check['pcrfs_images']} EOI = "
          f"{check['pcrfs_stored_plus_eoi']} B; jpegtran {check['jpegtran_output_bytes']} B; "
          f"bare {check['bare_output_bytes']} B -> {'equal' if check['sizes_equal'] else 'DIFFERENT'}; "
          f"byte-identical on {check['byte_identity_checked']} images: {check['byte_identical']}")
    breakdown = result["pcrfs_stage_breakdown"]
    if breakdown:
        print("pcrfs serial stage breakdown (ms/image): " +
              ", ".join(f"{k}={v:.3f}" for k, v in breakdown["ms_per_image"].items())
              + "; transcode_source parts timed apart: " + ", ".join(
                  f"{k}={v:.3f}" for k, v in breakdown["transcode_source_parts"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jpegtran = shutil.which("jpegtran")
    if not jpegtran:
        raise SystemExit("jpegtran not found (Debian/Ubuntu: apt-get install libjpeg-turbo-progs)")
    if not turbojpeg.available():
        raise SystemExit("libturbojpeg not found (Debian/Ubuntu: apt-get install libturbojpeg0)")
    tmp_root = Path(tempfile.mkdtemp(prefix="pcrfs-bench-", dir=args.tmp))
    try:
        bench = Bench(args, jpegtran, tmp_root)
        print(f"{bench.dataset['images']} images, {bench.dataset['bytes'] / 1e6:.1f} MB; workers={args.workers}; "
              f"rounds={args.rounds}; tmp={tmp_root}", flush=True)
        bench.warm_up()
        bench.run_rounds()
        methods = bench.methods()
        ratios = bench.ratios(methods)
        check = bench.check_outputs()
        breakdown = None
        if not args.no_breakdown:
            print("serial stage breakdown of pcrfs ...", flush=True)
            os.sync()
            breakdown = stage_breakdown(bench.src, tmp_root, 0)
        result = bench.result(methods, ratios, check, breakdown)
        plot_note = plot(result, args.plot)
        if plot_note:
            bench.notes.append(plot_note)
            print(plot_note)
        else:
            result["plot"] = str(args.plot)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print_summary(result, bench.dask_ways)
        print(f"wrote {args.out}" + ("" if plot_note else f" and {args.plot}"))
        return 0
    finally:
        if args.keep:
            print(f"kept {tmp_root}")
        else:
            shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
