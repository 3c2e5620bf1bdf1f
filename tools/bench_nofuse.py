#!/usr/bin/env python3
"""The doors without FUSE against the mount: a CPU-bound epoch and the raw read rate.

**Epoch** (issue 15's target: the dataset >= 1.0x the mount): ``RandomResizedCrop(224)``
+ ``ToTensor``, ``DataLoader(num_workers=--workers, batch_size=--batch, shuffle=True)``
with the same seed for every variant, record files in the page cache, on views
``scan1 scan5 full``:

* ``dataset``: ``pcrfs.torch.ImageFolder(STORE, view)``;
* ``mount``: ``torchvision.datasets.ImageFolder(MNT/view)`` on a fresh mount (so the
  kernel's page cache holds no file of the view; the records are cached);
* ``baseline``: ``torchvision.datasets.ImageFolder`` over the original JPEG tree.

Rounds are interleaved (every variant once per round; the views rotate and the
dataset/mount order alternates ABBA), so load from other processes on the machine hits
all of them alike; the median per variant is reported, speed ratios are per round (use
an even ``--rounds``). CPU milliseconds per image (this process, its finished DataLoader
workers and, for the mount, its daemon) drift much less with load than wall time.

**Raw read rate** (target: >= 0.8x the reader API): one thread reading every file of
a view, in order, ``--raw-passes`` times, as bytes: ``Store.read(i, k)`` (the reader
API), the dataset's ``read_bytes(j)``, and the fsspec filesystem's ``cat_file(path)``;
interleaved rounds, files/s and CPU microseconds per file, ratios per round.

    python tools/bench_nofuse.py                      # 1,000 ImageNet-size photos, 4 rounds
    python tools/bench_nofuse.py --per-class 50 --rounds 1   # a quick look

Writes ``results/bench_nofuse.json``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.data import demo_store  # noqa: E402
from benchlib.mounts import CLEANUP, PcrfsMount, is_mounted  # noqa: E402
from benchlib.proc import cpu_s, loadavg, self_cpu_s  # noqa: E402
from benchlib.reads import warm  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

from pcrfs.store.read.reader import open_store  # noqa: E402

EPOCH_VIEWS = ["scan1", "scan5", "full"]


# ---- epochs ------------------------------------------------------------------------------------

def transform():
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.ToTensor()])


def epoch(make_dataset, args, server_pid: int | None = None) -> dict:
    import torch
    from torch.utils.data import DataLoader

    t0 = time.perf_counter()
    ds = make_dataset()
    built = time.perf_counter() - t0
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(0))
    c0, s0, l0 = self_cpu_s(children=True), cpu_s(server_pid), loadavg()[0]
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += x.shape[0]
    secs = time.perf_counter() - t0
    del loader
    cpu = self_cpu_s(children=True) - c0 + cpu_s(server_pid) - s0
    return {"seconds": round(secs, 3), "images": n, "images_per_s": round(n / secs, 1),
            "cpu_ms_per_image": round(cpu * 1e3 / n, 3), "dataset_build_s": round(built, 3),
            "load_before": round(l0, 2)}


def run_variant(variant: str, view: str, store: Path, src: Path, mnt: Path, args) -> dict:
    from torchvision import datasets

    if variant == "dataset":
        from pcrfs.access.torch import ImageFolder

        return epoch(lambda: ImageFolder(store, view=view, transform=transform()), args)
    if variant == "baseline":
        return epoch(lambda: datasets.ImageFolder(str(src), transform()), args)
    with PcrfsMount(store, mnt, mnt.parent / "mount.log") as m:
        return epoch(lambda: datasets.ImageFolder(str(mnt / view), transform()), args, m.pid)


# ---- raw reads ---------------------------------------------------------------------------------

def raw_reads(store_path: Path, view: str, rounds: int, passes: int) -> dict:
    """Files/s and CPU per file of the reader API, the dataset's bytes and fsspec cat_file."""
    import fsspec

    from pcrfs.access.filesystem import register
    from pcrfs.access.torch import ImageFolder

    register()
    store = open_store(store_path)
    ds = ImageFolder(store_path, view=view)
    fs = fsspec.filesystem("pcr", fo=str(store_path), skip_instance_cache=True)
    n = store.num_groups
    k = n if view == "full" else int(view[4:])
    images = list(range(store.num_images))
    paths = [f"{view}/{store.path(i)}" for i in images]
    samples = range(len(ds))

    def reader_api():
        for _ in range(passes):
            for i in images:
                store.read(i, k)

    def dataset_bytes():
        for _ in range(passes):
            for j in samples:
                ds.read_bytes(j)

    def fsspec_cat():
        for _ in range(passes):
            for p in paths:
                fs.cat_file(p)

    ways = {"reader_api": reader_api, "dataset_read_bytes": dataset_bytes, "fsspec_cat_file": fsspec_cat}
    for fn in ways.values():  # warm: listings, caches, code
        fn()
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(rounds):
        order = list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]
        for name in order:
            c0, t0 = time.process_time(), time.perf_counter()
            ways[name]()
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            files = len(images) * passes
            runs[name].append({"files_per_s": round(files / secs, 1), "cpu_us_per_file": round(cpu * 1e6 / files, 2)})
    store.close()
    ds.close()
    out = {}
    for name, rs in runs.items():
        out[name] = {"files_per_s": statistics.median(x["files_per_s"] for x in rs),
                     "cpu_us_per_file": statistics.median(x["cpu_us_per_file"] for x in rs), "runs": rs}
    base = runs["reader_api"]
    for name in ("dataset_read_bytes", "fsspec_cat_file"):
        # per round (the three ways ran back to back), then the median
        out[name]["ratio_files_per_s"] = round(statistics.median(
            x["files_per_s"] / b["files_per_s"] for x, b in zip(runs[name], base)), 3)
        out[name]["ratio_cpu"] = round(statistics.median(
            b["cpu_us_per_file"] / x["cpu_us_per_file"] for x, b in zip(runs[name], base)), 3)
    return out


# ---- setup -------------------------------------------------------------------------------------

def prepare(work: Path, per_class: int) -> tuple[Path, Path]:
    return demo_store(work, per_class, workers=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-nofuse")
    p.add_argument("--per-class", type=int, default=125, help="demo photos per class (8 classes)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--raw-rounds", type=int, default=7)
    p.add_argument("--raw-passes", type=int, default=10, help="passes over all files per measurement")
    p.add_argument("--skip-epochs", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_nofuse.json")
    args = p.parse_args()
    run = Run("tools/bench_nofuse.py", packages=("torch", "torchvision", "pillow"))

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src, store = prepare(work, args.per_class)
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    if is_mounted(mnt):
        p.error(f"{mnt} is mounted; unmount it first")
    with open_store(store) as s:
        n_images, n_groups = s.num_images, s.num_groups
    warm(sorted((store / "records").iterdir()))
    warm(sorted(q for q in src.rglob("*") if q.is_file()))

    doc = {"argv": sys.argv[1:], "date": run.started.isoformat(timespec="seconds"),
           "images": n_images, "groups": n_groups, "workers": args.workers, "batch": args.batch,
           "load_start": loadavg()}

    log("raw read rate: reader API vs dataset bytes vs fsspec cat_file")
    raw = {}
    for view in EPOCH_VIEWS:
        raw[view] = raw_reads(store, view, args.raw_rounds, args.raw_passes)
        log(f"  {view}: reader {raw[view]['reader_api']['files_per_s']}/s, dataset "
            f"{raw[view]['dataset_read_bytes']['ratio_files_per_s']}x, fsspec "
            f"{raw[view]['fsspec_cat_file']['ratio_files_per_s']}x (load {loadavg()})")
    doc["raw_read"] = raw

    try:
        epochs(doc, store, src, mnt, args)
    finally:
        CLEANUP.all()
    doc["load_end"] = loadavg()
    write_json(args.out, run.doc(**doc))
    return 0


def epochs(doc: dict, store: Path, src: Path, mnt: Path, args) -> None:
    """The interleaved epoch rounds (unless --skip-epochs) into ``doc["epochs"]``."""
    if not args.skip_epochs:
        runs: dict[str, list[dict]] = {f"{v}/{view}": [] for view in EPOCH_VIEWS for v in ("dataset", "mount")}
        runs["baseline/-"] = []
        log("warm-up epoch (code, page cache)")
        run_variant("baseline", "-", store, src, mnt, args)
        for r in range(args.rounds):
            # views rotate; within a view the dataset goes first in even rounds, the mount in
            # odd ones (ABBA), so neither always runs right after the other
            views = EPOCH_VIEWS[r % len(EPOCH_VIEWS):] + EPOCH_VIEWS[:r % len(EPOCH_VIEWS)]
            pair = ("dataset", "mount") if r % 2 == 0 else ("mount", "dataset")
            order = [(v, view) for view in views for v in pair]
            order.insert(r % (len(order) + 1), ("baseline", "-"))
            for v, view in order:
                res = run_variant(v, view, store, src, mnt, args)
                res["round"] = r
                runs[f"{v}/{view}"].append(res)
                log(f"  round {r} {v:8s} {view:5s}: {res['seconds']:7.2f}s  {res['images_per_s']:7.1f} img/s  "
                    f"{res['cpu_ms_per_image']:6.2f} ms CPU/img  load {res['load_before']}")
        summary = {}
        for key, rs in runs.items():
            summary[key] = {"median_seconds": statistics.median(x["seconds"] for x in rs),
                            "median_images_per_s": statistics.median(x["images_per_s"] for x in rs),
                            "median_cpu_ms_per_image": statistics.median(x["cpu_ms_per_image"] for x in rs)}
        ratios = {}
        for view in EPOCH_VIEWS:
            d, m = runs[f"dataset/{view}"], runs[f"mount/{view}"]
            per_round = [round(b["seconds"] / a["seconds"], 3) for a, b in zip(d, m)]
            ratios[view] = {
                "dataset_speed_over_mount_per_round": per_round,
                "dataset_speed_over_mount_median": statistics.median(per_round),
                "dataset_cpu_saving_over_mount": round(summary[f"mount/{view}"]["median_cpu_ms_per_image"]
                                                       / summary[f"dataset/{view}"]["median_cpu_ms_per_image"], 3),
                "dataset_speed_over_baseline_median": round(summary["baseline/-"]["median_seconds"]
                                                            / summary[f"dataset/{view}"]["median_seconds"], 3),
            }
        doc["epochs"] = {"runs": runs, "summary": summary, "ratios": ratios}


if __name__ == "__main__":
    sys.exit(main())
