#!/usr/bin/env python3
"""CPU per read, old package vs new, in one run (issue 28: "CPU per read unchanged within noise").

The read path was restructured in 4bdf188 ("read tiers made explicit"; its parent is 39e8223,
ad1a0b3 is three commits earlier). This tool measures the CPU one read costs with the pcrfs of
one or more git revisions (``--before``, each extracted under the work directory with its
compiled extension built in place) and with the checkout's (``--after``, default a copy of the
checkout's ``pcrfs/`` as it is on disk when the run starts, its extension built from that copy:
others may edit or commit meanwhile), side by side. Every variant runs in its own processes, whose
``PYTHONPATH`` names its tree (each checks which pcrfs it imported). Within a round the
variants take turns pass by pass, a few milliseconds apart (the order rotates every pass and
every round), so a busy spell of the shared machine falls on all of them alike:

* ``local_python`` -- one process per variant and round (``benchlib.turns``), the local store
  open: ``Store.read_at`` of whole files, ``scan5`` and ``full``, every image in a shuffled
  order (the same for every variant), page cache warm and one untimed pass per view first;
  CPU per file from ``time.process_time()``; ``--passes`` passes per round, their median.
* ``mount`` -- each variant's own ``pcrfs mount`` (its CLI, its daemon, its compiled read
  path), all variants mounted at once, ``--mount-passes`` fresh mounts per round (nothing in
  the kernel's cache): every ``scan1`` file read first, untimed (a record's first read goes to
  Python, which hands the compiled path the record's descriptor), the views listed and stat'ed
  (untimed), then every file of ``scan5`` and of ``full`` read once in a shuffled order, the
  variants in turn; the daemon's CPU per file is the sum of its threads'
  ``/proc/PID/task/*/schedstat`` (ns; the 10 ms ticks of /proc/PID/stat are recorded too);
  the mount's stats must show every timed read served by the compiled path (``fastpath.reads``).
* ``remote`` -- the store on s3rver on 127.0.0.1 (no link proxy), one process per variant and
  round: per pass a fresh store (memory cache 256 MiB, readahead off, record prefixes on), then
  ``Store.read_at`` of whole ``scan5`` files in kernel-sized pieces (128 KiB), shuffled: epoch 1
  fetches the record prefixes, epoch 2 reads memory; CPU per image from
  ``time.process_time()`` (every thread: the S3 client's too); one untimed pass first.

Each round gives one value per (metric, variant): the median of its passes. The result has
every pass, every round's values with their median and range, and new/old ratios: of the
medians, and per round (the same round's new over old: their median and range).

    python tools/bench_read_cpu.py                       # --before 4bdf188~1,ad1a0b3 --rounds 5
    python tools/bench_read_cpu.py --before ad1a0b3 --rounds 3 --passes 3 --per-class 40

Writes ``results/bench_read_cpu.json``.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

SERVE = "--serve"
PIECE = 128 << 10  # the kernel's read size through a mount


# ---- the child: one variant's pcrfs (from PYTHONPATH), answering one pass at a time -----------------

def _check_import(tree: str) -> str:
    import pcrfs

    where = os.path.realpath(pcrfs.__file__)
    if not where.startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"imported pcrfs from {where}, not from {tree}")
    return where


def _warm(store: str) -> None:
    for root, _dirs, files in os.walk(store):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 22):
                    pass


def _k_of(store, view: str) -> int:
    return store.num_groups if view == "full" else int(view[4:])


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _reader():
    """(ReadOptions, open_store) of the variant's pcrfs, before or after the store's split into
    subpackages (f036d8a moved pcrfs/store/reader.py to pcrfs/store/read/reader.py)."""
    try:
        from pcrfs.store.read.reader import ReadOptions, open_store
    except ImportError:
        from pcrfs.store.reader import ReadOptions, open_store  # type: ignore[no-redef]
    return ReadOptions, open_store


def local_reader(config: dict):
    """The local store kept open; ``pass(view, seed)``: CPU µs per file of one pass of whole files."""
    _, open_store = _reader()

    _warm(config["store"])
    s = open_store(config["store"])
    sizes = {v: [s.size(i, _k_of(s, v)) for i in range(s.num_images)] for v in config["views"]}

    def one_pass(req: dict) -> dict:
        view = req["view"]
        k, size = _k_of(s, view), sizes[view]
        jobs = [(i, size[i]) for i in _shuffled(s.num_images, req["seed"])]
        c0 = time.process_time()
        for i, n in jobs:
            s.read_at(i, k, 0, n)
        return {"us": round(1e6 * (time.process_time() - c0) / len(jobs), 2)}

    for v in config["views"]:
        one_pass({"view": v, "seed": -1})  # untimed
    return one_pass, {"images": s.num_images, "direct": getattr(s, "_direct", None),
                      "tiers": s.io_stats().get("tiers")}


def _epoch_us(s, k: int, order: list[int]) -> float:
    jobs = [(i, s.size(i, k)) for i in order]
    c0 = time.process_time()
    for i, size in jobs:
        for off in range(0, size, PIECE):
            s.read_at(i, k, off, min(PIECE, size - off))
    return round(1e6 * (time.process_time() - c0) / len(jobs), 2)


def remote_reader(config: dict):
    """``epochs(seed)``: a fresh store of the s3:// URL, epoch 1 and epoch 2, CPU µs per image each."""
    from pcrfs.remote.fs import RemoteOptions
    ReadOptions, open_store = _reader()

    opts = ReadOptions(remote=RemoteOptions(endpoint_url=config["endpoint"]), cache_bytes=256 << 20,
                       readahead_bytes=0, record_prefix=True)

    def epochs(req: dict) -> dict:
        with open_store(config["url"], options=opts) as s:
            k = _k_of(s, config["view"])
            e1 = _epoch_us(s, k, _shuffled(s.num_images, req["seed"]))
            e2 = _epoch_us(s, k, _shuffled(s.num_images, req["seed"] + 500))
            io = s.io_stats()
        return {"epoch1_us": e1, "epoch2_us": e2, "requests": io["source"]["requests"],
                "bytes": io["source"]["bytes"], "record_prefix": io.get("record_prefix"), "tiers": io.get("tiers")}

    first = epochs({"seed": -1})  # untimed: imports, the client's first connections
    return epochs, {"first": first}


def serve(config: dict) -> int:
    """Say ready, then answer one JSON request per stdin line until EOF."""
    where = _check_import(config["tree"])
    handle, info = (local_reader if config["path"] == "local_python" else remote_reader)(config)
    print(json.dumps({"ready": True, "pcrfs_file": where, **info}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(handle(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == SERVE:
    sys.exit(serve(json.loads(sys.argv[2])))


# ---- the run ---------------------------------------------------------------------------------------

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchlib import REPO, log  # noqa: E402
from benchlib.data import demo_store  # noqa: E402
from benchlib.machine import source_state  # noqa: E402
from benchlib.mounts import CLEANUP, on_signals  # noqa: E402
from benchlib.proc import cpu_s, loadavg, threads_cpu_s  # noqa: E402
from benchlib.reads import walk, warm  # noqa: E402
from benchlib.remote import BUCKET, S3RVER_ENV, S3rver, store_files, upload  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402
from benchlib.revisions import CHECKOUT, RevisionMount, code_tree, commit_of, describe, env_for, tree_sha1  # noqa: E402
from benchlib.turns import Child  # noqa: E402

PATHS = ("local_python", "mount", "remote")
WARM_VIEW = "scan1"  # read through each fresh mount before the timed views


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="4bdf188~1,ad1a0b3",
                   help="git revision(s) of the old package, comma-separated (default: 4bdf188's parent "
                        "39e8223, and ad1a0b3)")
    p.add_argument("--after", default=CHECKOUT,
                   help=f"the new package: '{CHECKOUT}' (a copy of it as on disk at the start) or a revision")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", type=int, default=5, help="timed passes per variant and round (local, remote)")
    p.add_argument("--mount-passes", type=int, default=3, help="fresh mounts per variant and round")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--views", default="scan5,full", help="views of local_python and mount")
    p.add_argument("--remote-view", default="scan5")
    p.add_argument("--per-class", type=int, default=164, help="demo photos per class (8 classes): 1,312")
    p.add_argument("--record-size", default="4M")
    p.add_argument("--store", type=Path, default=None, help="a local store to use instead of the demo's")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-bench-read-cpu")
    p.add_argument("--npm-cache", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-npm-s3rver")
    p.add_argument("--out", type=Path, default=REPO / "results" / "bench_read_cpu.json")
    return p.parse_args()


def variants_of(args: argparse.Namespace) -> dict[str, dict]:
    """name -> {revision, commit, tree, imports}: the old packages first, the new one last."""
    out: dict[str, dict] = {}
    for rev in [r for r in args.before.split(",") if r] + [args.after]:
        commit = None if rev == CHECKOUT else commit_of(rev)
        name = CHECKOUT if rev == CHECKOUT else commit[:7]
        state = source_state() if rev == CHECKOUT else None  # what the copy was taken from
        tree = code_tree(rev, args.workdir)
        out[name] = {"revision": rev, "commit": commit, "tree": str(tree), "tree_sha1": tree_sha1(tree),
                     "imports": describe(tree)}
        if state is not None:
            out[name]["copied_from"] = state
        log(f"{name}: {out[name]['imports']}")
    return out


def rotated(names: list[str], by: int) -> list[str]:
    by %= len(names)
    return names[by:] + names[:by]


def take_turns(ctx: dict, config: dict, requests: list[dict], rnd: int, env: dict | None = None) -> dict:
    """One child per variant (``config``, ``PYTHONPATH`` its tree); the requests in turn, each
    to every variant (order rotating): name -> {"ready", "answers" (one per request)}."""
    names = list(ctx["variants"])
    children: dict[str, Child] = {}
    try:
        for name in names:
            tree = ctx["variants"][name]["tree"]
            argv = [sys.executable, os.path.abspath(__file__), SERVE, json.dumps(dict(config, tree=tree))]
            children[name] = Child(argv, env_for(Path(tree), env),
                                   ctx["args"].workdir / "logs" / f"{config['path']}-{name}.log")
        out = {n: {"ready": c.ready, "answers": []} for n, c in children.items()}
        for j, req in enumerate(requests):
            for name in rotated(names, rnd + j):
                out[name]["answers"].append(dict(children[name].ask(req), **req))
    finally:
        for c in children.values():
            c.close()
    return out


def local_round(ctx: dict, rnd: int) -> dict:
    a = ctx["args"]
    config = {"path": "local_python", "store": str(ctx["store"]), "views": ctx["views"]}
    requests = [{"view": v, "seed": 1000 * rnd + p} for p in range(a.passes) for v in ctx["views"]]
    return take_turns(ctx, config, requests, rnd)


def remote_round(ctx: dict, rnd: int) -> dict:
    a = ctx["args"]
    config = {"path": "remote", "url": ctx["url"], "endpoint": ctx["endpoint"], "view": a.remote_view}
    env = dict(os.environ, **S3RVER_ENV, XDG_CACHE_HOME=str(a.workdir / "xdg"))
    return take_turns(ctx, config, [{"seed": 1000 * rnd + p} for p in range(a.passes)], rnd, env)


def read_files(paths: list[str]) -> int:
    nbytes = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1 << 20):
                nbytes += len(chunk)
        finally:
            os.close(fd)
    return nbytes


def _fast(m: RevisionMount) -> dict:
    f = m.stats().get("fastpath") or {}
    return {"reads": f.get("reads", 0), "python_reads": f.get("python_reads", 0)}


def warm_mount(m: RevisionMount) -> dict:
    """Every ``WARM_VIEW`` file read once (untimed): the reads each path served."""
    root = os.path.join(m.mp, WARM_VIEW)
    f0 = _fast(m)
    read_files([os.path.join(root, p) for p in walk(root)])
    return {k: v - f0[k] for k, v in _fast(m).items()}


def listed(m: RevisionMount, view: str, seed: int) -> list[str]:
    """The files of ``view``, listed and stat'ed (the kernel keeps their entries), shuffled."""
    root = os.path.join(m.mp, view)
    paths = [os.path.join(root, p) for p in walk(root)]
    for p in paths:
        os.stat(p)
    random.Random(seed).shuffle(paths)
    return paths


def mount_view(m: RevisionMount, paths: list[str]) -> dict:
    """Every file of ``paths`` read once through the mount: the daemon's CPU and the reader's per file."""
    f0 = _fast(m)
    d0, t0, r0, w0 = threads_cpu_s(m.pid), cpu_s(m.pid), time.process_time(), time.perf_counter()
    nbytes = read_files(paths)
    wall = time.perf_counter() - w0
    d1, t1, r1 = threads_cpu_s(m.pid), cpu_s(m.pid), time.process_time()
    f1, n = _fast(m), len(paths)
    row = {"files": n, "bytes": nbytes, "wall_s": round(wall, 3),
           "daemon_us": round(1e6 * (d1 - d0) / n, 2), "daemon_ticks_us": round(1e6 * (t1 - t0) / n, 2),
           "reader_us": round(1e6 * (r1 - r0) / n, 2),
           "fastpath_reads": f1["reads"] - f0["reads"], "python_reads": f1["python_reads"] - f0["python_reads"]}
    if row["fastpath_reads"] < n or row["python_reads"]:
        log(f"WARNING: {paths[0]} ... through {m.tree}: {row['fastpath_reads']} compiled reads, "
            f"{row['python_reads']} Python reads for {n} files")
    return row


def mount_pass(ctx: dict, order: list[str], seed: int) -> dict:
    """Every variant mounted afresh at once; the views read through each in turn."""
    work, store = ctx["args"].workdir, ctx["store"]
    out: dict = {n: {"views": {}} for n in order}
    with contextlib.ExitStack() as stack:
        mounts = {n: stack.enter_context(RevisionMount(Path(ctx["variants"][n]["tree"]), store, work / "mnt" / n,
                                                        work / "logs" / f"mount-{n}.log")) for n in order}
        for n in order:
            out[n]["warm_view"] = {WARM_VIEW: warm_mount(mounts[n])}
        for view in ctx["views"]:
            paths = {n: listed(mounts[n], view, seed) for n in order}
            for n in order:
                out[n]["views"][view] = mount_view(mounts[n], paths[n])
        for n in order:
            out[n]["served_by"] = "compiled" if "fastpath" in mounts[n].stats() else "python"
    return out


def mount_round(ctx: dict, rnd: int) -> dict:
    names = list(ctx["variants"])
    out: dict = {n: {"passes": []} for n in names}
    warm(ctx["store"])
    for p in range(ctx["args"].mount_passes):
        for n, row in mount_pass(ctx, rotated(names, rnd + p), 1000 * rnd + p).items():
            out[n]["passes"].append(row)
    return out


ROUND = {"local_python": local_round, "mount": mount_round, "remote": remote_round}


def values_of(path: str, raw: dict, views: list[str]) -> dict[str, dict[str, float]]:
    """metric -> variant -> CPU µs per file: the median of the round's passes."""
    out: dict[str, dict[str, float]] = {}
    for name, r in raw.items():
        if path == "local_python":
            vals = {f"local_python.{v}": [a["us"] for a in r["answers"] if a["view"] == v] for v in views}
        elif path == "mount":
            vals = {f"mount.{v}.daemon": [p["views"][v]["daemon_us"] for p in r["passes"]] for v in views}
        else:
            vals = {f"remote.{e}": [a[f"{e}_us"] for a in r["answers"]] for e in ("epoch1", "epoch2")}
        for metric, xs in vals.items():
            out.setdefault(metric, {})[name] = round(statistics.median(xs), 2)
    return out


def run_rounds(ctx: dict, paths: list[str]) -> list[dict]:
    names = list(ctx["variants"])
    rounds = []
    for rnd in range(ctx["args"].rounds):
        row: dict = {"round": rnd, "first_order": rotated(names, rnd), "loadavg_start": loadavg(),
                     "values": {}, "raw": {}}
        for path in paths:
            row["raw"][path] = ROUND[path](ctx, rnd)
            row["values"].update(values_of(path, row["raw"][path], ctx["views"]))
        row["loadavg_end"] = loadavg()
        log(f"round {rnd + 1}/{ctx['args'].rounds}, load {row['loadavg_end'][0]} ({' / '.join(names)}): "
            + "; ".join(f"{m} " + " ".join(f"{v:.1f}" for v in vals.values()) for m, vals in row["values"].items()))
        rounds.append(row)
    return rounds


def _spread(values: list[float]) -> dict:
    return {"values": values, "median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}


def summarize(rounds: list[dict], names: list[str]) -> tuple[dict, dict]:
    """Per metric and variant: the rounds' values, median and range; and new/old ratios for each old
    variant: of the medians, and per round (new over old of the same round)."""
    new, olds = names[-1], names[:-1]
    summary: dict = {}
    ratios: dict = {}
    for metric in rounds[0]["values"]:
        per = {n: [r["values"][metric][n] for r in rounds] for n in names}
        summary[metric] = {n: _spread(per[n]) for n in names}
        for old in olds:
            per_round = [round(a / b, 4) for a, b in zip(per[new], per[old])]
            ratios.setdefault(metric, {})[f"{new}/{old}"] = {
                "of_medians": round(statistics.median(per[new]) / statistics.median(per[old]), 4),
                "per_round": _spread(per_round)}
    return summary, ratios


def prepare_store(args: argparse.Namespace) -> Path:
    from pcrfs.units import parse_size

    if args.store is not None:
        return args.store
    _, store = demo_store(args.workdir / f"demo-{args.per_class}", args.per_class, f"store-{args.record_size}.pcr",
                          record_bytes=parse_size(args.record_size), workers=2)
    return store


def store_facts(store: Path, args: argparse.Namespace) -> dict:
    from pcrfs.store.read.reader import open_store

    with open_store(store) as s:
        facts = {"path": str(store), "images": s.num_images, "records": len(s.index.records),
                 "groups": s.num_groups, "shuffled": bool(s.index.shuffled),
                 "bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file())}
    if args.store is None and facts["images"] != 8 * args.per_class:
        raise SystemExit(f"{store} holds {facts['images']} images, not 8 x {args.per_class}: remove it")
    return facts


def start_remote(args: argparse.Namespace, store: Path) -> tuple[S3rver, str]:
    """s3rver on 127.0.0.1 with the store uploaded: (server, the store's URL)."""
    os.environ.update(S3RVER_ENV)
    shutil.rmtree(args.workdir / "s3rver", ignore_errors=True)
    shutil.rmtree(args.workdir / "xdg", ignore_errors=True)
    server = S3rver(args.npm_cache, args.workdir / "s3rver", args.workdir / "logs" / "s3rver.log")
    try:
        upload(store_files(store, "cpu.pcr"), server.endpoint)
    except BaseException:
        server.stop()
        raise
    return server, f"s3://{BUCKET}/cpu.pcr"


def table(summary: dict, ratios: dict, names: list[str]) -> str:
    lines = [f"{'metric (CPU µs/file)':22s} " + " ".join(f"{n:>9s}" for n in names)
             + "   new/old: per-round median (range)"]
    for metric, per in summary.items():
        cells = " ".join(f"{per[n]['median']:9.1f}" for n in names)
        rs = "; ".join(f"/{k.split('/')[1]} {v['per_round']['median']:.3f} ({v['per_round']['min']:.3f}-"
                       f"{v['per_round']['max']:.3f})" for k, v in ratios[metric].items())
        lines.append(f"{metric:22s} {cells}   {rs}")
    return "\n".join(lines) + f"\n(new = {names[-1]})"


def measure(args: argparse.Namespace, paths: list[str]) -> tuple[dict, list[dict]]:
    """The variants, the store, and the rounds (s3rver running for the remote path)."""
    ctx = {"args": args, "variants": variants_of(args), "store": prepare_store(args),
           "views": [v for v in args.views.split(",") if v]}
    ctx["store_facts"] = store_facts(ctx["store"], args)
    server = None
    try:
        if "remote" in paths:
            server, ctx["url"] = start_remote(args, ctx["store"])
            ctx["endpoint"] = server.endpoint
        rounds = run_rounds(ctx, paths)
    finally:
        CLEANUP.all()
        if server is not None:
            server.stop()
    return ctx, rounds


def main() -> int:
    args = parse_args()
    on_signals()
    run = Run("tools/bench_read_cpu.py")
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    paths = [p for p in args.paths.split(",") if p]
    ctx, rounds = measure(args, paths)
    names = list(ctx["variants"])
    summary, ratios = summarize(rounds, names)
    doc = run.doc(benchmark="bench_read_cpu", unit="CPU µs per file (image)", variants=ctx["variants"],
                  new=names[-1], store=ctx["store_facts"],
                  setting={"rounds": args.rounds, "passes": args.passes, "mount_passes": args.mount_passes,
                           "views": ctx["views"], "remote_view": args.remote_view, "mount_warm_view": WARM_VIEW,
                           "piece_bytes": PIECE, "server": "s3rver 3.7.1",
                           "s3_client": os.environ.get("PCRFS_S3_CLIENT") or "default"},
                  loadavg_rounds=[[r["loadavg_start"][0], r["loadavg_end"][0]] for r in rounds],
                  summary=summary, ratios=ratios, rounds=rounds)
    write_json(args.out, doc)
    print(table(summary, ratios, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
