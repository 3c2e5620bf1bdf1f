"""FUSE-free epochs from object storage with several DataLoader workers (issue 25): what each
worker costs the link.

``pcrfs.torch.ImageFolder(s3://...)`` opens one store per DataLoader worker. Before issue 25
each kept its own record-prefix cache, so with 2 workers every record prefix crossed the
link twice; now the workers of a node share one (:mod:`pcrfs.store.sources.sharedcache`). This
tool measures both in one run, side by side: the same epochs through the same link, once
with the checkout's pcrfs and once with the pcrfs of ``--before`` (a git revision, its
``pcrfs/`` extracted under the work directory), each epoch in a fresh process.

The setting (as ``tools/bench_remote_epoch.py``): s3rver behind the counting link proxy
(``--latency`` per request, ``--rate`` bytes/s shared), the demo photos in records of
``--record-size``; the store's index is fetched once beforehand (cached locally), so the
link carries records only, plus one manifest GET per process. Configurations, each with
1 and 2 workers (``--workers``):

* ``shuffle`` -- ``shuffle=True``, default storage options (a memory cache of 64 MiB per
  store, more than the view: every record prefix on first read, then the view ahead);
* ``sampler`` -- ``RecordShuffleSampler`` with ``cache_bytes=--sampler-cache`` and
  ``readahead_bytes=0`` in the storage options of both (the view >= 3x the cache: a
  window of records at a time; ``--sampler-window``, else the window the cache fits).
  Run a third time with ``ImageFolder.fetch_ahead(sampler)`` (``after+ahead``: the
  records the sampler's order needs next fetched in the training process's thread).

Per epoch: images, seconds, link GETs (all, and of record files) per image, bytes over the
link per byte of the view. ``--loader bytes`` reads the files only (what the link costs);
``decode`` adds PIL + ``RandomResizedCrop(224)`` + ``ToTensor``.

    python tools/bench_nofuse_workers.py --before f0f46da~1
    python tools/bench_nofuse_workers.py --before f0f46da~1 --per-class 40 --record-size 1M  # a quick look

Writes ``results/bench_nofuse_workers.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CHILD = "--child"


# ---- one epoch, in a fresh process whose pcrfs comes from PYTHONPATH -------------------------------

def child(config: dict) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from pcrfs.access.sampling import RecordShuffleSampler
    from pcrfs.access.torch import ImageFolder

    opts = dict(config["storage_options"])
    loader = None if config["loader"] == "decode" else _size_of
    kwargs = {} if config.get("shared") is None else {"shared_cache": config["shared"]}
    transform = _transform() if config["loader"] == "decode" else None
    ds = ImageFolder(config["url"], view=config["view"], loader=loader, transform=transform,
                     storage_options=opts, **kwargs)
    sampler = None
    if config["order"] == "sampler":
        sampler = RecordShuffleSampler(config["url"], view=config["view"], seed=0, window=config.get("window"),
                                       cache_bytes=opts.get("cache_bytes"), storage_options=opts)
        sampler.set_epoch(1)
    ahead = ds.fetch_ahead(sampler) if config.get("ahead") else None
    dl = DataLoader(ds, batch_size=config["batch"], shuffle=sampler is None, sampler=sampler,
                    num_workers=config["workers"], generator=torch.Generator().manual_seed(1),
                    collate_fn=_count if config["loader"] == "bytes" else None)
    t0 = time.perf_counter()
    n = 0
    first = None
    for batch in dl:
        n += batch if isinstance(batch, int) else batch[0].shape[0]
        first = first or round(time.perf_counter() - t0, 3)
    out = {"images": n, "seconds": round(time.perf_counter() - t0, 3), "first_batch_s": first}
    if ahead is not None:
        ahead.close()
        out["fetched_ahead"] = ahead.submitted
    if sampler is not None:
        out["window"] = sampler.window
    return out


def _size_of(f) -> int:
    return len(f.read())


def _count(batch: list) -> int:
    return len(batch)


def _transform():
    from torchvision import transforms

    return transforms.Compose([transforms.RandomResizedCrop(224), transforms.ToTensor()])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == CHILD:
    print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    sys.exit(0)


# ---- the run ---------------------------------------------------------------------------------------

import argparse  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchlib import REPO, log  # noqa: E402
from benchlib.data import demo_store  # noqa: E402
from benchlib.proc import loadavg  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, LinkProxy, S3rver, store_files, upload  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402


def extract(rev: str, work: Path) -> Path:
    """The ``pcrfs/`` package of git revision ``rev``, under ``work`` (made once per commit)."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    dest = work / f"pcrfs-{commit[:12]}"
    if not (dest / "pcrfs" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pcrfs"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_epoch(code: Path, config: dict, proxy: LinkProxy, env: dict) -> dict:
    before = proxy.counts()
    res = subprocess.run([sys.executable, __file__, CHILD, json.dumps(config)], capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(code)), timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"epoch failed ({config}):\n{res.stderr[-3000:]}")
    after = proxy.counts()
    row = json.loads(res.stdout.strip().splitlines()[-1])
    row["link"] = {k: after[k] - before[k] for k in after}
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision whose pcrfs is the baseline (e.g. f0f46da~1)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-nofuse-workers")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--per-class", type=int, default=164, help="demo photos per class (8 classes): 1,312")
    p.add_argument("--record-size", default="4M")
    p.add_argument("--latency", type=float, default=0.020)
    p.add_argument("--rate", type=float, default=4e6)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--view", default="scan5")
    p.add_argument("--orders", default="shuffle,sampler")
    p.add_argument("--sampler-cache", default="8M", help="cache_bytes of the sampler runs (readahead off)")
    p.add_argument("--sampler-window", type=int, default=None,
                   help="the sampler's window (default: what the cache fits; fewer leaves room for the "
                        "loader's batches in flight)")
    p.add_argument("--loader", choices=["bytes", "decode"], default="bytes")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_nofuse_workers.json")
    p.add_argument("--key", default=None, help="write the run under this key of --out, keeping the others")
    return p.parse_args()


def store_facts(store: Path, view: str) -> dict:
    """The local store's images and records, whether it is shuffled, and the bytes of ``view``."""
    from pcrfs.store.read.prefixpolicy import group_bounds
    from pcrfs.store.read.reader import open_store

    k = int(view[4:])
    with open_store(store) as s:
        b = group_bounds(s.index.record_group_offsets, s.index.records["size"])
        return {"images": s.num_images, "records": len(s.index.records),
                "view_bytes": int((b[:, k] - b[:, 0]).sum()), "shuffled": bool(s.index.shuffled)}


def fetch_index(url: str, endpoint: str) -> None:
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.store.read.reader import ReadOptions, open_store

    with open_store(url, options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint))):
        pass  # the index, fetched once into the cache directory every epoch's process reads it from


def epoch_row(code: Path, config: dict, variant: str, proxy: LinkProxy, env: dict, view_bytes: int) -> dict:
    """One epoch of ``config`` with the pcrfs under ``code``: its figures and the link's per image."""
    row = run_epoch(code, config, proxy, env)
    link = row["link"]
    row.update(variant=variant, order=config["order"], workers=config["workers"], loadavg=loadavg()[0],
               gets_per_image=round(link["gets"] / max(row["images"], 1), 4),
               record_gets_per_image=round(link["record_gets"] / max(row["images"], 1), 4),
               bytes_per_view=round(link["bytes"] / view_bytes, 3))
    log(f"{config['order']:7s} {config['workers']} worker(s) {variant:11s}: {row['seconds']:6.1f} s  "
        f"{link['record_gets']:4d} record GETs ({row['record_gets_per_image']:.3f}/image)  "
        f"{link['bytes'] / 1e6:6.1f} MB = {row['bytes_per_view']:.2f}x the view")
    return row


def run_epochs(args: argparse.Namespace, url: str, codes: dict[str, Path], proxy: LinkProxy, env: dict,
               view_bytes: int, sampler_cache: int) -> list[dict]:
    """Every order and worker count, before and after (and after+ahead for the sampler)."""
    rows = []
    for order in args.orders.split(","):
        opts = {"endpoint_url": proxy.endpoint}
        if order == "sampler":
            opts.update(cache_bytes=sampler_cache, readahead_bytes=0)
        for workers in [int(w) for w in args.workers.split(",")]:
            for variant in ("before", "after") + (("after+ahead",) if order == "sampler" else ()):
                config = {"url": url, "view": args.view, "workers": workers, "batch": args.batch,
                          "order": order, "storage_options": opts, "loader": args.loader,
                          "window": args.sampler_window, "ahead": variant == "after+ahead"}
                rows.append(epoch_row(codes[variant.split("+")[0]], config, variant, proxy, env, view_bytes))
    return rows


def main() -> int:
    args = parse_args()
    from pcrfs.units import parse_size

    run = Run("tools/bench_nofuse_workers.py", packages=("torch", "torchvision"))
    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    record_size, sampler_cache = parse_size(args.record_size), parse_size(args.sampler_cache)
    _, store = demo_store(work, args.per_class, f"store-{args.record_size}.pcr", record_bytes=record_size, workers=2)
    facts = store_facts(store, args.view)
    codes = {"before": extract(args.before, work), "after": REPO}
    env = dict(os.environ, **S3RVER_ENV, XDG_CACHE_HOME=str(work / "xdg-cache"))
    os.environ.update(S3RVER_ENV)
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    shutil.rmtree(work / "s3rver", ignore_errors=True)
    server = S3rver(args.npm_cache, work / "s3rver", work / "logs" / "s3rver.log")
    proxy = None
    try:
        upload(store_files(store, "store.pcr"), server.endpoint)
        proxy = LinkProxy(server.port, args.latency, args.rate, work / "logs" / "link.log")
        url = f"s3://{BUCKET}/store.pcr"
        fetch_index(url, proxy.endpoint)
        rows = run_epochs(args, url, codes, proxy, env, facts["view_bytes"], sampler_cache)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    doc = run.doc(**{
        "benchmark": "bench_nofuse_workers",
        "before": {"revision": args.before, "code": str(codes["before"])},
        "setting": {"latency_s": args.latency, "rate_bytes_s": args.rate, "images": facts["images"],
                    "records": facts["records"], "record_size": record_size, "shuffled_store": facts["shuffled"],
                    "view": args.view, "view_bytes": facts["view_bytes"], "batch": args.batch,
                    "sampler_cache": sampler_cache, "sampler_window": args.sampler_window,
                    "loader": args.loader, "server": "s3rver 3.7.1"},
        "rows": rows,
        "side_by_side": side_by_side(rows),
    })
    write_json(args.out, doc, key=args.key)
    print(json.dumps(doc["side_by_side"], indent=1))
    return 0


def side_by_side(rows: list[dict]) -> list[dict]:
    """One line per (order, workers): before and after next to each other."""
    out = []
    for order in dict.fromkeys(r["order"] for r in rows):
        for workers in dict.fromkeys(r["workers"] for r in rows if r["order"] == order):
            line: dict = {"order": order, "workers": workers}
            for r in rows:
                if r["order"] == order and r["workers"] == workers:
                    v = r["variant"]
                    line[f"{v}_record_gets"] = r["link"]["record_gets"]
                    line[f"{v}_gets_per_image"] = r["gets_per_image"]
                    line[f"{v}_bytes_per_view"] = r["bytes_per_view"]
                    line[f"{v}_seconds"] = r["seconds"]
            out.append(line)
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    sys.exit(main())
