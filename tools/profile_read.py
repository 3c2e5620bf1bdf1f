#!/usr/bin/env python3
"""Where a read through the pcrfs mount spends its time: py-spy of the daemon, a request
census from an instrumented daemon, and the read path in process without FUSE.

* ``py-spy``     py-spy records the pcrfs daemon during (untimed) first passes over a view,
                 one fresh mount per pass; the merged collapsed stacks go to ``--stacks``,
                 the hot functions (self and inclusive samples) into the JSON.
* ``census``     an instrumented daemon (this file's hidden ``--_daemon`` mode: the same
                 ``pcrfs.fuse.daemon.start`` in the foreground, with mfusepy's ``FUSE._wrapper`` timed)
                 counts and times every FUSE callback during the walk, the first and the
                 second pass: requests per file, time per request inside Python, daemon CPU
                 per file.
* ``microbench`` the store/view layers in process (no FUSE) against a floor of one
                 ``pread`` + CRC-32 per scan group.

``tools/bench_read.py --profile auto|always`` runs all three after its rounds, and its
``--variants`` start the same hidden daemon with one setting changed from the outside
(no pcrfs source is edited). On its own:

    python tools/profile_read.py --store /tmp/pcrfs-bench-read/store       # all three, MNT/full
    python tools/profile_read.py --store DIR --view scan5 --what census

Writes ``results/bench_read_profile.json`` (and the stacks to
``results/bench_read_profile.txt``). py-spy needs root (or ptrace rights) and ``pip install py-spy``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import REPO, log  # noqa: E402  (puts the checkout first on sys.path)
from benchlib.mounts import CLEANUP, PcrfsMount, ProcessMount, on_signals, stop_process  # noqa: E402
from benchlib.proc import self_cpu_s  # noqa: E402
from benchlib.reads import walk  # noqa: E402
from benchlib.results import Run, write_json  # noqa: E402

VARIANTS = {  # name -> (mount options, cache size); combine with "+"
    "cache0": ([], "0"),
    "nothreads": (["nothreads"], None),
}
VARIANT_DOC = {"cache0": "--cache-size 0 (no scan-group LRU)",
               "nothreads": "-o nothreads (libfuse single-threaded loop: callbacks on Python's main thread)",
               "pinned": "each libfuse worker thread keeps its PyThreadState (PyGILState_Ensure once, never released)"}


def _timed_pass(paths: list[str], pid: int | None) -> dict:
    from benchlib.proc import Meter
    from benchlib.reads import read_pass

    with Meter(pid) as m:
        _, nbytes = read_pass(paths)
    r = m.per_item(len(paths))
    return {"seconds": r["seconds"], "files_per_s": r["items_per_s"], "MB_per_s": nbytes / 1e6 / r["seconds"],
            "server_cpu_ms_per_file": r.get("daemon_us_per_item", 0.0) / 1e3,
            "reader_cpu_ms_per_file": r["self_us_per_item"] / 1e3}


# ---- py-spy ------------------------------------------------------------------------------------

def profile_first_pass(store: Path, mp: str, view: str, order: list[str], work: Path, out_txt: Path,
                       passes: int = 4, rate: int = 250) -> dict:
    """py-spy record of the pcrfs daemon during first passes over MNT/``view`` (untimed; one
    fresh mount per pass, ``passes`` of them, stacks merged into ``out_txt``)."""
    pyspy = shutil.which("py-spy")
    if not pyspy:
        return {"error": "py-spy not found (pip install py-spy)"}
    res: dict = {"file": str(out_txt.relative_to(REPO)) if out_txt.is_relative_to(REPO) else str(out_txt),
                 "passes": [], "py_spy": []}
    merged: collections.Counter = collections.Counter()
    for _ in range(passes):
        part = out_txt.with_suffix(".part")
        with PcrfsMount(store, mp, work / "pcrfs-mount.log") as m:
            root = os.path.join(mp, view)
            walk(root)
            paths = [os.path.join(root, r) for r in order]
            cmd = [pyspy, "record", "--pid", str(m.pid), "--rate", str(rate), "--format", "raw",
                   "-o", str(part), "--nonblocking"]
            errf = tempfile.TemporaryFile()
            spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=subprocess.STDOUT,
                                   start_new_session=True)
            CLEANUP.procs.append(spy)
            try:
                time.sleep(1.0)  # let py-spy attach
                if spy.poll() is not None:
                    errf.seek(0)
                    return {"error": f"py-spy exited {spy.returncode}: {errf.read().decode(errors='replace')[-800:]}"}
                p = _timed_pass(paths, m.pid)
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    stop_process(spy)
            finally:
                if spy.poll() is None:
                    stop_process(spy)
                CLEANUP.procs.remove(spy)
            errf.seek(0)
            said = errf.read().decode(errors="replace")
            res["py_spy"].append(" ".join(line for line in said.splitlines() if "Samples:" in line)[-200:])
            res["passes"].append({k: round(p[k], 3) for k in ("files_per_s", "MB_per_s", "server_cpu_ms_per_file",
                                                               "reader_cpu_ms_per_file")})
        if part.exists():
            for line in part.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    merged[stack] += int(count)
            part.unlink()
    out_txt.write_text("".join(f"{k} {v}\n" for k, v in merged.most_common()))
    res.update(summarize_collapsed(out_txt))
    return res


def summarize_collapsed(path: Path, top: int = 30) -> dict:
    """Hot functions from py-spy's collapsed stacks: self (leaf) and inclusive samples."""
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    by_file_self: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread (") and not f.startswith("process ")]
        if not frames:
            continue
        total += n
        names = [_fn_name(f) for f in frames]
        self_c[names[-1]] += n
        by_file_self[_fn_file(frames[-1])] += n
        for name in set(names):
            incl[name] += n

    def table(c):
        return [{"function": k, "samples": v, "share": round(v / total, 4)} for k, v in c.most_common(top)]

    return {"samples": total, "self": table(self_c), "inclusive": table(incl), "self_by_file": table(by_file_self)}


def _fn_name(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    file = loc.rsplit(":", 1)[0]
    short = "/".join(file.split("/")[-2:]) if "pcrfs" in file else os.path.basename(file)
    return f"{name} ({short})" if file else name


def _fn_file(frame: str) -> str:
    loc = frame.partition(" (")[2].rstrip(")")
    file = loc.rsplit(":", 1)[0]
    return "/".join(file.split("/")[-2:]) if "pcrfs" in file else os.path.basename(file) or "?"


# ---- the instrumented / variant daemon (hidden --_daemon mode) -----------------------------------

def hidden_daemon(argv: list[str]) -> int:
    """The daemon of ``pcrfs mount -f``, changed from the outside: ``--census DIR`` counts and
    times every mfusepy callback; a watcher thread answers snapshot requests (DIR/req holds a
    tag, the answer goes to DIR/<tag>.json)."""
    from pcrfs.fuse import daemon, load_mfusepy
    from pcrfs.fuse.config import DEFAULT_CACHE_SIZE, MountConfig
    from pcrfs.units import parse_size

    p = argparse.ArgumentParser(prog="profile_read.py --_daemon")
    p.add_argument("store")
    p.add_argument("mountpoint")
    p.add_argument("--log-file", required=True)
    p.add_argument("--cache-size", default=DEFAULT_CACHE_SIZE)
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--census", default=None)
    a = p.parse_args(argv)
    mf = load_mfusepy()
    wrapper = mf.FUSE._wrapper
    if a.census:
        lock = threading.Lock()
        counts: dict[str, list] = collections.defaultdict(lambda: [0, 0])
        inner = wrapper

        def counted(self, func, *args, **kw):
            t0 = time.perf_counter_ns()
            try:
                return inner(self, func, *args, **kw)
            finally:
                dt = time.perf_counter_ns() - t0
                with lock:
                    c = counts[func.__name__]
                    c[0] += 1
                    c[1] += dt

        wrapper = counted
        out = Path(a.census)

        def watcher():
            req = out / "req"
            while True:
                if req.exists():
                    tag = req.read_text().strip()
                    with lock:
                        snap = {k: {"calls": v[0], "ns": v[1]} for k, v in counts.items()}
                    snap["_cpu_s"] = self_cpu_s()
                    tmp = out / f"{tag}.json.tmp"
                    tmp.write_text(json.dumps(snap))
                    tmp.rename(out / f"{tag}.json")
                    req.unlink()
                time.sleep(0.01)

        threading.Thread(target=watcher, daemon=True).start()
    mf.FUSE._wrapper = wrapper
    config = MountConfig.from_values(a.store, a.mountpoint, {"foreground": True, "options": tuple(a.options),
                                                             "cache_size": parse_size(a.cache_size),
                                                             "log_file": a.log_file})
    daemon.start(config)
    return 0


def variant_mount(store: Path, mp: str, log_file: Path, variant: str = "",
                  census_dir: Path | None = None) -> ProcessMount:
    """A mount served by the hidden daemon: ``variant`` (names of :data:`VARIANTS` joined by "+")
    and/or the census; a with-block like ``PcrfsMount`` (``.pid``, ``.stats()``)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--_daemon", str(store), mp, "--log-file", str(log_file)]
    for part in filter(None, variant.split("+")):
        opts, cache = VARIANTS[part]
        argv += [x for o in opts for x in ("-o", o)]
        if cache is not None:
            argv += ["--cache-size", cache]
    if census_dir is not None:
        argv += ["--census", str(census_dir)]
    return ProcessMount(argv, mp, Path(log_file).with_suffix(".out"), name="the variant daemon", timeout=30,
                        ready=lambda m: os.path.exists(os.path.join(m, ".pcrfs", "stats")))


# ---- the census ----------------------------------------------------------------------------------

def census(store: Path, mp: str, view: str, order: list[str], work: Path, variant: str = "") -> dict:
    """Requests per file and Python time per request during walk, first and second pass of MNT/``view``."""
    outdir = Path(tempfile.mkdtemp(prefix="census-", dir=work))

    def snap(tag):
        (outdir / "req").write_text(tag)
        deadline = time.monotonic() + 10
        while not (outdir / f"{tag}.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("census daemon did not answer")
            time.sleep(0.005)
        return json.loads((outdir / f"{tag}.json").read_text())

    try:
        with variant_mount(store, mp, work / "census-daemon.log", variant, outdir) as m:
            root = os.path.join(mp, view)
            paths = [os.path.join(root, r) for r in order]
            s0 = snap("start")
            walk(root)
            s1 = snap("walk")
            p1 = _timed_pass(paths, m.pid)
            s2 = snap("first")
            p2 = _timed_pass(paths, m.pid)
            s3 = snap("second")
    finally:
        shutil.rmtree(outdir, ignore_errors=True)
    n = len(paths)

    def delta(a, b, secs):
        ops = {}
        py_ns = 0
        for k, v in b.items():
            if k.startswith("_"):
                continue
            calls = v["calls"] - a.get(k, {}).get("calls", 0)
            ns = v["ns"] - a.get(k, {}).get("ns", 0)
            if calls:
                ops[k] = {"calls": calls, "per_file": round(calls / n, 3), "us_per_call": round(ns / calls / 1e3, 1)}
                py_ns += ns
        out = {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["calls"])),
               "requests_per_file": round(sum(o["calls"] for o in ops.values()) / n, 3),
               "python_callback_ms_per_file": round(py_ns / n / 1e6, 4),
               "daemon_cpu_ms_per_file": round((b["_cpu_s"] - a["_cpu_s"]) * 1e3 / n, 4)}
        if secs:
            out["wall_ms_per_file"] = round(secs * 1e3 / n, 4)
        return out

    return {"variant": variant or "default", "view": view,
            "note": "an instrumented copy of the daemon (mfusepy FUSE._wrapper timed); the timing adds a "
                    "little per call. python_callback = wall time inside the Python callbacks; daemon_cpu - "
                    "python_callback is spent in libfuse, ctypes and the kernel side of /dev/fuse",
            "walk": delta(s0, s1, None), "first": delta(s1, s2, p1["seconds"]), "second": delta(s2, s3, p2["seconds"]),
            "first_files_per_s": round(p1["files_per_s"]), "second_files_per_s": round(p2["files_per_s"])}


# ---- the read path without FUSE -----------------------------------------------------------------

def reader_microbench(store: Path, rel: list[str], view: str = "full") -> dict:
    """The store/view layers in process, without FUSE: cost per file of the daemon's read path."""
    try:
        return _reader_microbench(store, rel, view)
    except Exception as e:  # noqa: BLE001 - pcrfs internals change; the rest of the report stands
        return {"error": f"{type(e).__name__}: {e}"}


def _reader_microbench(store: Path, rel: list[str], view: str) -> dict:
    import zlib

    from pcrfs.store import format as fmt
    from pcrfs.store.read.reader import open_store
    from pcrfs.access.views import ViewTree

    out: dict = {}
    pc = time.perf_counter
    with open_store(store, cache_bytes=256 << 20) as st:
        n = st.num_images
        k = st.num_groups if view == "full" else int(view[4:])
        tree = ViewTree(st)
        paths = [f"/{view}/" + r for r in rel]
        t0 = pc()
        nodes = [tree.resolve(p) for p in paths]
        out["ViewTree.resolve_us"] = (pc() - t0) / n * 1e6
        t0 = pc()
        for i in range(n):
            st.ranges(i, k)
        out["Store.ranges_us"] = (pc() - t0) / n * 1e6
        t0 = pc()
        sizes = [tree.attr(nd).size for nd in nodes]
        out["ViewTree.attr_us"] = (pc() - t0) / n * 1e6
        t0 = pc()
        for nd, size in zip(nodes, sizes):
            tree.read(nd, 0, size)
        out["ViewTree.read_whole_file_cold_cache_us"] = (pc() - t0) / n * 1e6
        out["preads_per_file"] = getattr(st.records, "requests", 0) / n
        t0 = pc()
        for nd, size in zip(nodes, sizes):
            tree.read(nd, 0, size)
        out["ViewTree.read_whole_file_group_cache_hit_us"] = (pc() - t0) / n * 1e6
    with open_store(store) as st:  # the bare minimum a read needs: every group pread + CRC-32
        rngs = [[(r.record, r.offset, r.length) for r in st.ranges(i, k)] for i in range(n)]
        fds = {}
        try:
            for rl in rngs:
                for rec, _, _ in rl:
                    if rec not in fds:
                        fds[rec] = os.open(Path(store) / fmt.record_name(rec), os.O_RDONLY)
            t0 = pc()
            for rl in rngs:
                for rec, off, length in rl:
                    zlib.crc32(os.pread(fds[rec], length, off))
            out["floor_pread_crc_per_group_us_per_file"] = (pc() - t0) / n * 1e6
        finally:
            for fd in fds.values():
                os.close(fd)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


# ---- on its own ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_daemon":
        return hidden_daemon(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a local pcrfs store")
    ap.add_argument("--view", default="full")
    ap.add_argument("--what", default="py-spy,census,microbench", help="comma-separated: py-spy, census, microbench")
    ap.add_argument("--passes", type=int, default=4, help="first passes sampled by py-spy (default 4)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--variant", default="", help="census on a variant daemon (" + ", ".join(VARIANTS) + ")")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "pcrfs-profile-read")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_read_profile.json")
    ap.add_argument("--stacks", type=Path, default=REPO / "results" / "bench_read_profile.txt")
    args = ap.parse_args(argv)
    what = set(args.what.split(","))
    run = Run("tools/profile_read.py", argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    mp = str(work / "mnt")
    on_signals()
    out: dict = {}
    try:
        with PcrfsMount(args.store, mp, work / "pcrfs-mount.log"):
            rel = walk(os.path.join(mp, args.view))
        if "py-spy" in what:
            log("py-spy of the daemon during first passes ...")
            out["py_spy"] = profile_first_pass(args.store, mp, args.view, rel, work, args.stacks.resolve(),
                                               args.passes, args.rate)
            for row in out["py_spy"].get("self", [])[:12]:
                log(f"  self {row['share']:6.1%}  {row['function']}")
        if "census" in what:
            log("request census (instrumented daemon) ...")
            out["census"] = census(args.store, mp, args.view, rel, work, args.variant)
            for phase in ("walk", "first", "second"):
                c = out["census"][phase]
                log(f"  {phase}: {c['requests_per_file']} requests/file, daemon cpu {c['daemon_cpu_ms_per_file']} "
                    f"ms/file: " + ", ".join(f"{op} {o['per_file']}x{o['us_per_call']}us" for op, o in c["ops"].items()))
        if "microbench" in what:
            log("in-process read-path microbenchmark ...")
            out["reader_microbench"] = reader_microbench(args.store, rel, args.view)
            log(f"  {out['reader_microbench']}")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
        CLEANUP.all()
    write_json(args.out, run.doc(store=str(args.store), view=args.view, files=len(rel), **out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
