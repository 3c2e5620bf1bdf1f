"""pcrfs.torch.ImageFolder over s3:// with DataLoader workers: each record prefix downloaded
once per node, whatever the number of workers (issue 25; pcrfs.store.sources.sharedcache).

Real components only: moto's S3 server on loopback behind a proxy that counts every GET
(and can hold one back), real DataLoaders with 2 worker processes, real processes killed
with SIGKILL. Nothing here is timed: waits are bounded only so that a hang fails.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import http.client
import http.server
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pcrfs  # noqa: E402
from pcrfs.convert import convert  # noqa: E402
from pcrfs.demo import make_demo  # noqa: E402
from pcrfs.remote.deadline import Deadline  # noqa: E402
from pcrfs.remote.fs import RemoteOptions  # noqa: E402
from pcrfs.access.sampling import RecordShuffleSampler  # noqa: E402
from pcrfs.store.sources.diskcache import UnsafeCacheDirectory  # noqa: E402
from pcrfs.store.read.prefixpolicy import group_bounds  # noqa: E402
from pcrfs.store.read.reader import ReadOptions, open_store  # noqa: E402
from pcrfs.store.sources.sharedcache import SharedDiskCache  # noqa: E402
from pcrfs.access.torch import ImageFolder  # noqa: E402

from s3util import LOOPBACK, MotoServer, free_port, s3_available, s3_environment  # noqa: E402

BUCKET = "pcrfs-workers"
VIEW, K = "scan5", 5
WAIT_S = 120  # only so that a hang fails the test


# ---- a proxy that counts the GETs and bytes the store sends, and can hold one back ------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        rng = _parse_range(self.headers.get("Range"))
        if self.command == "GET" and proxy._hold_this(self.path, rng):
            proxy.held.set()
            proxy._release.wait(WAIT_S)
        conn = http.client.HTTPConnection(LOOPBACK, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if self.command == "GET":
            proxy._count(self.path, rng, len(data))
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # a client killed mid-request: quiet
        pass


def _parse_range(header: str | None) -> tuple[int, int] | None:
    """``bytes=a-b`` as [a, b + 1)."""
    m = re.match(r"bytes=(\d+)-(\d+)$", header or "")
    return (int(m.group(1)), int(m.group(2)) + 1) if m else None


class CountingProxy:
    """Every GET that reached the store: (path, [start, end) or None, body bytes)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self.gets: list[tuple[str, tuple[int, int] | None, int]] = []
        self._lock = threading.Lock()
        self._hold: tuple[str, tuple[int, int]] | None = None
        self.held = threading.Event()
        self._release = threading.Event()
        self._server = _Server((LOOPBACK, self.port), _Handler)
        self._server.proxy = self
        threading.Thread(target=self._server.serve_forever, daemon=True, name="counting-proxy").start()

    def _count(self, path: str, rng: tuple[int, int] | None, n: int) -> None:
        with self._lock:
            self.gets.append((path, rng, n))

    def _hold_this(self, path: str, rng: tuple[int, int] | None) -> bool:
        with self._lock:
            if self._hold is not None and path.endswith(self._hold[0]) and rng == self._hold[1]:
                self._hold = None  # the first such request only
                return True
        return False

    def hold_first(self, path_suffix: str, rng: tuple[int, int]) -> None:
        """Hold back the first GET of ``rng`` of an object whose path ends so, until :meth:`release`."""
        self.held.clear()
        self._release.clear()
        with self._lock:
            self._hold = (path_suffix, rng)

    def release(self) -> None:
        self._release.set()

    def reset(self) -> list[tuple[str, tuple[int, int] | None, int]]:
        with self._lock:
            got, self.gets = self.gets, []
        return got

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


# ---- the store, on moto, behind the proxy -------------------------------------------------------------

@pytest.fixture(scope="module")
def wstore(tmp_path_factory) -> Path:
    """A shuffled store (format 2, the default order) of 384 demo photos in records of ~90."""
    src = tmp_path_factory.mktemp("wphotos") / "photos"
    make_demo(src, per_class=48, seed=2)
    store = tmp_path_factory.mktemp("wstore") / "w.pcr"
    convert(src, store, record_bytes=4 << 20, workers=2)
    return store


@pytest.fixture(scope="module")
def layout(wstore) -> dict:
    with pcrfs.open_store(wstore) as s:
        bounds = group_bounds(s.index.record_group_offsets, s.index.records["size"])
        records = s.index.records_of(np.arange(s.num_images))
        assert s.index.shuffled and len(bounds) >= 4
        return {"prefix": {r: (int(bounds[r, 0]), int(bounds[r, K])) for r in range(len(bounds))},
                "view_bytes": int((bounds[:, K] - bounds[:, 0]).sum()), "record_of": records,
                "expect": [s.read(i, K) for i in range(s.num_images)]}


@pytest.fixture(scope="module")
def s3w(wstore, tmp_path_factory):
    why = s3_available()
    if why:
        pytest.skip(why)
    with s3_environment(tmp_path_factory.mktemp("xdg")):
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
        proxy = None
        try:
            from pcrfs.remote.fs import filesystem

            fs = filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=server.endpoint))
            fs.mkdir(BUCKET)
            fs.put(str(wstore), f"{BUCKET}/w.pcr", recursive=True)
            proxy = CountingProxy(server.port)
            yield f"s3://{BUCKET}/w.pcr", proxy
        finally:
            if proxy is not None:
                proxy.close()
            server.stop()


def raw_loader(f) -> bytes:
    return f.read()


def keep(batch):
    return batch


def tally(gets, layout) -> dict:
    """Bytes of record files sent, and how many times each record's scan5 prefix was fetched."""
    record_bytes, prefix_fetches = 0, {r: 0 for r in layout["prefix"]}
    for path, rng, n in gets:
        if "/records/" not in path:
            continue
        record_bytes += n
        for r, span in layout["prefix"].items():
            if rng == span and path.endswith(_record_name(r)):
                prefix_fetches[r] += 1
    return {"record_bytes": record_bytes, "prefix_fetches": prefix_fetches}


def _record_name(r: int) -> str:
    from pcrfs.store import format as fmt

    return fmt.record_name(r).rsplit("/", 1)[-1]


def uniform(ds, seed: int = 5):
    return torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(seed))


def epoch(ds, sampler, workers=2) -> list:
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, collate_fn=keep)
    return [item for batch in loader for item in batch]


def check_epoch(got, ds, layout, order) -> None:
    expect = layout["expect"]
    images = ds._images
    assert sorted(int(t) for _, t in got) == sorted(ds.targets)
    assert [data for data, _ in got] == [expect[int(images[j])] for j in order]


# ---- one download per node ---------------------------------------------------------------------------------

def test_two_workers_fetch_each_record_prefix_once(s3w, layout):
    url, proxy = s3w
    ds = ImageFolder(url, view=VIEW, loader=raw_loader, storage_options={"endpoint_url": proxy.endpoint})
    assert ds.cache_dir and Path(ds.cache_dir).is_dir()
    proxy.reset()
    got = epoch(ds, uniform(ds))
    order = list(uniform(ds))
    check_epoch(got, ds, layout, order)
    t = tally(proxy.reset(), layout)
    assert all(n == 1 for n in t["prefix_fetches"].values()), t["prefix_fetches"]
    assert t["record_bytes"] <= 1.15 * layout["view_bytes"], (t["record_bytes"], layout["view_bytes"])
    # the prefixes are in the one shared cache, under its cap
    cache = _shared_cache(ds)
    assert len(cache) == len(layout["prefix"]) and cache.nbytes <= cache.capacity
    # the next epoch reads them there: nothing from the store
    epoch(ds, uniform(ds, 6))
    assert tally(proxy.reset(), layout)["record_bytes"] == 0


def test_two_workers_with_the_record_shuffle_sampler(s3w, layout):
    url, proxy = s3w
    spans = [end - start for start, end in layout["prefix"].values()]
    # a window of 2 records, fewer than the store has, in a cache with room for one more: the
    # loader's batches in flight still read a record after the next one joined the window
    cache = int(3.2 * max(spans) / 0.9)
    opts = {"endpoint_url": proxy.endpoint, "cache_bytes": cache, "readahead_bytes": 0}
    ds = ImageFolder(url, view=VIEW, loader=raw_loader, storage_options=opts)
    sampler = RecordShuffleSampler(url, view=VIEW, seed=3, window=2, storage_options=opts)
    assert sampler.window == 2 < len(spans)
    proxy.reset()
    got = epoch(ds, sampler)
    check_epoch(got, ds, layout, list(sampler))
    t = tally(proxy.reset(), layout)
    assert all(n == 1 for n in t["prefix_fetches"].values()), t["prefix_fetches"]
    assert t["record_bytes"] <= 1.15 * layout["view_bytes"], (t["record_bytes"], layout["view_bytes"])
    shared = _shared_cache(ds)
    assert shared.capacity == cache and shared.nbytes <= cache


def test_fetching_ahead_of_the_sampler(s3w, layout):
    """The sampler's process fetches the records its order needs next: the workers find them in
    the shared cache (no record read image by image first), each prefix once."""
    url, proxy = s3w
    spans = [end - start for start, end in layout["prefix"].values()]
    opts = {"endpoint_url": proxy.endpoint, "cache_bytes": int(4.2 * max(spans) / 0.9), "readahead_bytes": 0}
    ds = ImageFolder(url, view=VIEW, loader=raw_loader, storage_options=opts)
    sampler = RecordShuffleSampler(url, view=VIEW, seed=4, window=2, storage_options=opts)
    proxy.reset()
    with ds.fetch_ahead(sampler) as ahead:
        got = epoch(ds, sampler)
    check_epoch(got, ds, layout, list(sampler))
    gets = proxy.reset()
    t = tally(gets, layout)
    assert all(n == 1 for n in t["prefix_fetches"].values()), t["prefix_fetches"]
    assert ahead.submitted == len(spans)
    assert t["record_bytes"] <= 1.05 * layout["view_bytes"], (t["record_bytes"], layout["view_bytes"])
    record_gets = sum(1 for path, _, _ in gets if "/records/" in path)
    assert record_gets <= 0.05 * len(got), record_gets  # the prefixes, and a few images read before them


def _shared_cache(ds) -> SharedDiskCache:
    """The shared cache of a dataset's stores, opened here (one store: one subdirectory)."""
    (sub,) = [p for p in Path(ds.cache_dir).iterdir() if p.is_dir()]
    return SharedDiskCache(sub, ds._options.shared_cache_bytes)


# ---- a process killed mid-download -------------------------------------------------------------------------

READER = textwrap.dedent("""
    import sys
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.store.read.reader import ReadOptions, open_store
    url, endpoint, directory, cap, images = sys.argv[1:6]
    options = ReadOptions(remote=RemoteOptions(endpoint_url=endpoint), shared_cache=directory,
                          shared_cache_bytes=int(cap))
    store = open_store(url, options=options)
    for i in images.split(","):
        store.read(int(i), 5)
    print("read them all", flush=True)
""")


def _locked(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _wait_until(condition, what: str) -> None:
    done = threading.Event()
    for _ in range(WAIT_S * 100):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"never happened: {what}")


def test_a_process_killed_mid_download_wedges_no_one(s3w, layout, tmp_path):
    """Process A fetches a record's prefix (held back by the proxy: A holds the record's lock);
    this process (B) needs the same record and waits for A; A is killed with SIGKILL: the
    kernel lets go of its lock, and B fetches the record itself and serves every image."""
    url, proxy = s3w
    directory, cap, r = tmp_path / "shared", 64 << 20, 1
    mine = [i for i in range(len(layout["expect"])) if layout["record_of"][i] == r]
    images = mine[:4] + mine[-4:]  # from two classes: reads of one class never fetch a prefix (EpochGate)
    proxy.hold_first(_record_name(r), layout["prefix"][r])
    a = subprocess.Popen([sys.executable, "-c", READER, url, proxy.endpoint, str(directory), str(cap),
                          ",".join(map(str, images))], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    b = None
    try:
        assert proxy.held.wait(WAIT_S), a.communicate(timeout=WAIT_S)
        (sub,) = [p for p in directory.iterdir() if p.is_dir()]
        lock = sub / "locks" / f"r{r}"
        assert _locked(lock)  # A holds it while its download hangs
        b = open_store(url, options=ReadOptions(remote=RemoteOptions(endpoint_url=proxy.endpoint),
                                                shared_cache=str(directory), shared_cache_bytes=cap))
        got: dict = {}
        reader = threading.Thread(target=lambda: got.update(data=[b.read(i, K) for i in images]))
        reader.start()
        shared = b.prefixes.disk
        _wait_until(lambda: shared.waits >= 1 or not reader.is_alive(), "B waits for A's fetch")
        assert reader.is_alive() and "data" not in got  # B is waiting, not serving
        a.send_signal(signal.SIGKILL)
        a.wait(WAIT_S)
        reader.join(WAIT_S)
        assert not reader.is_alive(), "B is wedged"
        assert got["data"] == [layout["expect"][i] for i in images]
        start, end = layout["prefix"][r]
        assert shared.size(f"r{r}") == end - start and not _locked(lock)  # B fetched it and let go
        assert not [p for p in (sub / "entries").iterdir() if p.name.endswith(".tmp")]
    finally:
        proxy.release()
        if a.poll() is None:
            a.kill()
            a.wait()
        if b is not None:
            b.close()


# ---- the cap holds across processes ----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, random, sys
    from pcrfs.store.sources.sharedcache import SharedDiskCache
    directory, cap, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cache = SharedDiskCache(directory, cap)
    rng = random.Random(seed)
    kept = 0
    for j in range(n):
        kept += cache.put(f"r{rng.randrange(12)}", os.urandom(rng.randrange(cap // 12, cap // 3)))
        if j % 3 == 0:
            cache.read(f"r{rng.randrange(12)}", 0, 10)
    print(kept, flush=True)
""")


def _bytes_on_disk(directory: Path) -> int:
    """Entries and writes in progress, each file once (a renamed one has one inode), counted
    under the directory's lock, as writers count."""
    fd = os.open(directory / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        sizes = {}
        for p in (directory / "entries").iterdir():
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            sizes[st.st_ino] = st.st_size
        return sum(sizes.values())
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_the_size_cap_holds_for_all_processes_together(tmp_path):
    directory, cap, n = tmp_path / "shared", 1 << 20, 60
    SharedDiskCache(directory, cap).close()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(cap), str(seed), str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    most = 0
    while any(w.poll() is None for w in writers):
        most = max(most, _bytes_on_disk(directory))
    outs = [w.communicate(timeout=WAIT_S) for w in writers]
    assert all(w.returncode == 0 for w in writers), outs
    kept = [int(out) for out, _ in outs]
    assert most <= cap and _bytes_on_disk(directory) <= cap, (most, cap)
    assert all(k > n // 2 for k in kept), kept  # waiting for room, not refusing: most writes are kept


def test_a_temporary_file_of_a_dead_writer_is_swept(tmp_path):
    cache = SharedDiskCache(tmp_path / "shared", 1000)
    entries = tmp_path / "shared" / "entries"
    (entries / "r5.999999.1.tmp").write_bytes(b"q" * 600)  # its writer is gone: r5's lock is free
    assert cache.nbytes == 600
    assert cache.put("r1", b"x" * 500) and not (entries / "r5.999999.1.tmp").exists()
    with cache.fetching("r7") as mine:  # a live writer of r7 (this process): its file is counted
        assert mine
        (entries / "r7.999999.1.tmp").write_bytes(b"w" * 400)
        assert cache.put("r2", b"y" * 200) and cache.size("r1") is None  # 500 + 400 + 200 > 1000
        assert (entries / "r7.999999.1.tmp").exists()
    cache.close()


def test_a_record_is_fetched_by_one_process_while_the_others_wait(tmp_path):
    a = SharedDiskCache(tmp_path / "shared", 1000)
    b = SharedDiskCache(tmp_path / "shared", 1000)  # another open file: as another process
    with a.fetching("r3", Deadline(WAIT_S)) as mine:
        assert mine
        with b.fetching("r3") as theirs:  # not waiting: somebody fetches it
            assert not theirs
        with pytest.raises(TimeoutError):
            with b.fetching("r3", Deadline(0.05)):
                pass
        assert a.put("r3", b"z" * 100)  # under the lock a fetch holds
    with b.fetching("r3", Deadline(WAIT_S)) as mine:
        assert mine and b.read("r3") == b"z" * 100
    a.close()
    b.close()


# ---- the properties of the private disk cache --------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_a_shared_directory_others_can_write_is_refused(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafeCacheDirectory):
        SharedDiskCache(d, 1000)


def test_planted_links_and_fifos_are_never_followed(tmp_path):
    cache = SharedDiskCache(tmp_path / "shared", 1 << 20)
    entries, locks = tmp_path / "shared" / "entries", tmp_path / "shared" / "locks"
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (entries / "r1").symlink_to(victim)
    os.mkfifo(entries / "r2")
    assert cache.size("r1") is None and cache.read("r1") is None and cache.read("r2") is None  # no hang
    tmp = entries / f"r3.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.symlink_to(victim)  # where this thread's next write of r3 goes
    assert cache.put("r3", b"new bytes") and cache.read("r3") == b"new bytes"
    (locks / "r4").symlink_to(victim)
    with cache.fetching("r4", Deadline(WAIT_S)) as mine:  # fetched without the lock; never stored
        assert mine and not cache.put("r4", b"data")
    assert victim.read_bytes() == b"precious"
    assert stat.S_ISLNK((locks / "r4").lstat().st_mode)
    cache.close()


# ---- the dataset's temporary cache directory ---------------------------------------------------------------

def test_the_temporary_cache_directory_lives_as_long_as_the_dataset(s3w, layout):
    url, proxy = s3w
    ds = ImageFolder(url, view="scan1", loader=raw_loader, storage_options={"endpoint_url": proxy.endpoint})
    directory = Path(ds.cache_dir)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    epoch(ds, uniform(ds), workers=2)  # forked workers end without removing it
    assert directory.is_dir()
    del ds
    gc.collect()
    assert not directory.exists()
    own = ImageFolder(url, view="scan1", storage_options={"endpoint_url": proxy.endpoint}, shared_cache=False)
    assert own.cache_dir is None
