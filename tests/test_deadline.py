"""One deadline per read: against an endpoint that accepts and never answers, a read is EIO in bounded time.

A store is opened through :class:`SilentProxy`, a TCP forwarder on 127.0.0.1 in front
of a real S3 API (moto): the manifest and index come through it, then the proxy goes
silent -- it keeps accepting connections and reading requests, and never answers,
on new connections and on the ones the clients keep alive. Every read must then end
(EIO) within its deadline (``read_deadline``, ``--read-deadline``) plus a margin,
whatever the retries and paths inside (record prefix, per-image fallback, waiting on
another reader's fetch), and a reader through the mount must stay killable.

Timings are asserted against generous bounds (a 3 s deadline, 20 s allowed): before
the deadline existed the same reads took 5 minutes here (5 tries x 30 s, for the record
prefix and again image by image) and up to 10 in the issue's measurements, and a
reader interrupted with Ctrl-C waited all that time.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pcrfs.remote.fs import RemoteOptions, filesystem
from pcrfs.store.errors import StoreUnavailable
from pcrfs.store.read.reader import ReadOptions, open_store

from mountutil import fuse_unavailable, wait_until
from s3util import LOOPBACK, MotoServer, s3_available, s3_environment

pytestmark = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

BUCKET = "pcrfs-deadline"
DEADLINE = 3.0   # seconds: the read deadline the tests set
BOUND = 20.0     # seconds a read may take in all against the silent endpoint (deadline + a wide margin)


class SilentProxy:
    """A TCP forwarder on loopback to ``upstream_port`` that can go silent: then it still
    accepts connections and reads what clients send, and answers nothing, on new and on
    kept-alive connections alike (an overloaded or black-holed endpoint)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._silent = threading.Event()
        self._closed = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted_while_silent = 0
        threading.Thread(target=self._accept, daemon=True, name="silent-proxy").start()

    def silence(self) -> None:
        self._silent.set()

    def speak(self) -> None:
        self._silent.clear()

    def _keep(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.extend(socks)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._keep(client)
            if self._silent.is_set():
                self.accepted_while_silent += 1
                threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection((LOOPBACK, self.upstream_port))
            except OSError:
                client.close()
                continue
            self._keep(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket | None) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if dst is not None and not self._silent.is_set():
                    dst.sendall(data)
                # silent: requests (and answers in transit) are swallowed
        except OSError:
            pass
        finally:
            if dst is not None and not self._silent.is_set():
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self._silent.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with s3_environment(tmp_path_factory.mktemp("xdg-cache")):
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
        filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=server.endpoint)).mkdir(BUCKET)
        yield server
        server.stop()


@pytest.fixture(scope="module")
def url(moto, demo_store) -> str:
    url = f"s3://{BUCKET}/demo.pcr"
    fs = filesystem(url, RemoteOptions(endpoint_url=moto.endpoint))
    fs.put(str(demo_store), f"{BUCKET}/demo.pcr", recursive=True)
    return url


@pytest.fixture
def proxy(moto):
    p = SilentProxy(moto.port)
    yield p
    p.close()


def options(endpoint: str, deadline: float | None = DEADLINE, **kwargs) -> ReadOptions:
    return ReadOptions(remote=RemoteOptions(endpoint_url=endpoint, read_deadline=deadline), **kwargs)


def eio_within(fn, bound: float = BOUND) -> tuple[OSError, float]:
    """Run ``fn``; it must fail with an EIO OSError within ``bound`` seconds: (error, seconds)."""
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        fn()
    took = time.monotonic() - t0
    assert e.value.errno == errno.EIO, e.value
    assert took < bound, f"EIO after {took:.1f}s"
    return e.value, took


# ---- the deadline itself (no network) -------------------------------------------------------------

def test_a_wait_ends_at_the_deadline_and_leaves_a_shared_future_alone():
    from concurrent.futures import Future

    from pcrfs.remote.deadline import Deadline, DeadlineExceeded

    d = Deadline(0.2)
    shared = Future()  # another reader's fetch in flight: never cancelled by a waiter giving up
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as e:
        d.wait(shared, "a fetch")
    assert 0.15 < time.monotonic() - t0 < 5
    assert e.value.errno == errno.EIO and "a fetch" in str(e.value) and "0.2 s" in str(e.value)
    assert not shared.cancelled()
    shared.set_result(b"late")  # its owner can still complete it
    assert Deadline(0.2).wait(shared, "done") == b"late"


def test_scopes_nest_into_one_deadline_and_work_runs_under_it():
    from pcrfs.remote import deadline as dl

    assert dl.current() is None
    with dl.scope(5) as outer:
        with dl.scope(60) as inner:
            assert inner is outer and dl.current() is outer  # a read's layers share its deadline
        with ThreadPoolExecutor(1) as pool:
            seen = pool.submit(outer.run, lambda: (dl.current(), dl.in_worker())).result()
            assert seen == (outer, True)
            assert pool.submit(lambda: (dl.current(), dl.in_worker())).result() == (None, False)
    assert dl.current() is None


def test_wait_all_raises_the_first_failure_at_once_and_cancels_the_rest():
    from pcrfs.remote.deadline import Deadline

    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        def fail():
            raise ConnectionError("boom")
        futures = [pool.submit(fail), pool.submit(gate.wait, 30), pool.submit(gate.wait, 30)]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError):
            Deadline(30).wait_all(futures, "three")
        assert time.monotonic() - t0 < 10
        gate.set()
    assert futures[2].cancelled() or futures[2].done()


def test_an_interrupted_request_stops_the_wait_at_once():
    from concurrent.futures import Future

    from pcrfs.remote import deadline as dl

    asked = []

    def probe() -> bool:
        asked.append(1)
        return len(asked) >= 3
    dl.set_interrupt_probe(probe)
    try:
        t0 = time.monotonic()
        with pytest.raises(dl.Interrupted) as e:
            dl.Deadline(60).wait(Future(), "a read")
        assert e.value.errno == errno.EINTR and time.monotonic() - t0 < 10
    finally:
        dl.set_interrupt_probe(None)


def test_retries_stop_when_the_deadline_leaves_no_time_for_another_try():
    from pcrfs.remote.deadline import Deadline
    from pcrfs.remote.retry import RetryPolicy

    calls = []

    def slow_failure():  # each try takes 0.3 s: after the first, 0.2 s of a 0.5 s deadline is too little
        calls.append(time.monotonic())
        time.sleep(0.3)
        raise ConnectionError("no answer")
    policy = RetryPolicy(attempts=100, base=0.001, max_delay=0.001)
    # the try's own error, or the deadline's if a loaded machine stretched that try past it
    with pytest.raises(OSError):
        policy.call(slow_failure, deadline=Deadline(0.5))
    assert len(calls) == 1 and policy.retried == 0

    fast = []

    def fast_failure():  # quick failures are retried until the deadline, never past it
        fast.append(1)
        raise ConnectionError("refused")
    t0 = time.monotonic()
    with pytest.raises(OSError):  # ConnectionError, or the deadline's own error
        RetryPolicy(attempts=10**6, base=0.01, max_delay=0.02).call(fast_failure, deadline=Deadline(0.5))
    assert len(fast) > 3 and time.monotonic() - t0 < 5


# ---- reads through the Store API -----------------------------------------------------------------

@pytest.mark.parametrize("client", ["obstore", "s3fs"])
@pytest.mark.parametrize("path", ["prefix-full", "prefix-scan1", "per-image"])
def test_a_read_against_a_silent_endpoint_is_eio_within_the_deadline(url, proxy, monkeypatch, client, path):
    monkeypatch.setenv("PCRFS_S3_CLIENT", client)
    kwargs = {"record_prefix": False, "readahead_bytes": 0} if path == "per-image" else {}
    with open_store(url, options=options(proxy.endpoint, **kwargs)) as s:
        k = 1 if path == "prefix-scan1" else s.num_groups
        assert s.read(0, k)  # the endpoint answers: the store works
        proxy.silence()
        e, _ = eio_within(lambda: s.read(s.num_images // 2, k))
        assert isinstance(e, StoreUnavailable)
        assert "Traceback" not in str(e)


def test_readers_waiting_on_one_fetch_each_end_by_their_deadline(url, proxy):
    with open_store(url, options=options(proxy.endpoint)) as s:
        assert s.read(0, 1)
        proxy.silence()
        first = s.num_images // 2
        r = s.ranges(first, 1)[0].record
        same_record = [i for i in range(s.num_images) if s.ranges(i, 1)[0].record == r][:8]
        t0 = time.monotonic()
        with ThreadPoolExecutor(len(same_record)) as pool:
            outcomes = list(pool.map(lambda i: _error_of(lambda: s.read(i, s.num_groups)), same_record))
        took = time.monotonic() - t0
        assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in outcomes), outcomes
        assert took < BOUND, f"{len(same_record)} readers of one record: EIO after {took:.1f}s"


def test_the_store_reads_again_once_the_endpoint_answers(url, proxy, reader):
    with open_store(url, options=options(proxy.endpoint)) as s:
        assert s.read(0, 2) == reader.read(0, 2)
        proxy.silence()
        eio_within(lambda: s.read(40, 2))
        proxy.speak()
        assert wait_until(lambda: _error_of(lambda: s.read(40, 2)) is None, timeout=30, step=0.5)
        assert s.read(40, 2) == reader.read(40, 2)


def test_no_deadline_when_asked_and_the_default_is_documented():
    from pcrfs.fuse.config import BY_NAME, MountConfig
    from pcrfs.remote.deadline import DEFAULT_READ_DEADLINE

    assert 0 < DEFAULT_READ_DEADLINE <= 30 and RemoteOptions().read_deadline == DEFAULT_READ_DEADLINE
    assert RemoteOptions(read_deadline=3, read_timeout=30, connect_timeout=5).timeouts() == (3, 3)
    assert RemoteOptions(read_deadline=None).timeouts() == (5.0, 30.0)
    with pytest.raises(ValueError):
        RemoteOptions(read_deadline=-1)
    option = BY_NAME["read_deadline"]
    assert f"{DEFAULT_READ_DEADLINE:g}" == option.default and "EIO" in option.help
    c = MountConfig.from_values("s3://b/s", "/mnt", {"read_deadline": "2.5"})
    assert c.read_options().remote.read_deadline == 2.5
    assert MountConfig.from_argv(c.to_argv()) == c
    off = MountConfig.from_values("s3://b/s", "/mnt", {"read_deadline": "off"})
    assert off.read_options().remote.read_deadline is None
    assert MountConfig.from_fstab("s3://b/s", "/mnt", ["read_deadline=7"]).read_deadline == 7.0
    from pcrfs.access import read_options
    assert read_options({"read_deadline": 4}).remote.read_deadline == 4  # the dataset's and fsspec's options


def _error_of(fn) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - returned for the caller to check
        return e
    return None


# ---- reads through the mount -------------------------------------------------------------------

READER = """
import sys, time
t0 = time.monotonic()
try:
    with open(sys.argv[1], "rb", buffering=0) as f:
        f.read()
    print("ok", time.monotonic() - t0)
except OSError as e:
    print("errno", e.errno, time.monotonic() - t0)
"""


def start_reader(path: Path) -> subprocess.Popen:
    """A process reading ``path`` whole (prints 'ok SECONDS' or 'errno N SECONDS')."""
    return subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def in_d_state_or_sleeping(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@needs_fuse
@pytest.mark.parametrize("view", ["full", "scan1"])
def test_a_mount_read_against_a_silent_endpoint_is_eio_within_the_deadline(url, proxy, reader, mounts, view):
    mnt = Path(mounts.mount(url, f"silent-{view}", read_options=options(proxy.endpoint)).mountpoint)
    k = reader.num_groups if view == "full" else 1
    assert (mnt / view / reader.path(0)).read_bytes() == reader.read(0, k)
    proxy.silence()
    victims = [reader.num_images // 2 + j for j in range(4)]  # one record's images, read at once
    t0 = time.monotonic()
    procs = [start_reader(mnt / view / reader.path(i)) for i in victims]
    for p in procs:
        out, err = p.communicate(timeout=BOUND * 3)  # (a hang fails here, not forever)
        assert out.split()[:2] == ["errno", str(errno.EIO)], (out, err)
    took = time.monotonic() - t0
    assert took < BOUND, f"{len(procs)} readers through the mount: EIO after {took:.1f}s"
    # the daemon is alive, serves what it holds, and counted the failures
    assert (mnt / view / reader.path(0)).read_bytes() == reader.read(0, k)
    proxy.speak()
    victim = mnt / view / reader.path(victims[0])
    assert wait_until(lambda: _error_of(victim.read_bytes) is None, timeout=30, step=0.5)
    assert victim.read_bytes() == reader.read(victims[0], k)


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_reader_blocked_on_a_silent_endpoint_can_be_killed(url, proxy, reader, mounts, sig):
    # a deadline far longer than the test allows for: the signal is what must end the read
    slow = 120.0
    mnt = Path(mounts.mount(url, f"kill{sig}", read_options=options(proxy.endpoint, slow)).mountpoint)
    assert (mnt / "full" / reader.path(0)).read_bytes() == reader.read(0, reader.num_groups)
    proxy.silence()
    p = start_reader(mnt / "full" / reader.path(reader.num_images // 2))
    try:
        time.sleep(1.5)  # blocked in read() by now, its request in the daemon
        assert p.poll() is None, p.communicate()
        state = in_d_state_or_sleeping(p.pid)
        t0 = time.monotonic()
        p.send_signal(sig)
        p.wait(timeout=BOUND * 3)
        took = time.monotonic() - t0
        assert took < BOUND, f"a reader ({state}) took {took:.1f}s to die after signal {sig!r}"
        assert p.returncode != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
