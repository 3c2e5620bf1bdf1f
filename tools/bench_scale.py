#!/usr/bin/env python3
"""ImageNet-scale metadata benchmark: mount time, daemon memory, listing and walk speed.

For each entry count (default 10k, 100k, 1,281,167) it builds a scale store
(tools/make_scale_store.py) and, side by side in one run, a plain tmpfs tree
with the same names (empty files), then measures:

* `pcrfs info` and `open_store` time, `pcrfs mount` until ready;
* daemon RSS right after mount and after listing every directory of one view;
* `ls -l` of one class folder, `os.walk` of a whole view and
  `torchvision.datasets.ImageFolder` construction, each vs the plain tree;
* index size on disk per image (with and without names).

``--orders`` picks the storage orders of the scale stores (``make_scale_store --order``:
``source`` a version-1 store, ``shuffled`` a version-2 one with ``storage_order.npy``); each
size measures every order against the same plain tree, one after the other.

``--rounds N`` then measures, N times per store, the mount time, a walk of two views (each
against a walk of the tmpfs tree just before it), the daemon's CPU per entry over each
walk (/proc) and its RSS; with ``--baseline-tree DIR`` (another pcrfs source tree with its
extension built in place, e.g. ``git archive OLD | tar -x -C DIR && cd DIR && python
setup.py build_ext --inplace``) each round does that for DIR's pcrfs and this checkout's in
turn, the order alternating, so old and new are compared on the same machine state
(``side_by_side`` in the JSON, with medians and ranges per tree).

    python tools/bench_scale.py                      # writes results/bench_scale.{json,png}
    python tools/bench_scale.py --sizes 10000 100000 # quicker
    python tools/bench_scale.py --sizes 100000 1281167 --orders source,shuffled   # both formats
    python tools/bench_scale.py --sizes 1281167 --mount-repeats 3 --rounds 4 --baseline-tree /tmp/old
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchlib import REPO as ROOT  # noqa: E402  (puts the checkout first on sys.path)
from benchlib import log  # noqa: E402
from benchlib.mounts import CLEANUP, daemon_pid, is_mounted, unmount_pcrfs  # noqa: E402
from benchlib.plots import pyplot, save  # noqa: E402
from benchlib.proc import cpu_s  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

import pcrfs  # noqa: E402
from make_scale_store import make_scale_store  # noqa: E402

PCRFS = [sys.executable, "-m", "pcrfs.cli"]  # the checkout's CLI (a `pcrfs` on PATH may be another install)

NAMES_FILES = ("paths.bin", "path_offsets.npy", "dirs.bin", "dir_offsets.npy")


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def plain_tree(store, dest: Path) -> None:
    """Empty files with the store's names, on tmpfs: the fastest a directory tree gets."""
    made = set()
    for path in store.paths():
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(dest / parent, exist_ok=True)
            made.add(parent)
        os.close(os.open(dest / path, os.O_CREAT | os.O_WRONLY, 0o644))


def walk_count(top: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for _, _, files in os.walk(top):
        n += len(files)
    return time.perf_counter() - t0, n


def walk_measured(top: str, pid: int | None) -> tuple[float, int, float]:
    """:func:`walk_count` and the daemon's CPU seconds over it (/proc, 10 ms ticks)."""
    c0 = cpu_s(pid)
    t, n = walk_count(top)
    return t, n, cpu_s(pid) - c0


def imagefolder_time(top: str) -> float | None:
    try:
        from torchvision.datasets import ImageFolder
    except ImportError:
        return None
    t0 = time.perf_counter()
    ImageFolder(top)
    return time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def anon_mb(pid: int) -> float:
    """RSS minus file-backed pages (the memory-mapped index is file-backed and reclaimable)."""
    m = psutil.Process(pid).memory_info()
    return (m.rss - m.shared) / 2**20


def bench_size(n: int, work: Path, orders: list[str], mount_repeats: int = 0,
               trees: dict[str, Path] | None = None, rounds: int = 0) -> list[dict]:
    """One result per storage order, each against the same plain tmpfs tree (and, with
    ``rounds``, the side-by-side rounds of ``trees``)."""
    classes = 1000 if n >= 100_000 else max(10, n // 1300)
    plain = work / f"plain-{n}"
    plain.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,nr_inodes=0", "tmpfs", str(plain)], check=True)
    CLEANUP.add_mount(str(plain))
    t_plain = None
    out = []
    try:
        for order in orders:
            store_dir = work / f"scale-{n}-{order}.pcr"
            t_make, _ = timed(make_scale_store, store_dir, n, classes, order=order)
            if t_plain is None:
                with pcrfs.open_store(store_dir) as store:
                    t_plain, _ = timed(plain_tree, store, plain)
            r = bench_store(store_dir, n, plain, work / f"mnt-{n}-{order}", mount_repeats)
            r.update(order=order, make_store_s=round(t_make, 2), plain_tree_build_s=round(t_plain, 1))
            if rounds:
                r["side_by_side"] = side_by_side(store_dir, plain, work / f"mnt-{n}-{order}", trees, rounds, n)
            out.append(r)
            log(json.dumps(r))
            subprocess.run(["rm", "-rf", str(store_dir)], check=False)  # disk: one store of this size at a time
    finally:
        if is_mounted(plain):
            subprocess.run(["umount", str(plain)], check=False)
    return out


def mount_times(store_dir: Path, mnt: Path, repeats: int) -> list[float]:
    """``pcrfs mount`` until ready, ``repeats`` times (each unmounted again): the spread on a shared machine."""
    out = []
    for j in range(repeats):
        t = run_wall(PCRFS + ["mount", "--log-file", str(mnt.parent / f"{mnt.name}-r{j}.log"), str(store_dir), str(mnt)])
        unmount_pcrfs(mnt, daemon_pid(mnt))
        out.append(round(t, 3))
    return out


def bench_store(store_dir: Path, n: int, plain: Path, mnt: Path, mount_repeats: int = 0) -> dict:
    index_dir = store_dir / "index"
    index_bytes = sum(f.stat().st_size for f in index_dir.iterdir())
    names_bytes = sum((index_dir / f).stat().st_size for f in NAMES_FILES)
    t_open, store = timed(pcrfs.open_store, store_dir)
    t_info = run_wall(PCRFS + ["info", str(store_dir)])
    mnt.mkdir()
    result: dict = {"entries": n, "classes": len(store.classes), "format_version": store.manifest["format_version"]}
    pid = None
    try:
        if mount_repeats:
            runs = mount_times(store_dir, mnt, mount_repeats)
            result["mount_ready_s_repeats"] = {"runs": runs, "median": sorted(runs)[len(runs) // 2], "min": min(runs)}
        # the daemon's log in the run's temporary directory: nothing left behind in /run/pcrfs
        t_mount = run_wall(PCRFS + ["mount", "--log-file", str(mnt.parent / f"{mnt.name}.log"), str(store_dir), str(mnt)])
        pid = daemon_pid(mnt)
        rss_mount, anon_mount = rss_mb(pid), anon_mb(pid)
        one_class = store.classes[len(store.classes) // 2]
        t_ls_pcr = run_wall(["ls", "-l", str(mnt / "scan1" / one_class)])
        t_ls_plain = run_wall(["ls", "-l", str(plain / one_class)])
        t_walk_pcr, files_pcr, walk_cpu = walk_measured(str(mnt / "scan1"), pid)
        t_walk_plain, files_plain = walk_count(str(plain))
        # the same two walks again, the other one first: the first of a pair may pay for the other's
        # dentries being evicted (a shared machine); the ratio uses each tree's faster walk
        t_walk_plain2, _ = walk_count(str(plain))
        t_walk_pcr2, _ = walk_count(str(mnt / "scan3"))
        rss_walk, anon_walk = rss_mb(pid), anon_mb(pid)
        # ImageFolder on a view not walked yet, so the kernel's dentry cache does not help
        t_if_pcr = imagefolder_time(str(mnt / "scan2"))
        t_if_plain = imagefolder_time(str(plain))
        rss_end, anon_end = rss_mb(pid), anon_mb(pid)
        result.update({
            "open_store_s": round(t_open, 3), "pcrfs_info_s": round(t_info, 3), "mount_ready_s": round(t_mount, 3),
            "daemon_rss_mb_after_mount": round(rss_mount, 1), "daemon_rss_mb_after_walk": round(rss_walk, 1),
            "daemon_rss_mb_after_imagefolder": round(rss_end, 1),
            "daemon_anon_mb": {"after_mount": round(anon_mount, 1), "after_walk": round(anon_walk, 1),
                               "after_imagefolder": round(anon_end, 1)},
            "ls_l_class_s": {"pcrfs": round(t_ls_pcr, 4), "plain": round(t_ls_plain, 4),
                             "ratio": round(t_ls_pcr / t_ls_plain, 2)},
            "os_walk_s": {"pcrfs": round(t_walk_pcr, 3), "plain": round(t_walk_plain, 3),
                          "ratio": round(t_walk_pcr / t_walk_plain, 2), "files": files_pcr,
                          "daemon_us_per_entry": round(walk_cpu / files_pcr * 1e6, 3),
                          "second_pair": {"pcrfs_scan3": round(t_walk_pcr2, 3), "plain": round(t_walk_plain2, 3),
                                          "ratio": round(t_walk_pcr2 / t_walk_plain2, 2)},
                          "best_ratio": round(min(t_walk_pcr, t_walk_pcr2) / min(t_walk_plain, t_walk_plain2), 2)},
            "imagefolder_s": None if t_if_pcr is None else
            {"pcrfs": round(t_if_pcr, 3), "plain": round(t_if_plain, 3), "ratio": round(t_if_pcr / t_if_plain, 2)},
            "index_bytes_per_image": round((index_bytes - names_bytes) / n, 1),
            "index_bytes_per_image_with_names": round(index_bytes / n, 1),
        })
        assert files_pcr == files_plain == n, (files_pcr, files_plain, n)
    finally:
        unmount_pcrfs(mnt, pid)
        store.close()
    return result


SIDE_VIEWS = ("scan1", "scan3")  # walked in each side-by-side round (a view walked before is cached by the kernel)


def side_round(store_dir: Path, plain: Path, mnt: Path, name: str, tree: Path, n: int) -> dict:
    """One round for one source tree: ``pcrfs mount`` (that tree's CLI and daemon, through
    PYTHONPATH) until ready, then each of SIDE_VIEWS walked right after a walk of the tmpfs
    tree, with the daemon's CPU per entry; RSS after the mount and after the walks."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cli_cpu, t0 = children_cpu_s(), time.perf_counter()
    subprocess.run(PCRFS + ["mount", "--log-file", str(mnt.parent / f"{mnt.name}-{name}.log"), str(store_dir),
                            str(mnt)], check=True, stdout=subprocess.DEVNULL, env=env, cwd="/")
    row: dict = {"tree": name, "mount_ready_s": round(time.perf_counter() - t0, 3),
                 "loadavg_1m": round(os.getloadavg()[0], 2)}
    pid = daemon_pid(mnt)
    try:
        # CPU of the mount until ready: the CLI process (waited for) and the daemon so far
        row["mount_cpu_s"] = {"cli": round(children_cpu_s() - cli_cpu, 2), "daemon": round(cpu_s(pid), 2)}
        row["rss_mb_after_mount"] = round(rss_mb(pid), 1)
        for view in SIDE_VIEWS:
            t_plain, _ = walk_count(str(plain))
            t, files, cpu = walk_measured(str(mnt / view), pid)
            assert files == n, (files, n)
            row[view] = {"pcrfs_s": round(t, 3), "plain_s": round(t_plain, 3), "ratio": round(t / t_plain, 2),
                         "daemon_us_per_entry": round(cpu / files * 1e6, 3)}
        row["rss_mb_after_walks"] = round(rss_mb(pid), 1)
    finally:
        unmount_pcrfs(mnt, pid)
    return row


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    t = os.times()
    return t.children_user + t.children_system


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values), "runs": values}


def side_by_side(store_dir: Path, plain: Path, mnt: Path, trees: dict[str, Path], rounds: int, n: int) -> dict:
    """``rounds`` rounds of :func:`side_round` for every tree, the trees' order alternating
    from round to round; each tree's medians and ranges."""
    names, rows = list(trees), []
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rows.append(side_round(store_dir, plain, mnt, name, trees[name], n))
            log(json.dumps(rows[-1]))
    summary = {}
    for name in names:
        mine = [row for row in rows if row["tree"] == name]
        summary[name] = {
            "mount_ready_s": spread([row["mount_ready_s"] for row in mine]),
            "mount_cpu_s": spread([round(sum(row["mount_cpu_s"].values()), 2) for row in mine]),
            "walk_ratio": spread([row[v]["ratio"] for row in mine for v in SIDE_VIEWS]),
            "daemon_us_per_entry": spread([row[v]["daemon_us_per_entry"] for row in mine for v in SIDE_VIEWS]),
            "rss_mb_max": max(max(row["rss_mb_after_mount"], row["rss_mb_after_walks"]) for row in mine),
            "loadavg_1m": spread([row["loadavg_1m"] for row in mine]),
        }
    return {"trees": {name: str(path) for name, path in trees.items()}, "views": list(SIDE_VIEWS),
            "summary": summary, "rounds": rows}


def plot(all_results: list[dict], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    orders = list(dict.fromkeys(r.get("order", "source") for r in all_results))
    for order in orders:
        results = [r for r in all_results if r.get("order", "source") == order]
        xs = [r["entries"] for r in results]
        tag = f" ({order})" if len(orders) > 1 else ""
        ls = "-" if order == orders[0] else ":"
        ax = axes[0]
        ax.plot(xs, [r["mount_ready_s"] for r in results], "o" + ls, label="mount ready" + tag)
        ax.plot(xs, [r["open_store_s"] for r in results], "s" + ls, label="open_store" + tag)
        ax = axes[1]
        ax.plot(xs, [r["daemon_rss_mb_after_mount"] for r in results], "o" + ls, label="after mount" + tag)
        ax.plot(xs, [r["daemon_rss_mb_after_walk"] for r in results], "s" + ls, label="after listing every dir" + tag)
        ax.plot(xs, [r["daemon_anon_mb"]["after_walk"] for r in results], "^" + ls,
                label="... not file-backed (index mmap excluded)" + tag)
        ax = axes[2]
        ax.plot(xs, [r["os_walk_s"]["ratio"] for r in results], "o" + ls, label="os.walk" + tag)
        if all(r["imagefolder_s"] for r in results):
            ax.plot(xs, [r["imagefolder_s"]["ratio"] for r in results], "s" + ls, label="ImageFolder()" + tag)
        ax.plot(xs, [r["ls_l_class_s"]["ratio"] for r in results], "^" + ls, label="ls -l one class" + tag)
    ax = axes[0]
    ax.axhline(2.0, color="grey", ls="--", label="target 2 s")
    ax.set(xscale="log", xlabel="entries", ylabel="seconds", title="Time to open / mount")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.axhline(300, color="grey", ls="--", label="target 300 MB")
    ax.set(xscale="log", xlabel="entries", ylabel="MiB", title="Daemon RSS")
    ax.legend(fontsize=7)
    ax = axes[2]
    ax.axhline(3.0, color="grey", ls="--", label="target 3x")
    ax.set(xscale="log", xlabel="entries", ylabel="pcrfs / plain tmpfs tree", title="Metadata cost vs plain tree")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save(fig, out, dpi=110)


def targets(results: list[dict]) -> dict:
    """ImageNet-scale targets (issue 24 for the shuffled store): mount <= 2 s, RSS <= 300 MB,
    walk <= 3x the tmpfs tree; for the largest size of each order."""
    out = {}
    for order in dict.fromkeys(r["order"] for r in results):
        r = max((x for x in results if x["order"] == order), key=lambda x: x["entries"])
        rss = max(r["daemon_rss_mb_after_mount"], r["daemon_rss_mb_after_walk"], r["daemon_rss_mb_after_imagefolder"])
        out[f"{order}_{r['entries']}"] = {
            "mount_le_2s": {"value": r["mount_ready_s"], "met": r["mount_ready_s"] <= 2.0,
                            "repeats": r.get("mount_ready_s_repeats")},
            "rss_le_300mb": {"value": rss, "met": rss <= 300},
            "walk_le_3x_tmpfs": {"value": r["os_walk_s"]["ratio"], "best_of_two_pairs": r["os_walk_s"]["best_ratio"],
                                 "met": r["os_walk_s"]["ratio"] <= 3.0},
        }
        for name, summary in r.get("side_by_side", {}).get("summary", {}).items():
            t = out[f"{order}_{r['entries']}"]
            t["mount_le_2s"][f"side_by_side_{name}"] = summary["mount_ready_s"]
            t["rss_le_300mb"][f"side_by_side_{name}_max"] = summary["rss_mb_max"]
            t["walk_le_3x_tmpfs"][f"side_by_side_{name}"] = summary["walk_ratio"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_281_167])
    ap.add_argument("--orders", default="shuffled",
                    help="storage orders of the scale stores, comma-separated: shuffled (format version 2, "
                         "convert's default), source (version 1) [default: shuffled]")
    ap.add_argument("--mount-repeats", type=int, default=0,
                    help="also time N more mounts of each store (median and min in the JSON)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="side-by-side rounds per store: mount, two view walks against the tmpfs tree, daemon "
                         "CPU per entry and RSS [default: 3 with --baseline-tree, else 0]")
    ap.add_argument("--baseline-tree", type=Path,
                    help="another pcrfs source tree (extension built in place) measured in the same rounds, "
                         "alternating with this checkout")
    ap.add_argument("--baseline-label", default="baseline",
                    help="the baseline tree's name in the JSON (e.g. its commit) [default: baseline]")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_scale.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "results" / "bench_scale.png")
    args = ap.parse_args()
    trees = {"this": ROOT} | ({args.baseline_label: args.baseline_tree.resolve()} if args.baseline_tree else {})
    rounds = args.rounds or (3 if args.baseline_tree else 0)
    run = Run("tools/bench_scale.py")
    results = []
    with tempfile.TemporaryDirectory(prefix="pcrfs-scale-") as tmp:
        # one untimed ImageFolder first: its first call pays one-time costs (lazy imports)
        # that would otherwise land on whichever tree is timed first
        warm = Path(tmp) / "warm-up" / "class"
        warm.mkdir(parents=True)
        (warm / "x.JPEG").touch()
        imagefolder_time(str(warm.parent))
        try:
            for n in args.sizes:
                results += bench_size(n, Path(tmp), args.orders.split(","), args.mount_repeats, trees, rounds)
        finally:
            CLEANUP.all()
    doc = run.doc(benchmark="pcrfs at ImageNet scale (metadata)", date=run.started.isoformat(timespec="seconds"),
                  orders=args.orders.split(","), results=results, targets=targets(results))
    write_json(args.out, doc)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
