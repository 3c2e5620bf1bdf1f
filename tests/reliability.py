"""Shared helpers for the reliability tests (tests/test_reliability_*.py).

* :func:`figures` -- a fixture that records what a test tried (fuzz cases, faults
  injected, bytes read and checked ...). Only ``slow``-marked tests write, and the
  first write of a pytest process starts a fresh document, so
  ``results/reliability.json`` always holds the figures of the *last* slow run
  (``python -m pytest -m slow``; ``tools/reliability_report.py`` prints them).
* :func:`popen_limited` / :func:`run_limited` -- child processes with a bounded
  address space (RLIMIT_AS) and no core dumps, for anything fed hostile input.
* :class:`Tmpfs` -- a small tmpfs for disk-full tests, always unmounted.
* :func:`read_all_files` -- every file of every view of a mount, compared with the
  reader API; what it returns is what the corruption and fault tests assert on.

A helper module like corpus.py, not a conftest: the rest of the suite is unaffected.
"""
from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
RESULTS = REPO / "results" / "reliability.json"

# The address space a child fed hostile input may use. A Python process with numpy,
# Pillow and libturbojpeg loaded maps ~0.4 GiB; the rest is for the image being worked on.
CHILD_AS_BYTES = 2 << 30


# ---- figures of the last slow run ----------------------------------------------------------

_doc: dict | None = None
_doc_lock = threading.Lock()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_STARTED = _now()  # this module is imported when pytest collects the reliability tests


def _fresh_doc() -> dict:
    return {
        "what": "figures of the last `python -m pytest -m slow` run of tests/test_reliability_*.py",
        "started": _STARTED,
        "finished": _now(),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "sections": {},
    }


class Figures:
    """Counters for one test, merged into the section ``section`` of the run's document."""

    def __init__(self, persist: bool, test: str) -> None:
        self.persist = persist
        self.test = test

    def add(self, section: str, **counts: float) -> None:
        """Add ``counts`` to the section's running totals (and note which test added them)."""
        global _doc
        with _doc_lock:
            if _doc is None:
                _doc = _fresh_doc()
            sec = _doc["sections"].setdefault(section, {"tests": []})
            if self.test not in sec["tests"]:
                sec["tests"].append(self.test)
            for key, value in counts.items():
                if key.startswith("max_"):
                    sec[key] = max(sec.get(key, value), value)
                else:
                    sec[key] = round(sec.get(key, 0) + value, 3)
            _doc["finished"] = _now()
            if self.persist:
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                tmp = RESULTS.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(_doc, indent=1) + "\n")
                os.replace(tmp, RESULTS)


@pytest.fixture
def figures(request) -> Figures:
    """Record this test's figures; they reach results/reliability.json only from slow tests."""
    slow = request.node.get_closest_marker("slow") is not None
    return Figures(persist=slow, test=request.node.nodeid.split("::", 1)[-1])


def budget(fast, slow):
    """Parametrize a test with a small budget for the default run and a large one under -m slow."""
    return pytest.mark.parametrize("budget", [pytest.param(fast, id="fast"),
                                              pytest.param(slow, id="slow", marks=pytest.mark.slow)])


# ---- bounded child processes --------------------------------------------------------------------

def _limit(as_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def popen_limited(argv: list[str], as_bytes: int = CHILD_AS_BYTES, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    env.update(kwargs.pop("env", {}))
    return subprocess.Popen(argv, preexec_fn=_limit(as_bytes), env=env, **kwargs)


def run_limited(argv: list[str], timeout: float, as_bytes: int = CHILD_AS_BYTES,
                **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` with a bounded address space; kill it (and fail) if it outlives ``timeout``."""
    with popen_limited(argv, as_bytes, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(map(str, argv))} still running after {timeout:.0f}s "
                        f"(hang); stderr tail:\n{err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def pcrfs_argv(*args) -> list[str]:
    return [sys.executable, "-m", "pcrfs.cli", *map(str, args)]


# ---- scratch space -------------------------------------------------------------------------------

@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A private directory on tmpfs where there is one (fsync is free there: fuzzing converts
    thousands of tiny stores), else under the system temp directory. Removed afterwards."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


@functools.lru_cache(maxsize=None)
def tmpfs_unavailable() -> str | None:
    """Why this process cannot mount (a tmpfs, a bind mount) here: not root, no CAP_SYS_ADMIN ...; or None."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root and mount(8)"
    with tempfile.TemporaryDirectory() as d:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True, text=True)
        if res.returncode != 0:
            return f"cannot mount a tmpfs: {res.stderr.strip()}"
        subprocess.run(["umount", d], capture_output=True)
    return None


class Tmpfs:
    """A tmpfs of ``size`` bytes at ``path`` for the life of a ``with`` block (unmounted even on failure)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size

    def __enter__(self) -> "Tmpfs":
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
                       check=True, capture_output=True)
        return self

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)
        self.size = size

    def __exit__(self, *exc) -> None:
        for cmd in (["umount", str(self.path)], ["umount", "-l", str(self.path)]):
            if not _mounted(self.path):
                break
            subprocess.run(cmd, capture_output=True)
        assert not _mounted(self.path), f"tmpfs at {self.path} left mounted"


# ---- reading a whole mount ----------------------------------------------------------------------

def views(store) -> list[tuple[str, int]]:
    """(view name, groups served) for every view of ``store``."""
    n = store.num_groups
    return [(f"scan{k}", k) for k in range(1, n + 1)] + [("full", n)]


def read_all_files(mnt: Path, reference) -> dict:
    """Read every file of every view of the mount at ``mnt`` and compare it with ``reference``
    (a reader of the *intact* store).

    Returns {"ok": n, "eio": {(i, view)}, "wrong": [...], "other_errors": [...], "bytes": n}:
    "wrong" are files whose size or bytes differ from the intact store's, "other_errors"
    are failures other than EIO. Sizes come from the index, so they must be right even
    for damaged files.
    """
    out = {"ok": 0, "eio": set(), "wrong": [], "other_errors": [], "bytes": 0}
    for i in range(reference.num_images):
        path = reference.path(i)
        for view, k in views(reference):
            p = os.path.join(os.fsencode(mnt), os.fsencode(view), os.fsencode(path))
            try:
                if os.stat(p).st_size != reference.size(i, k):
                    out["wrong"].append((view, path, "stat size"))
                with open(p, "rb") as f:
                    data = f.read()
            except OSError as e:
                if e.errno == errno.EIO:
                    out["eio"].add((i, view))
                else:
                    out["other_errors"].append((view, path, repr(e)))
                continue
            out["bytes"] += len(data)
            if data != reference.read(i, k):
                out["wrong"].append((view, path, "content"))
            else:
                out["ok"] += 1
    return out


# ---- readers that check every byte (the soak and the daemon-fault tests) --------------------------

def reader_loop(mnt: str | os.PathLike, store_path: str | os.PathLike, *, seconds: float, seed: int,
                stop: threading.Event | None = None, pause_on_error: float = 0.01) -> dict:
    """Read random files of random views of the mount for ``seconds``, every byte compared with
    the reader API (``open_store(store_path)``), the way training loaders do: whole files,
    chunks at random offsets, ``O_DIRECT`` and page-cache-dropping reads (so that requests
    reach the daemon, not just the kernel's page cache) and directory listings with sizes.

    Returns counters: reads, bytes, wrong_reads, wrong_bytes, listings, errors (errno name ->
    count) and seconds.
    """
    from pcrfs.store.read.reader import open_store

    store = open_store(store_path)
    rng = random.Random(seed)
    all_views = views(store)
    expected: dict[tuple[int, int], bytes] = {}
    out = {"reads": 0, "bytes": 0, "wrong_reads": 0, "wrong_bytes": 0, "listings": 0, "errors": Counter(),
           "wrong_samples": []}
    mnt = os.fsencode(mnt)
    t0 = time.monotonic()
    deadline = t0 + seconds

    def want(i: int, k: int) -> bytes:
        data = expected.get((i, k))
        if data is None:
            data = expected[(i, k)] = store.read(i, k)
        return data

    def check(data: bytes, good: bytes, what: str) -> None:
        out["reads"] += 1
        out["bytes"] += len(data)
        if data != good:
            out["wrong_reads"] += 1
            out["wrong_bytes"] += max(len(data), 1)
            if len(out["wrong_samples"]) < 5:  # enough to tell a short read from other bytes
                out["wrong_samples"].append({"what": what, "got": len(data), "want": len(good),
                                             "is_prefix": good.startswith(data),
                                             "first_difference": next((j for j, (a, b) in enumerate(zip(data, good))
                                                                       if a != b), None)})

    try:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            i = rng.randrange(store.num_images)
            view, k = rng.choice(all_views)
            path = os.path.join(mnt, os.fsencode(view), os.fsencode(store.path(i)))
            mode = rng.random()
            try:
                if mode < 0.1:  # a listing with attributes, as ImageFolder/os.walk and `ls -l` make
                    parent = os.path.dirname(path)
                    for entry in os.scandir(parent):
                        if entry.is_file():
                            j = store.find(os.path.relpath(entry.path, os.path.join(mnt, os.fsencode(view))).decode(
                                "utf-8", "surrogateescape"))
                            if entry.stat().st_size != store.size(j, k):
                                out["wrong_reads"] += 1
                                out["wrong_samples"].append({"what": f"listing size {entry.path!r}"})
                    out["listings"] += 1
                elif mode < 0.45:  # whole file, then drop its pages: the next read reaches the daemon
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        data = b"".join(iter(lambda: os.read(fd, 1 << 17), b""))
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                    check(data, want(i, k), f"whole+fadvise {path!r}")
                elif mode < 0.6:  # O_DIRECT: every request goes to the daemon (FUSE needs no alignment)
                    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    try:
                        data = b"".join(iter(lambda: os.read(fd, rng.choice((4096, 1 << 16, 1 << 20))), b""))
                    finally:
                        os.close(fd)
                    check(data, want(i, k), f"O_DIRECT {path!r}")
                elif mode < 0.85:  # chunks at random offsets, as a decoder seeking in a file would
                    good = want(i, k)
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        for _ in range(4):
                            off, size = rng.randrange(len(good)), rng.randrange(1, 65536)
                            check(_pread_fully(fd, size, off), good[off:off + size], f"pread {size}@{off} {path!r}")
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                else:  # plain buffered read through the page cache
                    with open(path, "rb") as f:
                        check(f.read(), want(i, k), f"buffered {path!r}")
            except OSError as e:
                out["errors"][errno.errorcode.get(e.errno, str(e.errno))] += 1
                time.sleep(pause_on_error)
    finally:
        store.close()
    out["seconds"] = time.monotonic() - t0
    out["errors"] = dict(out["errors"])
    return out


def _pread_fully(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` or up to the end of the file, as a careful reader gets them: a
    read may return less when an error follows (POSIX: the bytes so far, the error next time)."""
    parts = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def reader_process_main() -> None:
    """``python -c 'import reliability; reliability.reader_process_main()' MNT STORE SECONDS SEED``:
    a loader process; prints "reading" when it starts and its counters as JSON when its time is up."""
    mnt, store, seconds, seed = sys.argv[1:5]
    print("reading", flush=True)
    res = reader_loop(mnt, store, seconds=float(seconds), seed=int(seed))
    print(json.dumps(res), flush=True)


def start_reader_process(mnt, store, seconds: float, seed: int) -> subprocess.Popen:
    return popen_limited([sys.executable, "-c", "import reliability; reliability.reader_process_main()",
                          str(mnt), str(store), str(seconds), str(seed)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def merge_counts(results: list[dict]) -> dict:
    total = {"reads": 0, "bytes": 0, "wrong_reads": 0, "wrong_bytes": 0, "listings": 0, "seconds": 0.0, "errors": {},
             "wrong_samples": []}
    for r in results:
        for key in ("reads", "bytes", "wrong_reads", "wrong_bytes", "listings", "seconds", "wrong_samples"):
            total[key] += r[key]
        for name, n in r["errors"].items():
            total["errors"][name] = total["errors"].get(name, 0) + n
    return total


class Load:
    """Reader threads in this process plus loader processes, all checking every byte."""

    def __init__(self, mnt: Path, store: Path, seconds: float, threads: int = 3, processes: int = 2,
                 seed: int = 0) -> None:
        self.results: list[dict] = []
        self.ends = time.monotonic() + seconds
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._thread, args=(mnt, store, seconds, seed + t), daemon=True)
                        for t in range(threads)]
        self.procs = [start_reader_process(mnt, store, seconds, seed + 100 + p) for p in range(processes)]
        for t in self.threads:
            t.start()

    def _thread(self, mnt, store, seconds, seed) -> None:
        self.results.append(reader_loop(mnt, store, seconds=seconds, seed=seed, stop=self.stop))

    def finish(self, timeout: float = 30) -> dict:
        """Wait for every reader (``timeout`` seconds past the end of its run); fail if one hangs.
        Returns the merged counters."""
        deadline = max(time.monotonic(), self.ends) + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t for t in self.threads if t.is_alive()]
        for p in self.procs:
            try:
                out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                hung.append(p)
                continue
            assert p.returncode == 0, err[-2000:]
            self.results.append(json.loads(out.splitlines()[-1]))
        self.stop.set()
        assert not hung, f"{len(hung)} reader(s) hung"
        return merge_counts(self.results)
