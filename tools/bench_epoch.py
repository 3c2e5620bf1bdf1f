#!/usr/bin/env python3
"""One training epoch per fidelity view, I/O-bound (a store behind a slow link) and CPU-bound.

The paper's headline, reproduced: when reading is the bottleneck, an epoch over
``scanK`` should take about ``bytes(scanK) / bytes(full)`` of the full view's time.

What runs (torchvision ``ImageFolder`` + ``DataLoader``, ``--workers`` workers,
batch ``--batch``, ``RandomResizedCrop(224)`` + flip + ``ToTensor``: decode and
resize as in a normal training pipeline):

* **I/O-bound**: the store in S3 (moto's server mode on 127.0.0.1), mounted
  with ``pcrfs mount s3://... --bwlimit RATE``; views ``scan1 scan2 scan5 full``,
  each ``shuffle=False`` (sequential: readahead applies) and ``shuffle=True``,
  each on a fresh mount (nothing cached). ``RATE`` defaults to the full view's
  bytes over ``--io-factor`` times the CPU-bound full epoch, so the full view is
  clearly I/O-bound. Bytes fetched and requests per image come from the mount's
  stats counters.
* **CPU-bound**: the same views of the store on local disk (record files in the
  page cache, fresh mount per epoch), and the original baseline JPEG tree.

Targets (issue 6): epoch time full / scanK >= 0.8 x bytes(full) / bytes(scanK)
for k = 1, 2, 5 when I/O-bound; sequential epochs <= 1.2 store requests per image.

    python tools/bench_epoch.py --repeat 3            # ~15 minutes on 2 cores
    python tools/bench_epoch.py --per-class 50 --io-factor 6   # quicker, noisier

Writes ``results/bench_epoch.json`` and ``results/bench_epoch.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.data import demo_store  # noqa: E402
from benchlib.mounts import CLEANUP, PcrfsMount, is_mounted, unmount_any  # noqa: E402
from benchlib.plots import pyplot, save  # noqa: E402
from benchlib.proc import Meter  # noqa: E402
from benchlib.reads import warm  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

from pcrfs.remote.fs import RemoteOptions, filesystem  # noqa: E402
from pcrfs.store.read.reader import ReadOptions, open_store  # noqa: E402
from pcrfs.store.read.verify import cumulative_fractions  # noqa: E402
from s3util import S3_ENV, MotoServer  # noqa: E402  (tests/s3util.py: moto on loopback)

VIEWS = ["scan1", "scan2", "scan5", "full"]
BUCKET = "pcrfs-bench"


# ---- one epoch -----------------------------------------------------------------------------

def run_epoch(root: Path, shuffle: bool, workers: int, batch: int, seed: int = 0) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    t0 = time.perf_counter()
    ds = datasets.ImageFolder(str(root), tf)
    listed = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    return {"seconds": round(time.perf_counter() - t0, 3), "images": n, "list_seconds": round(listed, 3)}


def mounted_epoch(store: str, mnt: Path, view: str, shuffle: bool, args, read_options: ReadOptions,
                  log_file: Path) -> dict:
    """``--repeat`` times: a fresh mount, one epoch over ``view``, the mount's counters,
    unmount; the median epoch time (and the counters of that run)."""
    runs = [_mounted_epoch(store, mnt, view, shuffle, args, read_options, log_file) for _ in range(args.repeat)]
    runs.sort(key=lambda r: r["seconds"])
    out = dict(runs[len(runs) // 2])
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def _mounted_epoch(store: str, mnt: Path, view: str, shuffle: bool, args, read_options: ReadOptions,
                   log_file: Path) -> dict:
    with PcrfsMount(store, mnt, log_file, read_options=read_options) as m:
        with Meter(m.pid) as meter:
            out = run_epoch(mnt / view, shuffle, args.workers, args.batch)
        stats = m.stats()
    reads = stats["store_reads"]
    out.update(view=view, shuffle=shuffle, store_requests=reads["requests"], store_bytes=reads["bytes"],
               requests_per_image=round(reads["requests"] / max(out["images"], 1), 3),
               daemon_cpu_us_per_image=round(meter.per_item(out["images"])["daemon_us_per_item"], 1),
               eio=stats.get("errors", {}).get("eio", 0))
    return out


# ---- setup ---------------------------------------------------------------------------------

def prepare(work: Path, per_class: int, record_size: int) -> tuple[Path, Path]:
    return demo_store(work, per_class, record_bytes=record_size)


def upload(store: Path, url: str, remote: RemoteOptions) -> None:
    fs = filesystem(url, remote)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    base = url[len("s3://"):]
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != "pcr.yaml")
    for p in files + [store / "pcr.yaml"]:  # the manifest last, as convert does
        fs.put_file(str(p), f"{base}/{p.relative_to(store)}")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ---- the plot ------------------------------------------------------------------------------

def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    io = doc["io_bound"]
    cpu = doc["cpu_bound"]
    x = range(len(VIEWS))
    w = 0.2
    seq = [next(r["seconds"] for r in io if r["view"] == v and not r["shuffle"]) for v in VIEWS]
    shf = [next(r["seconds"] for r in io if r["view"] == v and r["shuffle"]) for v in VIEWS]
    loc = [next(r["seconds"] for r in cpu if r["view"] == v) for v in VIEWS]
    ax1.bar([i - 1.5 * w for i in x], seq, w, label=f"S3 + bwlimit {doc['bwlimit_mib_s']:.2f} MiB/s, sequential")
    ax1.bar([i - 0.5 * w for i in x], shf, w, label="S3 + bwlimit, shuffled")
    ax1.bar([i + 0.5 * w for i in x], loc, w, label="local store, page cache (CPU-bound)")
    base = doc["baseline_tree"]["seconds"]
    ax1.axhline(base, color="k", ls="--", lw=1, label=f"baseline JPEG tree, local ({base:.1f}s)")
    ax1.set_xticks(list(x), VIEWS)
    ax1.set_ylabel("epoch time (s)")
    ax1.set_title(f"one epoch, {doc['images']} images, DataLoader x{doc['workers']} workers")
    ax1.legend(fontsize=8)

    ks = [v for v in VIEWS if v != "full"]
    promised = [doc["speedup"][v]["bytes_ratio"] for v in ks]
    got_seq = [doc["speedup"][v]["sequential"] for v in ks]
    got_shf = [doc["speedup"][v]["shuffled"] for v in ks]
    xi = range(len(ks))
    ax2.bar([i - w for i in xi], promised, w, label="bytes(full) / bytes(scanK)", color="#bbbbbb")
    ax2.bar(list(xi), got_seq, w, label="epoch full / scanK, sequential")
    ax2.bar([i + w for i in xi], got_shf, w, label="epoch full / scanK, shuffled")
    ax2.scatter([i for i in xi], [0.8 * p for p in promised], marker="_", s=400, color="r", zorder=3,
                label="target: 0.8 x bytes ratio")
    ax2.set_xticks(list(xi), ks)
    ax2.set_ylabel("speedup over full")
    ax2.set_title("I/O-bound speedup vs what the bytes promise")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=110)


# ---- main ----------------------------------------------------------------------------------

def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-epoch")
    p.add_argument("--per-class", type=int, default=100, help="demo images per class (8 classes)")
    p.add_argument("--record-size", type=int, default=4 << 20,
                   help="record size of the store (moto copies a whole object per ranged GET, so "
                        "records much larger than this only slow the emulated server down)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bwlimit", type=float, default=None, help="MiB/s; default: from --io-factor")
    p.add_argument("--io-factor", type=float, default=15.0,
                   help="the full view's transfer time at --bwlimit over its CPU-bound epoch time")
    p.add_argument("--repeat", type=int, default=1,
                   help="epochs per configuration (fresh mount each); the median is reported")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_epoch.json")
    return p, p.parse_args()


def view_sizes(store: Path) -> tuple[int, dict[str, int]]:
    """(images, bytes of every view scan1..scanN and full) of the local store."""
    s = open_store(store)
    n_images = s.num_images
    view_k = {f"scan{k}": k for k in range(1, s.num_groups + 1)}
    view_k["full"] = s.num_groups
    fractions = {f"scan{f['k']}": f for f in cumulative_fractions(s)}
    view_bytes = {v: fractions[f"scan{k}"]["bytes"] for v, k in view_k.items()}
    s.close()
    return n_images, view_bytes


def cpu_bound(src: Path, store: Path, mnt: Path, logs: Path, args) -> tuple[dict, dict, list[dict]]:
    """The baseline JPEG tree (sequential, shuffled) and every view of the local store, its
    records in the page cache: (baseline, baseline shuffled, one row per view)."""
    log("CPU-bound: baseline JPEG tree")
    run_epoch(src, False, args.workers, args.batch)  # warm the page cache and the code
    baseline = run_epoch(src, False, args.workers, args.batch)
    baseline_shuffled = run_epoch(src, True, args.workers, args.batch)
    log(f"  baseline {baseline['seconds']}s, shuffled {baseline_shuffled['seconds']}s")
    warm(store / "records")
    cpu = []
    for view in VIEWS:
        r = mounted_epoch(str(store), mnt, view, False, args, ReadOptions(), logs / "local.log")
        cpu.append(r)
        log(f"  local {view}: {r['seconds']}s")
    return baseline, baseline_shuffled, cpu


def io_bound(store: Path, work: Path, mnt: Path, logs: Path, args, rate: int) -> list[dict]:
    """Every view, sequential and shuffled, from the store in moto's S3 behind ``rate`` bytes/s."""
    saved_env = {k: os.environ.get(k) for k in list(S3_ENV) + ["XDG_CACHE_HOME"]}
    os.environ.update(S3_ENV)
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    server = MotoServer(work / "moto.log")
    io = []
    try:
        remote = RemoteOptions(endpoint_url=server.endpoint)
        url = f"s3://{BUCKET}/store.pcr"
        log(f"uploading the store to moto at {server.endpoint}")
        upload(store, url, remote)
        opts = ReadOptions(remote=remote, bwlimit=rate)
        for view in ["full", "scan5", "scan2", "scan1"]:
            for shuffle in (False, True):
                r = mounted_epoch(url, mnt, view, shuffle, args, opts, logs / "s3.log")
                io.append(r)
                log(f"  S3 {view} {'shuffled' if shuffle else 'sequential'}: {r['seconds']}s, "
                    f"{r['store_bytes'] / 2**20:.1f} MiB, {r['requests_per_image']} req/img")
    finally:
        CLEANUP.all()
        if is_mounted(mnt):
            unmount_any(mnt)
        server.stop()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return io


def speedups(io: list[dict], view_bytes: dict[str, int]) -> dict:
    """Per view below full: the I/O-bound epoch's speedup over full against its bytes ratio."""
    def t(view: str, shuffle: bool) -> float:
        return next(r["seconds"] for r in io if r["view"] == view and r["shuffle"] == shuffle)

    speedup = {}
    for view in VIEWS[:-1]:
        ratio = view_bytes["full"] / view_bytes[view]
        seq, shf = t("full", False) / t(view, False), t("full", True) / t(view, True)
        speedup[view] = {"bytes_ratio": round(ratio, 2), "sequential": round(seq, 2), "shuffled": round(shf, 2),
                         "target": round(0.8 * ratio, 2), "met_sequential": seq >= 0.8 * ratio,
                         "met_shuffled": shf >= 0.8 * ratio}
    return speedup


def result_doc(run: Run, args, *, n_images: int, view_bytes: dict[str, int], src: Path, rate_mib: float,
               rate: int, baseline: dict, baseline_shuffled: dict, cpu: list[dict], io: list[dict]) -> dict:
    speedup = speedups(io, view_bytes)
    seq_rpi = {r["view"]: r["requests_per_image"] for r in io if not r["shuffle"]}
    waste = {f"{r['view']}{'-shuffled' if r['shuffle'] else ''}": round(r["store_bytes"] / view_bytes[r["view"]], 3)
             for r in io}
    return run.doc(**{
        "benchmark": "bench_epoch",
        "date": run.started.isoformat(timespec="seconds"),
        "images": n_images, "workers": args.workers, "batch": args.batch, "record_size": args.record_size,
        "repeat": args.repeat,
        "transform": "RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor",
        "bwlimit_mib_s": rate_mib, "io_factor": args.io_factor if not args.bwlimit else None,
        "view_bytes": view_bytes, "baseline_tree_bytes": tree_bytes(src),
        "baseline_tree": baseline, "baseline_tree_shuffled": baseline_shuffled,
        "baseline_tree_at_bwlimit_estimate_s": round(tree_bytes(src) / rate, 1),
        "cpu_bound": cpu, "io_bound": io, "speedup": speedup,
        "sequential_requests_per_image": seq_rpi,
        "fetched_over_needed": waste,
        "targets": {
            "speedup_k1_k2_k5": all(v["met_sequential"] and v["met_shuffled"] for v in speedup.values()),
            "speedup_sequential_only": all(v["met_sequential"] for v in speedup.values()),
            "sequential_requests_per_image_le_1.2": all(v <= 1.2 for v in seq_rpi.values()),
        },
    })


def main() -> int:
    p, args = parse_args()
    run = Run("tools/bench_epoch.py", packages=("torch", "torchvision"))

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, store = prepare(work, args.per_class, args.record_size)
    n_images, view_bytes = view_sizes(store)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    if is_mounted(mnt):
        p.error(f"{mnt} is mounted; unmount it first")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    # ---- CPU-bound: baseline tree and the local store in the page cache
    baseline, baseline_shuffled, cpu = cpu_bound(src, store, mnt, logs, args)
    cpu_full = next(r["seconds"] for r in cpu if r["view"] == "full")

    # ---- I/O-bound: the store in S3 behind --bwlimit
    rate_mib = args.bwlimit or view_bytes["full"] / (args.io_factor * cpu_full) / (1 << 20)
    rate_mib = round(rate_mib, 2)
    rate = int(rate_mib * (1 << 20))
    io = io_bound(store, work, mnt, logs, args, rate)

    doc = result_doc(run, args, n_images=n_images, view_bytes=view_bytes, src=src, rate_mib=rate_mib, rate=rate,
                     baseline=baseline, baseline_shuffled=baseline_shuffled, cpu=cpu, io=io)
    write_json(args.out, doc)
    plot(doc, args.out.with_suffix(".png"))
    print(json.dumps({"speedup": doc["speedup"], "sequential_requests_per_image": doc["sequential_requests_per_image"],
                      "targets": doc["targets"], "bwlimit_mib_s": rate_mib, "baseline_s": baseline["seconds"],
                      "cpu_bound_s": {r["view"]: r["seconds"] for r in cpu}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
