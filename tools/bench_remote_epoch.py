#!/usr/bin/env python3
"""Shuffled training epochs from object storage behind a slow link (issues 13 and 25).

The setting: an S3 server whose ranged-GET cost does not grow with the object
(s3rver 3.7.1, installed with npm into ``--npm-cache`` on first use; moto reads
the whole object per GET) behind a user-space link proxy on 127.0.0.1 that adds
``--latency`` per request and shares ``--rate`` bytes/s among all responses, and
counts requests and bytes (``tc netem`` is not available here). Photos:
``--per-class`` x 8 classes of ImageNet-size demo photos (``pcrfs.demo``),
converted into records of ``--record-size``.

Each configuration mounts the store afresh (``pcrfs mount s3://...`` through the
proxy, fresh disk cache) and runs epochs 1 and 2 of torchvision ``ImageFolder`` +
``DataLoader(num_workers=--workers, batch --batch)``, ``RandomResizedCrop(224)`` +
flip + ``ToTensor``:

* ``prefix``  -- ``shuffle=True``, record prefixes (the default), disk cache;
* ``images``  -- ``shuffle=True``, ``--record-prefix off`` (per-image reads, as
  before issue 13), disk cache;
* ``sampler`` -- ``RecordShuffleSampler(MNT/VIEW)`` (its window sized by the mount,
  which it tells the records it reads next), no disk cache, memory cache
  ``--sampler-cache`` (``--cache-size``);
* ``wds``     -- the peer: WebDataset over ``--shards`` tar shards of the original
  JPEGs (samples shuffled before sharding), shard shuffle + a 500-sample buffer,
  fetched through the same proxy with curl.

Issue 25's modes (all on the ``--sampler-record-size`` store, like ``sampler``; none in
the default ``--modes``):

* ``cached``    -- the cached decode epoch: the same loader (``shuffle=True``) over a local
  copy of the view's files (no link);
* ``sampler4m`` -- ``sampler`` with the mount's cache ``--small-cache`` (4M), readahead
  off; ``sampler4m_ra`` -- the same at the mount's default readahead (as ``pcrfs mount
  --cache-size 4M`` alone: readahead raises that memory cache to 4 x 16M);
* ``dataset``   -- no FUSE: ``pcrfs.torch.ImageFolder(s3://..., view=VIEW,
  storage_options={endpoint_url, cache_bytes: --sampler-cache, readahead_bytes: 0})`` +
  ``RecordShuffleSampler(url, view=VIEW, storage_options=same)``, each epoch inside
  ``with ds.fetch_ahead(sampler)``, in a process of its own;
* ``ranks2``    -- ``--world-size`` mounts as ``sampler`` (each its own cache), each read
  by a process with ``RecordShuffleSampler(MNT_i/VIEW, rank=i, world_size=...)``, all
  at once; ``dataset_ranks2`` -- ``dataset`` in ``--world-size`` rank processes at once
  (each its own shared cache).

Requests per image, bytes and link time are counted at the proxy (for the ranks, all of
them together); the daemon's CPU per image comes from /proc. Targets (issue 13, and
issue 25's from benchlib.training_targets) are evaluated in the JSON.

    python tools/bench_remote_epoch.py                        # the full run, ~15 min on 2 cores
    python tools/bench_remote_epoch.py --views scan5,full --modes prefix,wds   # a reduced one
    python tools/bench_remote_epoch.py --views scan5 --loader decode --sampler-record-size 4M \
        --sampler-cache 8M --modes cached,sampler,sampler4m,sampler4m_ra,dataset,ranks2,dataset_ranks2,wds

Writes ``results/bench_remote_epoch.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.data import demo_store  # noqa: E402
from benchlib.loaders import (bytes_size, collate_sizes, drain, epoch_runner, imagefolder_epoch,  # noqa: E402,F401
                              read_bytes, transform)
from benchlib.lockstep import Lockstep, child_main  # noqa: E402
from benchlib.mounts import CLEANUP, PcrfsMount  # noqa: E402
from benchlib.proc import cpu_split_s, loadavg  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, LinkProxy, S3rver, store_files, upload  # noqa: E402,F401
from benchlib.results import Run, write_json  # noqa: E402
from benchlib.training_targets import evaluate_training  # noqa: E402
from benchlib.training_plot import plot_epochs  # noqa: E402

VIEWS = ["scan1", "scan2", "scan5", "full"]
MODES = ["prefix", "images", "sampler", "wds", "cached", "sampler4m", "sampler4m_ra", "dataset", "ranks2",
         "dataset_ranks2"]


# ---- data -------------------------------------------------------------------------------------------

def prepare(work: Path, per_class: int, record_size: int) -> tuple[Path, Path]:
    return demo_store(work, per_class, f"store-{record_size >> 20}M.pcr", record_bytes=record_size, workers=2)


def make_shards(src: Path, out: Path, shards: int) -> list[Path]:
    """WebDataset shards of the original JPEGs: samples shuffled once, then cut into ``shards`` tars."""
    if out.is_dir() and len(list(out.glob("*.tar"))) == shards:
        return sorted(out.glob("*.tar"))
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    samples = [(c, p) for c in classes for p in sorted((src / c).iterdir())]
    random.Random(0).shuffle(samples)
    paths = []
    for s in range(shards):
        path = out / f"shard-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for c, p in samples[s::shards]:
                key = f"{c}_{p.stem}"
                for name, data in ((f"{key}.jpg", p.read_bytes()), (f"{key}.cls", str(classes.index(c)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# ---- epochs -----------------------------------------------------------------------------------------

def wds_epoch(urls: list[str], workers: int, batch: int, seed: int, loader: str = "decode") -> dict:
    import webdataset as wds
    from torch.utils.data import DataLoader

    ds = wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False).shuffle(500)
    if loader == "bytes":
        ds = ds.to_tuple("jpg", "cls").map_tuple(bytes_size, lambda c: int(c))
        return drain(DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate_sizes))
    ds = ds.decode("pil").to_tuple("jpg", "cls").map_tuple(transform(), int)
    return drain(DataLoader(ds, batch_size=batch, num_workers=workers))


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


SAMPLER_MODES = ("sampler", "sampler4m", "sampler4m_ra", "ranks2")  # mounts read through RecordShuffleSampler


def mount_options(mode: str, args, proxy: LinkProxy, disk: Path) -> tuple[int, Any]:
    """(``--cache-size``, read options) of a mount in ``mode``."""
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.store.read.reader import ReadOptions

    remote = RemoteOptions(endpoint_url=proxy.endpoint)
    if mode not in SAMPLER_MODES:
        return args.cache_size, ReadOptions(remote=remote, disk_cache=str(disk), disk_cache_bytes=args.disk_cache_size,
                                            record_prefix=mode != "images", readahead_bytes=None)
    cache_size = args.small_cache if mode.startswith("sampler4m") else args.sampler_cache
    # no disk cache; readahead's window would raise the memory cache to 4 x 16M: a sampler needs
    # none (sampler4m_ra keeps the mount's default readahead, as `pcrfs mount --cache-size 4M` does)
    return cache_size, ReadOptions(remote=remote, disk_cache=None, disk_cache_bytes=args.disk_cache_size,
                                   record_prefix=True, readahead_bytes=None if mode == "sampler4m_ra" else 0)


def link_figures(r: dict, link: dict, daemon_cpu: tuple[float, float] | None) -> dict:
    """``r`` with the link's figures per image (and the daemons' CPU, given (all, system) seconds)."""
    n = max(r["images"], 1)
    r.update(link=link, gets_per_image=round(link["gets"] / n, 4),
             record_gets_per_image=round(link["record_gets"] / n, 4))
    if daemon_cpu is not None:
        r.update(daemon_cpu_us_per_image=round(1e6 * daemon_cpu[0] / n, 1),
                 daemon_system_us_per_image=round(1e6 * daemon_cpu[1] / n, 1))
    r["loadavg"] = loadavg()[0]
    return r


def cpu_of(pids: list[int]) -> tuple[float, float]:
    """(user + system, system) CPU seconds of ``pids`` together."""
    splits = [cpu_split_s(p) for p in pids]
    return sum(u + s for u, s in splits), sum(s for _, s in splits)


def log_row(r: dict) -> None:
    daemon = f"  daemon {r['daemon_cpu_us_per_image']} us/img" if "daemon_cpu_us_per_image" in r else ""
    log(f"  {r['mode']:7s} {r['view']:5s} epoch {r['epoch']}: {r['seconds']:6.1f}s  "
        f"{r['link']['bytes'] / 1e6:6.1f} MB  {r['gets_per_image']:.3f} GET/img{daemon}")


def mounted_run(mode: str, view: str, url: str, proxy: LinkProxy, args, work: Path, local_store: Path) -> list[dict]:
    """Epochs 1 and 2 of ``view`` on a fresh mount in ``mode``; one row per epoch."""
    from pcrfs.access.sampling import RecordShuffleSampler

    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    disk = work / "disk-cache" / f"{mode}-{view}"
    shutil.rmtree(disk, ignore_errors=True)
    cache_size, opts = mount_options(mode, args, proxy, disk)
    rows = []
    with PcrfsMount(url, mnt, work / "logs" / "mount.log", cache_size=cache_size, read_options=opts) as m:
        sampler = None
        if mode in SAMPLER_MODES:
            # as a user would: the sampler given the mounted view takes its catalogue and its
            # window from the mount, and tells it the records it reads next (--no-sampler-ahead: not)
            sampler = RecordShuffleSampler(mnt / view, seed=0, window=args.sampler_window,
                                           fetch_ahead=not args.no_sampler_ahead)
        for epoch in (1, 2):
            if sampler is not None:
                sampler.set_epoch(epoch)
            before, cpu0 = proxy.counts(), cpu_of([m.pid])
            r = imagefolder_epoch(mnt / view, args.workers, args.batch, epoch, sampler, args.loader)
            cpu1 = cpu_of([m.pid])
            r.update(mode=mode, view=view, epoch=epoch)
            link_figures(r, delta(proxy.counts(), before), (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]))
            if sampler is not None:
                r["window"] = sampler.window
            rows.append(r)
            log_row(r)
        stats = m.stats()
        rows[-1]["mount_io"] = stats.get("io")
        rows[-1]["fastpath"] = stats.get("fastpath")
        if mode not in ("prefix", "images", "sampler"):  # the cache the mount keeps (readahead raises it)
            rows[-1]["mount_cache_capacity"] = stats.get("cache", {}).get("capacity")
    return rows


# ---- ranks and FUSE-free epochs, each process a child run in lockstep --------------------------------

CHILD = "--child"


def lockstep_epochs(mode: str, view: str, configs: list[dict], proxy: LinkProxy, work: Path,
                    pids: list[int] = ()) -> list[dict]:
    """Epochs 1 and 2 of child processes (``configs``) run at the same time; one row per epoch
    (link and daemons counted for all of them together, each rank's figures under ``ranks``)."""
    argv = [sys.executable, str(Path(__file__).resolve()), CHILD]
    rows = []
    with Lockstep(configs, argv, work / "logs" / f"{mode}-{view}.log") as group:
        log(f"  {mode} {view}: " + ", ".join(f"rank {r['rank']}/{r['world_size']} window {r['window']} "
                                             f"share {r['share']}" for r in group.ready))
        for epoch in (1, 2):
            before, cpu0 = proxy.counts(), cpu_of(list(pids))
            outs = group.epoch(epoch)
            cpu1 = cpu_of(list(pids))
            # from the first loader's first batch asked for to the last one's end (the loaders' own
            # set-up -- listing the view, starting workers -- is outside, as in the other modes)
            span = max(o["t_end"] for o in outs) - min(o["t_end"] - o["seconds"] for o in outs)
            r = {"seconds": outs[0]["seconds"] if len(outs) == 1 else round(span, 3),
                 "images": sum(o["images"] for o in outs), "mode": mode, "view": view, "epoch": epoch}
            link_figures(r, delta(proxy.counts(), before), (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]) if pids else None)
            r["ranks"] = [{**{k: v for k, v in ready.items() if k != "ready"},
                           **{k: v for k, v in o.items() if k not in ("t_start", "t_end")}}
                          for ready, o in zip(group.ready, outs)]
            r["window"] = group.ready[0]["window"]
            rows.append(r)
            log_row(r)
    return rows


def child_config(args, **fields) -> dict:
    return {"workers": args.workers, "batch": args.batch, "loader": args.loader, "window": args.sampler_window,
            **fields}


def ranks_mount_run(view: str, url: str, proxy: LinkProxy, args, work: Path) -> list[dict]:
    """``--world-size`` mounts, each with its own cache, each read by a rank's process at once."""
    cache_size, opts = mount_options("ranks2", args, proxy, work / "unused")
    world = args.world_size
    with contextlib.ExitStack() as stack:
        mounts = [stack.enter_context(PcrfsMount(url, work / f"mnt-rank{i}", work / "logs" / f"mount-rank{i}.log",
                                                 cache_size=cache_size, read_options=opts)) for i in range(world)]
        configs = [child_config(args, kind="mount", root=str(Path(m.mp) / view), rank=i, world_size=world,
                                ahead=not args.no_sampler_ahead) for i, m in enumerate(mounts)]
        rows = lockstep_epochs("ranks2", view, configs, proxy, work, [m.pid for m in mounts])
        rows[-1]["mount_io"] = [m.stats().get("io") for m in mounts]
    return rows


def dataset_run(mode: str, view: str, url: str, proxy: LinkProxy, args, work: Path) -> list[dict]:
    """``pcrfs.torch.ImageFolder`` + ``RecordShuffleSampler`` + ``fetch_ahead``, no FUSE: one process
    (``dataset``) or ``--world-size`` rank processes at once (``dataset_ranks2``), each with
    its own shared cache (``--sampler-cache``, readahead off)."""
    opts = {"endpoint_url": proxy.endpoint, "cache_bytes": args.sampler_cache, "readahead_bytes": 0}
    world = 1 if mode == "dataset" else args.world_size
    configs = [child_config(args, kind="dataset", url=url, view=view, storage_options=opts, rank=i, world_size=world)
               for i in range(world)]
    return lockstep_epochs(mode, view, configs, proxy, work)


def local_view_copy(store: Path, view: str, dest: Path) -> Path:
    """The files of ``view`` of the local ``store`` under ``dest`` (class/name, as a mount serves
    them), made once."""
    from pcrfs.access.torch import ImageFolder

    if (dest / ".complete").exists():
        return dest
    log(f"copying {view} of {store.name} to {dest}")
    ds = ImageFolder(str(store), view=view)
    for i, (path, _) in enumerate(ds.samples):
        out = dest / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(ds.read_bytes(i))
    (dest / ".complete").touch()
    return dest


def cached_run(view: str, proxy: LinkProxy, args, work: Path, store: Path) -> list[dict]:
    """The cached decode epoch: the same loader over a local copy of ``view``'s files (no link)."""
    root = local_view_copy(store, view, work / f"copy-{store.name}-{view}")
    rows = []
    for epoch in (1, 2):
        before = proxy.counts()
        r = imagefolder_epoch(root, args.workers, args.batch, epoch, None, args.loader)
        r.update(mode="cached", view=view, epoch=epoch)
        rows.append(link_figures(r, delta(proxy.counts(), before), None))
        log_row(r)
    return rows


def wds_run(proxy: LinkProxy, shards: list[Path], args) -> list[dict]:
    urls = [f"pipe:curl -s -f {proxy.endpoint}/{BUCKET}/wds/{p.name}" for p in shards]
    rows = []
    for epoch in (1, 2):
        before = proxy.counts()
        r = wds_epoch(urls, args.workers, args.batch, epoch, args.loader)
        link = delta(proxy.counts(), before)
        r.update(mode="wds", view="full", epoch=epoch, link=link,
                 gets_per_image=round(link["gets"] / max(r["images"], 1), 4), loadavg=loadavg()[0])
        rows.append(r)
        log(f"  wds     full  epoch {epoch}: {r['seconds']:6.1f}s  {link['bytes'] / 1e6:6.1f} MB  {link['gets']} GETs")
    return rows


# ---- targets ----------------------------------------------------------------------------------------

def evaluate(rows: list[dict], view_bytes: dict, rate: float) -> dict:
    def get(mode, view, epoch):
        return next((r for r in rows if r["mode"] == mode and r["view"] == view and r["epoch"] == epoch), None)

    out: dict = {}
    p1, p2 = get("prefix", "scan5", 1), get("prefix", "scan5", 2)
    if p1:
        out["scan5_epoch1_gets_per_image_le_0.05"] = {"value": p1["gets_per_image"],
                                                      "met": p1["gets_per_image"] <= 0.05}
    if p1 and p2:
        bound = 1.3 * view_bytes["scan5"] / rate + p2["seconds"]
        out["scan5_epoch1_le_1.3_link_plus_cached"] = {"value": p1["seconds"], "bound": round(bound, 2),
                                                       "met": p1["seconds"] <= bound}
        out["epoch2_gets_per_image_le_0.01"] = {
            "value": max(r["gets_per_image"] for r in rows if r["mode"] == "prefix" and r["epoch"] == 2),
            "met": all(r["gets_per_image"] <= 0.01 for r in rows if r["mode"] == "prefix" and r["epoch"] == 2)}
    w = get("wds", "full", 1)
    if p1 and w:
        out["scan5_epoch1_le_0.5_wds"] = {"value": round(p1["seconds"] / w["seconds"], 3),
                                          "met": p1["seconds"] <= 0.5 * w["seconds"]}
    for mode in ("prefix", "sampler", "images"):
        full = get(mode, "full", 1)
        for v in ("scan1", "scan2", "scan5"):
            r = get(mode, v, 1)
            if full and r:
                ratio = view_bytes["full"] / view_bytes[v]
                sp = full["seconds"] / r["seconds"]
                out[f"{mode}_speedup_{v}"] = {"value": round(sp, 2), "bytes_ratio": round(ratio, 2),
                                             "target": round(0.8 * ratio, 2), "met": sp >= 0.8 * ratio}
    s5 = get("sampler", "scan5", 1)
    if s5:
        out["sampler_scan5_gets_per_image_le_0.05"] = {"value": s5["gets_per_image"],
                                                       "met": s5["gets_per_image"] <= 0.05}
    return out


# ---- main -------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-remote")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--per-class", type=int, default=164, help="demo photos per class (8 classes): 1,312")
    p.add_argument("--record-size", default="64M", help="record size of the store (bytes, or 64M)")
    p.add_argument("--latency", type=float, default=0.020, help="seconds per request")
    p.add_argument("--rate", type=float, default=4e6, help="bytes/s, shared")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cache-size", default="256M")
    p.add_argument("--sampler-cache", default="256M", help="memory cache of the sampler runs (no disk cache)")
    p.add_argument("--no-sampler-ahead", action="store_true",
                   help="the sampler does not tell the mount the records it reads next (RecordShuffleSampler(..., "
                        "fetch_ahead=False))")
    p.add_argument("--sampler-window", type=int, default=None,
                   help="the samplers' window in records (default: theirs, sized by the cache they read through)")
    p.add_argument("--sampler-record-size", default=None,
                   help="the sampler runs read a copy of the photos in records of this size (e.g. 4M records "
                        "and --sampler-cache 16M: the cache holds a window of records, not the view)")
    p.add_argument("--small-cache", default="4M",
                   help="--cache-size of the sampler4m and sampler4m_ra mounts (a sampler left at its defaults)")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the ranks2 and dataset_ranks2 modes")
    p.add_argument("--disk-cache-size", type=int, default=10 << 30)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--views", default=",".join(VIEWS))
    p.add_argument("--modes", default="prefix,images,sampler,wds",
                   help="of " + ",".join(MODES) + " (see above)")
    p.add_argument("--images-views", default="scan5,full", help="views of the (slow) per-image baseline")
    p.add_argument("--loader", choices=["decode", "bytes"], default="decode",
                   help="decode: PIL + RandomResizedCrop(224) + ToTensor (a training pipeline); bytes: read "
                        "the files only (what the link costs, on a machine too loaded for the decode)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_remote_epoch.json")
    p.add_argument("--png", type=Path, default=None, help="also plot the epochs of each view against the targets")
    args = p.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}: choose from {','.join(MODES)}")
    return args


def parse_sizes(args: argparse.Namespace) -> None:
    from pcrfs.units import parse_size

    args.cache_size = parse_size(args.cache_size)
    args.sampler_cache = parse_size(args.sampler_cache)
    args.small_cache = parse_size(args.small_cache)
    args.record_size = parse_size(args.record_size)  # "4M" as the README writes it, or bytes
    if args.sampler_record_size:
        args.sampler_record_size = parse_size(args.sampler_record_size)


def store_facts(store: Path) -> tuple[dict, dict]:
    """(the local store's images and records, the bytes of each of VIEWS)."""
    from pcrfs.store.read.reader import open_store
    from pcrfs.store.read.verify import cumulative_fractions

    with open_store(store) as s:
        n_images, n_records, groups = s.num_images, len(s.index.records), s.num_groups
        fractions = {f"scan{f['k']}": f["bytes"] for f in cumulative_fractions(s)}
    view_bytes = {v: fractions[v] for v in VIEWS if v != "full"}
    view_bytes["full"] = fractions[f"scan{groups}"]
    return {"images": n_images, "records": n_records}, view_bytes


def upload_all(endpoint: str, store: Path, shards: list[Path], sampler_store: Path) -> None:
    log(f"uploading the store and {len(shards)} shards to s3rver at {endpoint}")
    files = store_files(store, "store.pcr") + [(p, f"wds/{p.name}") for p in shards]
    if sampler_store != store:
        files += store_files(sampler_store, "sampler.pcr")
    upload(files, endpoint)


def run_modes(args: argparse.Namespace, proxy: LinkProxy, shards: list[Path], work: Path, store: Path,
              sampler_store: Path) -> list[dict]:
    """Every mode of --modes over every view of --views (the per-image one over --images-views);
    the sampler's modes (SAMPLER_MODES, cached, dataset, dataset_ranks2) read the sampler's store."""
    url = f"s3://{BUCKET}/store.pcr"
    sampler_url = f"s3://{BUCKET}/sampler.pcr" if sampler_store != store else url
    rows: list[dict] = []
    modes = args.modes.split(",")
    views = args.views.split(",")
    if "wds" in modes:
        rows += wds_run(proxy, shards, args)
    if "cached" in modes:
        for view in views:
            rows += cached_run(view, proxy, args, work, sampler_store)
    for mode in ("prefix", "sampler", "sampler4m", "sampler4m_ra", "images"):
        if mode not in modes:
            continue
        for view in views:
            if mode == "images" and view not in args.images_views.split(","):
                continue
            if mode in SAMPLER_MODES:
                rows += mounted_run(mode, view, sampler_url, proxy, args, work, sampler_store)
            else:
                rows += mounted_run(mode, view, url, proxy, args, work, store)
    for mode in ("dataset", "ranks2", "dataset_ranks2"):
        if mode not in modes:
            continue
        for view in views:
            if mode == "ranks2":
                rows += ranks_mount_run(view, sampler_url, proxy, args, work)
            else:
                rows += dataset_run(mode, view, sampler_url, proxy, args, work)
    return rows


def prefix_bytes(store: Path) -> dict:
    """The bytes of each of VIEWS as record prefixes (groups 1..k of every record: what a
    reader of whole prefixes fetches); the view's files add an EOI each."""
    from pcrfs.store.read.prefixpolicy import group_bounds
    from pcrfs.store.read.reader import open_store

    with open_store(store) as s:
        b = group_bounds(s.index.record_group_offsets, s.index.records["size"])
        ks = {v: (s.num_groups if v == "full" else min(int(v[4:]), s.num_groups)) for v in VIEWS}
    return {v: int((b[:, k] - b[:, 0]).sum()) for v, k in ks.items()}


def result_doc(run: Run, args: argparse.Namespace, facts: dict, view_bytes: dict, shards: list[Path],
               rows: list[dict], sampler: dict) -> dict:
    """The JSON; ``sampler``: the sampler store's records, view bytes (files) and prefix bytes."""
    return run.doc(**{
        "benchmark": "bench_remote_epoch",
        "date": run.started.isoformat(timespec="seconds"),
        "setting": {"latency_s": args.latency, "rate_bytes_s": args.rate, "images": facts["images"],
                    "records": facts["records"], "record_size": args.record_size, "workers": args.workers,
                    "batch": args.batch, "cache_size": args.cache_size, "sampler_cache": args.sampler_cache,
                    "sampler_record_size": args.sampler_record_size or args.record_size,
                    "server": "s3rver 3.7.1", "loader": args.loader,
                    "transform": "RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor"
                    if args.loader == "decode" else "none (file bytes)",
                    "sampler_records": sampler["records"], "small_cache": args.small_cache,
                    "world_size": args.world_size, "sampler_window": args.sampler_window,
                    "modes": args.modes.split(",")},
        "view_bytes": view_bytes, "link_seconds": {v: round(b / args.rate, 2) for v, b in view_bytes.items()},
        "wds_bytes": sum(p.stat().st_size for p in shards),
        "sampler_view_bytes": sampler["view_bytes"], "sampler_prefix_bytes": sampler["prefix_bytes"],
        "rows": rows, "targets": {**evaluate(rows, view_bytes, args.rate),
                                  **evaluate_training(rows, sampler["view_bytes"], args.rate, facts["images"])},
    })


def sampler_facts(store: Path) -> dict:
    facts, view_bytes = store_facts(store)
    return {"records": facts["records"], "view_bytes": view_bytes, "prefix_bytes": prefix_bytes(store)}


def main() -> int:
    args = parse_args()
    run = Run("tools/bench_remote_epoch.py")
    parse_sizes(args)
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    src, store = prepare(work, args.per_class, args.record_size)
    facts, view_bytes = store_facts(store)
    shards = make_shards(src, work / "wds", args.shards)
    sampler_store = store
    if args.sampler_record_size:
        sampler_store = prepare(work, args.per_class, args.sampler_record_size)[1]
    os.environ.update(S3RVER_ENV)
    os.environ["XDG_CACHE_HOME"] = str(work / "xdg-cache")
    shutil.rmtree(work / "s3rver", ignore_errors=True)
    server = S3rver(args.npm_cache, work / "s3rver", work / "logs" / "s3rver.log")
    proxy = None
    try:
        upload_all(server.endpoint, store, shards, sampler_store)
        proxy = LinkProxy(server.port, args.latency, args.rate, work / "logs" / "link.log")
        rows = run_modes(args, proxy, shards, work, store, sampler_store)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        CLEANUP.all()
    doc = result_doc(run, args, facts, view_bytes, shards, rows, sampler_facts(sampler_store))
    write_json(args.out, doc)
    if args.png:
        plot_epochs(doc, args.png)
    print(json.dumps(doc["targets"], indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:  # one training process of a lockstep mode (dataset, ranks2, dataset_ranks2)
        sys.exit(child_main(json.loads(sys.argv[2]), epoch_runner))
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    sys.exit(main())
