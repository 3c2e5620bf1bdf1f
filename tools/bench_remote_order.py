#!/usr/bin/env python3
"""Storage order over a slow link (issue 24): path-order epochs and one-class copies from
a remote store written ``--order source`` and ``--order shuffled``, side by side.

The setting is tools/bench_remote_epoch.py's: s3rver 3.7.1 (npm, installed into
``--npm-cache`` on first use) behind a user-space link proxy on 127.0.0.1 that adds
``--latency`` per request, shares ``--rate`` bytes/s among all responses and counts
requests, GETs and bytes. Photos: ``--per-class`` x 8 classes of ImageNet-size demo
photos (``pcrfs.demo``); with ``--classes N`` the same photos are dealt into N class
directories (hard links), so that a class is 1/N of the dataset -- the ratio that decides
what a one-class copy from a shuffled store costs (each record holds ~images/N of a
class; ImageNet: 1/1,000). Both orders of the same photos are converted into records of
``--record-size`` (same seed) and uploaded.

Per order, each on a fresh mount of ``s3://.../STORE`` through the proxy:

* ``epoch``: ``torchvision.datasets.ImageFolder(MNT/VIEW)`` + ``DataLoader(shuffle=False,
  num_workers=--workers)`` -- the path order, a validation pass -- epochs 1 and 2, per
  cache setting (``--caches``: ``default`` = the mount's defaults, memory cache only;
  ``disk`` = ``--disk-cache`` on a fresh directory; ``small`` = ``--cache-size 16M
  --readahead 4M``, no disk cache: a view larger than the caches, as ImageNet's 60 GB
  ``scan5`` is larger than the default 256M). Targets (issue 24, shuffled store):
  epoch 1 <= 0.05 GET per image and <= 1.3x the view's link time (``view bytes / rate``;
  also given against ``1.3 x link + epoch 2``, the convention of bench_remote_epoch,
  epoch 2 being the same pass with no link);
* ``copy``: ``cp -r MNT/VIEW/CLASS DEST`` of ``--copy-classes`` classes, each on a fresh
  mount, per cache setting: bytes over the link during the copy against the bytes
  copied (the class's files as the view serves them); target <= 2x. The index's bytes,
  fetched when the mount starts, are given apart (``mount_link``).

Orders alternate (``--repeats`` rounds, the starting order alternating). Requests, bytes
and link time come from the proxy; the daemon's CPU from /proc; the mount's own counters
(record prefixes fetched, reads served image by image while the epoch gate was shut) from its stats.

    python tools/bench_remote_order.py                                  # ~10 min on 2 cores
    python tools/bench_remote_order.py --classes 100 --out results/bench_remote_order_100c.json

Writes ``results/bench_remote_epoch_order.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.mounts import CLEANUP, PcrfsMount  # noqa: E402
from benchlib.proc import cpu_split_s, loadavg  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, LinkProxy, S3rver, store_files, upload  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402
from bench_remote_epoch import bytes_size, collate_sizes, drain, read_bytes, transform  # noqa: E402

ORDERS = ("source", "shuffled")
GETS_PER_IMAGE = 0.05
LINK_FACTOR = 1.3
COPY_FACTOR = 2.0


# ---- data -------------------------------------------------------------------------------------------

def photos(work: Path, per_class: int, classes: int) -> Path:
    """The demo photos, dealt into ``classes`` class directories (hard links) unless 8."""
    from pcrfs.demo import make_demo

    src = work / f"photos-{per_class}"
    if not (src.is_dir() and any(src.iterdir())):
        log(f"writing the demo photos ({per_class} per class) to {src}")
        make_demo(src, per_class=per_class, seed=0)
    if classes <= 0 or classes == len([p for p in src.iterdir() if p.is_dir()]):
        return src
    dealt = work / f"photos-{per_class}-{classes}c"
    if not dealt.is_dir():
        tmp = work / f"{dealt.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        files = sorted(p for p in src.rglob("*") if p.is_file())
        for j, f in enumerate(files):
            d = tmp / f"c{j % classes:04d}"
            d.mkdir(parents=True, exist_ok=True)
            os.link(f, d / f"{f.parent.name}_{f.name}")
        tmp.rename(dealt)
    return dealt


def stores(work: Path, src: Path, record_size: int, orders: list[str], seed: int) -> dict[str, Path]:
    from pcrfs.convert import convert

    out = {}
    for order in orders:
        store = work / f"{src.name}-{order}-{record_size}.pcr"
        if not (store / "pcr.yaml").exists():
            log(f"converting {src} -> {store} (--order {order})")
            convert(src, store, overwrite=True, record_bytes=record_size, workers=2, order=order, seed=seed)
        out[order] = store
    return out


def describe(store: Path, view: str) -> dict:
    from pcrfs.store.read.reader import open_store
    from pcrfs.store.read.verify import cumulative_fractions

    with open_store(store) as s:
        fr = {f"scan{f['k']}": f["bytes"] for f in cumulative_fractions(s)}
        fr["full"] = fr[f"scan{s.num_groups}"]
        return {"format_version": s.manifest["format_version"], "order": s.manifest.get("order"),
                "images": s.num_images, "records": len(s.index.records), "classes": len(s.classes),
                "images_per_record": round(s.num_images / len(s.index.records), 1),
                "view_bytes": fr[view], "full_bytes": fr["full"], "class_names": list(s.classes)}


# ---- measurements -----------------------------------------------------------------------------------

def path_epoch(root: Path, workers: int, batch: int, loader: str) -> dict:
    """One pass in path order (ImageFolder, shuffle=False)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets

    if loader == "bytes":
        ds = datasets.ImageFolder(str(root), bytes_size, loader=read_bytes)
        dl = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_sizes)
    else:
        ds = datasets.ImageFolder(str(root), transform())
        dl = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers)
    return drain(dl)


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def mount_options(cache: str, proxy: LinkProxy, work: Path, tag: str, args) -> dict:
    """PcrfsMount keywords for a cache setting: ``default`` (the mount's defaults), ``disk``
    (--disk-cache on a fresh directory), ``small`` (--cache-size --small-cache --readahead
    --small-readahead, no disk cache: a view that does not fit the caches, as ImageNet's
    does not fit the default 256M)."""
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.store.read.reader import ReadOptions

    if cache not in ("default", "disk", "small"):
        raise SystemExit(f"unknown cache setting {cache!r} (default, disk, small)")
    disk = None
    if cache == "disk":
        disk = work / "disk-cache" / tag
        shutil.rmtree(disk, ignore_errors=True)
    remote = RemoteOptions(endpoint_url=proxy.endpoint)
    if cache == "small":
        return {"read_options": ReadOptions(remote=remote, readahead_bytes=args.small_readahead),
                "cache_size": args.small_cache}
    return {"read_options": ReadOptions(remote=remote, disk_cache=str(disk) if disk else None)}


def mount_stats(m: PcrfsMount) -> dict:
    st = m.stats()
    keep = {k: st.get(k) for k in ("io", "store_reads", "cache", "fastpath", "prefix", "record_prefix",
                                   "prefixes") if k in st}
    keep.update({k: v for k, v in st.items() if "prefix" in k and k not in keep})
    return keep


def epoch_run(order: str, url: str, info: dict, cache: str, proxy: LinkProxy, args, work: Path) -> list[dict]:
    mnt = work / "mnt"
    rows = []
    before_mount = proxy.counts()
    opts = mount_options(cache, proxy, work, f"epoch-{order}-{cache}", args)
    with PcrfsMount(url, mnt, work / "logs" / "mount.log", **opts) as m:
        mount_link = delta(proxy.counts(), before_mount)
        for epoch in (1, 2):
            before, cpu0 = proxy.counts(), cpu_split_s(m.pid)
            r = path_epoch(mnt / args.view, args.workers, args.batch, args.loader)
            cpu1 = cpu_split_s(m.pid)
            link = delta(proxy.counts(), before)
            link_s = info["view_bytes"] / args.rate
            r.update(kind="epoch", order=order, cache=cache, view=args.view, epoch=epoch, link=link,
                     gets_per_image=round(link["gets"] / max(r["images"], 1), 4),
                     bytes_over_view=round(link["bytes"] / info["view_bytes"], 3),
                     link_seconds=round(link_s, 2), seconds_over_link=round(r["seconds"] / link_s, 3),
                     daemon_cpu_us_per_image=round(1e6 * (sum(cpu1) - sum(cpu0)) / max(r["images"], 1), 1),
                     loadavg=loadavg()[0])
            if epoch == 1:
                r["mount_link"] = mount_link
            rows.append(r)
            log(f"  epoch {order:8s} {cache:7s} {args.view} #{epoch}: {r['seconds']:6.1f}s (link {link_s:.1f}s)  "
                f"{link['bytes'] / 1e6:6.1f} MB  {r['gets_per_image']:.3f} GET/img  "
                f"daemon {r['daemon_cpu_us_per_image']} us/img")
        rows[-1]["mount_stats"] = mount_stats(m)
    return rows


def copy_run(order: str, url: str, klass: str, cache: str, proxy: LinkProxy, args, work: Path) -> dict:
    mnt = work / "mnt"
    dest = work / "copy" / klass
    shutil.rmtree(dest.parent, ignore_errors=True)
    dest.parent.mkdir(parents=True)
    before_mount = proxy.counts()
    opts = mount_options(cache, proxy, work, f"copy-{order}-{cache}-{klass}", args)
    with PcrfsMount(url, mnt, work / "logs" / "mount.log", **opts) as m:
        mount_link = delta(proxy.counts(), before_mount)
        before, cpu0 = proxy.counts(), cpu_split_s(m.pid)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(mnt / args.view / klass), str(dest)], check=True)
        seconds = time.perf_counter() - t0
        time.sleep(args.settle)  # a background prefetch the copy set off shows in the count too
        link = delta(proxy.counts(), before)
        cpu1 = cpu_split_s(m.pid)
        stats = mount_stats(m)
    files = [p for p in dest.rglob("*") if p.is_file()]
    copied = sum(p.stat().st_size for p in files)
    r = {"kind": "copy", "order": order, "cache": cache, "view": args.view, "class": klass, "files": len(files),
         "class_bytes": copied, "seconds": round(seconds, 3), "link": link, "mount_link": mount_link,
         "link_over_class": round(link["bytes"] / max(copied, 1), 3),
         "link_with_mount_over_class": round((link["bytes"] + mount_link["bytes"]) / max(copied, 1), 3),
         "gets_per_file": round(link["gets"] / max(len(files), 1), 3),
         "daemon_cpu_ms": round(1e3 * (sum(cpu1) - sum(cpu0)), 1), "mount_stats": stats, "loadavg": loadavg()[0]}
    log(f"  copy  {order:8s} {cache:7s} {args.view}/{klass}: {len(files)} files {copied / 1e6:.2f} MB, "
        f"link {link['bytes'] / 1e6:.2f} MB ({r['link_over_class']}x), {link['gets']} GETs, {seconds:.1f}s")
    shutil.rmtree(dest.parent, ignore_errors=True)
    return r


# ---- targets ----------------------------------------------------------------------------------------

def evaluate(rows: list[dict], infos: dict) -> dict:
    out: dict = {}
    for r in rows:
        if r["kind"] == "epoch" and r["epoch"] == 1:
            key = f"{r['order']}_{r['cache']}"
            e2 = next((x for x in rows if x["kind"] == "epoch" and x["order"] == r["order"]
                       and x["cache"] == r["cache"] and x["epoch"] == 2 and x.get("round") == r.get("round")), None)
            bound = LINK_FACTOR * r["link_seconds"] + (e2["seconds"] if e2 else 0.0)
            out.setdefault(f"epoch_{key}_gets_per_image_le_{GETS_PER_IMAGE}", []).append(
                {"value": r["gets_per_image"], "met": r["gets_per_image"] <= GETS_PER_IMAGE})
            out.setdefault(f"epoch_{key}_le_{LINK_FACTOR}x_link", []).append(
                {"value": r["seconds_over_link"], "met": r["seconds_over_link"] <= LINK_FACTOR})
            out.setdefault(f"epoch_{key}_le_{LINK_FACTOR}x_link_plus_epoch2", []).append(
                {"value": r["seconds"], "bound": round(bound, 2), "met": r["seconds"] <= bound})
        if r["kind"] == "copy":
            out.setdefault(f"copy_{r['order']}_{r['cache']}_link_le_{COPY_FACTOR}x_class", []).append(
                {"class": r["class"], "value": r["link_over_class"], "met": r["link_over_class"] <= COPY_FACTOR})
    return {k: {"all_met": all(x["met"] for x in v), "runs": v} for k, v in out.items()}


# ---- main -------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-remote-order")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--per-class", type=int, default=164, help="demo photos per demo class (8 classes): 1,312")
    p.add_argument("--classes", type=int, default=8,
                   help="class directories the photos are dealt into (8: the demo's own classes)")
    p.add_argument("--record-size", default="4M", help="record size of both stores (bytes, or 4M)")
    p.add_argument("--seed", type=int, default=0, help="the shuffled conversion's --seed")
    p.add_argument("--orders", default=",".join(ORDERS))
    p.add_argument("--view", default="scan5")
    p.add_argument("--latency", type=float, default=0.020, help="seconds per request")
    p.add_argument("--rate", type=float, default=4e6, help="bytes/s, shared")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--loader", choices=["decode", "bytes"], default="decode",
                   help="decode: PIL + RandomResizedCrop(224) + ToTensor; bytes: the files' bytes only")
    p.add_argument("--caches", default="default,disk",
                   help="cache settings: default (the mount's), disk (--disk-cache), small (--small-cache and "
                        "--small-readahead, no disk cache: the view does not fit)")
    p.add_argument("--small-cache", default="16M", help="--cache-size of the small setting")
    p.add_argument("--small-readahead", default="4M", help="--readahead of the small setting")
    p.add_argument("--parts", default="epoch,copy", help="what to measure: epoch, copy")
    p.add_argument("--copy-classes", type=int, default=2, help="classes copied (each on a fresh mount)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a copy before counting the link")
    p.add_argument("--repeats", type=int, default=1, help="rounds (the starting order alternates)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_remote_epoch_order.json")
    return p.parse_args()


def parse_sizes(args: argparse.Namespace) -> None:
    from pcrfs.units import parse_size

    args.record_size = parse_size(args.record_size)
    args.small_cache = parse_size(args.small_cache)
    args.small_readahead = parse_size(args.small_readahead)


def classes_to_copy(names: list[str], n: int) -> list[str]:
    """``n`` class names spread over ``names``, from the middle on."""
    step = max(1, len(names) // max(1, n))
    return [names[(len(names) // 2 + j * step) % len(names)] for j in range(n)]


def run_rounds(args: argparse.Namespace, orders: list[str], infos: dict, copy_classes: list[str],
               proxy: LinkProxy, work: Path) -> list[dict]:
    """--repeats rounds of the parts of --parts, each over every cache setting and order."""
    caches = args.caches.split(",")
    parts = args.parts.split(",")
    rows: list[dict] = []
    for rnd in range(args.repeats):
        seq = orders if rnd % 2 == 0 else orders[::-1]
        if "epoch" in parts:
            for cache in caches:
                for o in seq:
                    for r in epoch_run(o, f"s3://{BUCKET}/{o}.pcr", infos[o], cache, proxy, args, work):
                        r["round"] = rnd
                        rows.append(r)
        if "copy" in parts:
            for cache in caches:
                for klass in copy_classes:
                    for o in seq:
                        r = copy_run(o, f"s3://{BUCKET}/{o}.pcr", klass, cache, proxy, args, work)
                        r["round"] = rnd
                        rows.append(r)
    return rows


def result_doc(run: Run, args: argparse.Namespace, infos: dict, copy_classes: list[str], rows: list[dict]) -> dict:
    return run.doc(**{
        "benchmark": "bench_remote_order",
        "setting": {"latency_s": args.latency, "rate_bytes_s": args.rate, "record_size": args.record_size,
                    "view": args.view, "workers": args.workers, "batch": args.batch, "loader": args.loader,
                    "classes": args.classes, "per_demo_class": args.per_class, "seed": args.seed,
                    "caches": {"default": "the mount's defaults (memory cache 256M, no disk cache)",
                               "disk": "--disk-cache DIR (fresh, 10G)",
                               "small": f"--cache-size {args.small_cache} --readahead {args.small_readahead}, "
                                        "no disk cache"},
                    "copied_classes": copy_classes, "server": "s3rver 3.7.1",
                    "transform": "RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor"
                    if args.loader == "decode" else "none (file bytes)"},
        "stores": infos, "rows": rows, "targets": evaluate(rows, infos),
    })


def main() -> int:
    args = parse_args()
    run = Run("tools/bench_remote_order.py", packages=("torch", "torchvision"))
    parse_sizes(args)
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    orders = args.orders.split(",")
    src = photos(work, args.per_class, args.classes)
    local = stores(work, src, args.record_size, orders, args.seed)
    infos = {o: describe(s, args.view) for o, s in local.items()}
    copy_classes = classes_to_copy(infos[orders[0]]["class_names"], args.copy_classes)
    os.environ.update(S3RVER_ENV)
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    shutil.rmtree(work / "s3rver", ignore_errors=True)
    server = S3rver(args.npm_cache, work / "s3rver", work / "logs" / "s3rver.log")
    proxy = None
    try:
        files = []
        for o, s in local.items():
            files += store_files(s, f"{o}.pcr")
        log(f"uploading {len(local)} stores to s3rver at {server.endpoint}")
        upload(files, server.endpoint)
        proxy = LinkProxy(server.port, args.latency, args.rate, work / "logs" / "link.log")
        rows = run_rounds(args, orders, infos, copy_classes, proxy, work)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        CLEANUP.all()
    for i in infos.values():
        i.pop("class_names")
    doc = result_doc(run, args, infos, copy_classes, rows)
    write_json(args.out, doc)
    print(json.dumps({k: v["all_met"] for k, v in doc["targets"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    sys.exit(main())
