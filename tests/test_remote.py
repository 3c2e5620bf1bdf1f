"""Stores on S3: against a real S3 API (moto's server mode) on 127.0.0.1.

A module fixture starts moto in a subprocess and stops it at the end; fault
cases go through tests/s3util.FaultProxy (500s for a while, the server going
away and coming back). Mount tests undo every mount (tests/mountutil.py).
"""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import pcrfs
from pcrfs.cli import main
from pcrfs.convert import convert
from pcrfs.remote.fs import RemoteOptions, filesystem
from pcrfs.store import format as fmt
from pcrfs.store.write import sink as sink_mod
from pcrfs.store.read.reader import ReadOptions, StoreError, StoreUnavailable, open_store
from pcrfs.access.views import ROOT_HINT_DIR

from mountutil import fuse_unavailable, pcrfs_cli, wait_until
from s3util import NO_CREDENTIALS_ENV, FaultProxy, MotoServer, s3_available, s3_environment

pytestmark = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

BUCKET = "pcrfs-test"
RECORD_BYTES = 256 * 1024  # as the demo_store fixture: several records


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """Credentials for moto, and a cache directory of our own (inherited by mount daemons)."""
    with s3_environment(tmp_path_factory.mktemp("xdg-cache")):
        yield


@pytest.fixture(scope="module")
def moto(s3_env, tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote(moto) -> RemoteOptions:
    fs = filesystem(f"s3://{BUCKET}", RemoteOptions(endpoint_url=moto.endpoint))
    fs.mkdir(BUCKET)
    return RemoteOptions(endpoint_url=moto.endpoint)


@pytest.fixture(scope="module")
def remote_store(demo_src, remote) -> str:
    """demo_src converted straight to S3 (same options as the local demo_store)."""
    url = f"s3://{BUCKET}/demo.pcr"
    convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote)
    return url


@pytest.fixture(scope="module")
def source_remote_store(demo_src, remote) -> str:
    """demo_src in path order (format version 1): records of consecutive images."""
    url = f"s3://{BUCKET}/source.pcr"
    convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote, order="source")
    return url


@pytest.fixture(scope="module", params=["source", "shuffled"])
def one_record_store(request, demo_src, remote) -> tuple[str, str]:
    """demo_src in a single record (default record size), in either storage order: readahead
    (source) or the record's prefix (shuffled) spans the whole view."""
    url = f"s3://{BUCKET}/one-record-{request.param}.pcr"
    convert(demo_src, url, workers=2, remote=remote, order=request.param)
    return url, request.param


@pytest.fixture(scope="module")
def local(demo_store):
    s = pcrfs.open_store(demo_store)
    yield s
    s.close()


def ropts(remote: RemoteOptions, **kwargs) -> ReadOptions:
    return ReadOptions(remote=remote, **kwargs)


def views(store) -> list[tuple[str, int]]:
    n = store.num_groups
    return [(f"scan{k}", k) for k in range(1, n + 1)] + [("full", n)]


def view_bytes(store, k: int) -> int:
    return sum(store.size(i, k) - 2 for i in range(store.num_images))  # stored bytes (no EOI)


def mixed_overhead(url: str, remote: RemoteOptions, k: int) -> int:
    """The most bytes a pass over a shuffled store reads twice at fidelity k (store/read/prefixpolicy.py):
    the images read one by one before the reads look like an epoch (in path order: the
    first class and the first of the next), then again within their record's prefix."""
    with open_store(url, options=ropts(remote)) as s:
        first_classes = [i for i in range(s.num_images) if s.label(i) <= 1]
        gate = sum(s.size(i, k) - 2 for i in first_classes)
    return gate


def stats_of(mnt: Path) -> dict:
    return json.loads((mnt / ".pcrfs" / "stats").read_bytes())


# ---- convert to S3, read back -------------------------------------------------------------------

def test_convert_uploads_a_complete_store(remote_store, remote, demo_store):
    fs = filesystem(remote_store, remote)
    base = remote_store[len("s3://"):]
    names = {p[len(base) + 1:] for p in fs.find(base)}
    local_names = {str(p.relative_to(demo_store)) for p in demo_store.rglob("*") if p.is_file()}
    assert names == local_names  # records, index, report, manifest: nothing more, nothing less
    for name in local_names - {fmt.MANIFEST, fmt.REPORT}:
        assert fs.cat_file(f"{base}/{name}") == (demo_store / name).read_bytes(), name
    staging = Path(os.environ["XDG_CACHE_HOME"]) / "pcrfs" / "staging"
    # staging removed when done; the empty lock file of each s3:// store stays (removing a
    # flock'ed file would let a second conversion lock a different inode)
    assert not staging.exists() or not [p for p in staging.iterdir() if p.suffix != ".lock"]


def test_remote_store_reads_like_the_local_one(remote_store, remote, local):
    opts = ropts(remote, readahead_bytes=0, cache_bytes=8 << 20, record_prefix=False)  # image by image
    with open_store(remote_store, options=opts) as s:
        assert s.num_images == local.num_images and s.classes == local.classes
        assert s.manifest["index_files"] == local.manifest["index_files"]
        # the first read of an image fetches its groups 1..k at once, one request per group
        s.read_at(7, 6, 0, 10)
        assert s.records.requests == min(6, s.n_groups(7))
        assert s.read_at(7, 6, 1000, 50000) == local.read(7, 6)[1000:51000]
        assert s.records.requests == min(6, s.n_groups(7))
        for i in range(s.num_images):
            assert s.path(i) == local.path(i) and s.label(i) == local.label(i)
            for k in (1, 2, 5, s.num_groups):
                assert s.read(i, k) == local.read(i, k)
        data = local.read(3, 4)
        assert s.read_at(3, 4, 100, 5000) == data[100:5100]


def test_index_is_downloaded_once_and_verified(remote_store, remote, tmp_path):
    opts = ropts(remote, disk_cache=str(tmp_path / "cache"), disk_cache_bytes=0)
    with open_store(remote_store, options=opts):
        pass
    index_dirs = list((tmp_path / "cache" / "index").iterdir())
    assert len(index_dirs) == 1
    # a damaged cached copy is noticed and downloaded again
    victim = index_dirs[0] / "group_lengths.npy"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with open_store(remote_store, options=opts) as s:
        assert s.read(0, 1)
    assert victim.read_bytes() != bytes(raw)


def test_manifest_is_uploaded_last_and_interrupted_conversions_resume(demo_src, remote, monkeypatch):
    url = f"s3://{BUCKET}/interrupted.pcr"
    order: list[str] = []
    real_put, real_publish = sink_mod.ObjectSink.put, sink_mod.ObjectSink.publish

    def failing_put(self, name, data):
        if name.startswith(fmt.RECORDS_DIR) and len(order) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after three records
        order.append(name)
        return real_put(self, name, data)

    monkeypatch.setattr(sink_mod.ObjectSink, "put", failing_put)
    monkeypatch.setattr(sink_mod.ObjectSink, "publish",  # index, report, manifest
                        lambda self, name, local: (order.append(name), real_publish(self, name, local))[1])
    with pytest.raises(KeyboardInterrupt):
        convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote)
    with pytest.raises(StoreError, match="unfinished conversion"):
        open_store(url, options=ropts(remote))
    monkeypatch.setattr(sink_mod.ObjectSink, "put",
                        lambda self, name, data: (order.append(name), real_put(self, name, data))[1])
    result = convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote)
    assert result.resumed_from > 0
    assert order[-1] == fmt.MANIFEST
    assert order.index(f"{fmt.INDEX_DIR}/images.npy") > max(i for i, n in enumerate(order) if n.startswith("records/"))
    with open_store(url, options=ropts(remote)) as s, open_store(f"s3://{BUCKET}/demo.pcr", options=ropts(remote)) as t:
        assert [s.read(i, 3) for i in range(s.num_images)] == [t.read(i, 3) for i in range(t.num_images)]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_record_sinks_behave_alike(kind, remote, tmp_path):
    """A record reaches a local directory and an object-store prefix through the same calls,
    with the same answers: put (chunks, never joined by the caller), size, exists, the
    record ids there, publish of a finished local file, remove."""
    root = tmp_path / "store.pcr"
    (root / fmt.RECORDS_DIR).mkdir(parents=True)
    sink = sink_mod.open_sink(str(root) if kind == "local" else f"s3://{BUCKET}/sink-{tmp_path.name}", remote)
    assert isinstance(sink, sink_mod.LocalSink if kind == "local" else sink_mod.ObjectSink)
    assert sink.record_ids() == [] and sink.size(fmt.record_name(0)) is None
    sink.put(fmt.record_name(3), [b"abc", memoryview(b"defg")])
    sink.put(fmt.record_name(1), b"x" * 10)
    assert sink.size(fmt.record_name(3)) == 7 and sink.exists(fmt.RECORDS_DIR)
    assert sink.record_ids() == [1, 3]
    assert not [p for p in (root / fmt.RECORDS_DIR).iterdir() if p.name.endswith(".tmp")]
    staged = tmp_path / "report.json"
    staged.write_bytes(b"{}")
    sink.publish(fmt.REPORT, staged)
    assert sink.size(fmt.REPORT) == 2
    sink.remove(fmt.record_name(3))
    sink.remove(fmt.record_name(3))  # gone already: not an error
    assert sink.record_ids() == [1] and not sink.exists(fmt.record_name(3))


def test_convert_refuses_to_clobber(demo_src, remote_store, remote):
    from pcrfs.convert import StoreExists

    with pytest.raises(StoreExists, match="--overwrite"):
        convert(demo_src, remote_store, record_bytes=RECORD_BYTES, remote=remote)


# ---- the command line ---------------------------------------------------------------------------

def test_cli_info_verify_get(remote_store, moto, local, tmp_path):
    ep = ["--endpoint-url", moto.endpoint]
    res = pcrfs_cli("info", remote_store, "--json", *ep)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] == local.num_images
    res = pcrfs_cli("verify", "-q", remote_store, *ep)
    assert res.returncode == 0 and "all checksums match" in res.stderr, res.stderr
    out = tmp_path / "one.jpg"
    res = pcrfs_cli("get", remote_store, local.path(5), "-k", "2", "-o", str(out), *ep)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == local.read(5, 2)


def test_verify_names_a_damaged_remote_record(demo_src, remote, moto):
    url = f"s3://{BUCKET}/damaged.pcr"
    convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote)
    fs = filesystem(url, remote)
    key = f"{BUCKET}/damaged.pcr/{fmt.record_name(1)}"
    raw = bytearray(fs.cat_file(key))
    raw[fmt.RECORD_HEADER_SIZE + 10] ^= 0xFF
    fs.pipe_file(key, bytes(raw))
    res = pcrfs_cli("verify", "-q", url, "--endpoint-url", moto.endpoint)
    assert res.returncode == 1
    assert "DAMAGED" in res.stdout and "record 1" in res.stdout


@pytest.mark.parametrize("command", ["info", "verify", "get", "mount", "convert"])
def test_missing_bucket_is_a_clear_error(command, moto, demo_src, tmp_path):
    url = "s3://no-such-bucket/x.pcr"
    args = {"info": [url], "verify": [url], "get": [url, "a.jpg"], "mount": [url, str(tmp_path)],
            "convert": [str(demo_src), url]}[command]
    res = pcrfs_cli(command, *args, "--endpoint-url", moto.endpoint)
    assert res.returncode == 1
    assert "bucket 'no-such-bucket' does not exist" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_missing_store_and_unreachable_endpoint_are_clear_errors(moto, remote):
    res = pcrfs_cli("info", f"s3://{BUCKET}/nothing-here", "--endpoint-url", moto.endpoint)
    assert res.returncode == 1 and "no such store" in res.stderr and "Traceback" not in res.stderr
    dead = FaultProxy(moto.port)
    dead.down()
    res = pcrfs_cli("info", f"s3://{BUCKET}/demo.pcr", "--endpoint-url", dead.endpoint)
    assert res.returncode == 1 and "cannot reach the object store" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_missing_credentials_are_a_clear_error(remote_store, moto):
    env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS_ENV}
    env.update({k: v for k, v in NO_CREDENTIALS_ENV.items() if v is not None})
    res = subprocess.run([sys.executable, "-m", "pcrfs.cli", "info", remote_store, "--endpoint-url", moto.endpoint],
                         capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 1
    assert "no credentials" in res.stderr and "AWS_ACCESS_KEY_ID" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


# ---- faults: retries, the server going away --------------------------------------------------------

def test_retries_ride_out_a_burst_of_500s(remote_store, moto, local):
    proxy = FaultProxy(moto.port)
    try:
        with open_store(remote_store, options=ropts(RemoteOptions(endpoint_url=proxy.endpoint),
                                                    readahead_bytes=0)) as s:
            proxy.fail_for(0.4)
            for i in (0, 30, 60):
                assert s.read(i, 4) == local.read(i, 4)
            assert proxy.failed > 0
            assert s.io_stats()["source"]["retries"] > 0
            # a fault that outlasts the retries is an error (EIO), not data; the next read works
            proxy.fail_for(30)
            with pytest.raises(StoreUnavailable) as e:
                s.read(80, 2)
            assert e.value.errno == errno.EIO
            assert "injected by the test proxy" in str(e.value)  # the server's own message, no traceback
            proxy.fail_for(0)
            assert s.read(80, 2) == local.read(80, 2)
    finally:
        proxy.close()


@needs_fuse
@pytest.mark.parametrize("order", ["source", "shuffled"])
def test_mount_reads_every_view_like_the_local_store(remote_store, source_remote_store, moto, local, mounts, order):
    url = source_remote_store if order == "source" else remote_store
    info = mounts.mount(url, "s3", read_options=ropts(RemoteOptions(endpoint_url=moto.endpoint)))
    mnt = Path(info.mountpoint)
    assert sorted(os.listdir(mnt)) == sorted([v for v, _ in views(local)] + [".pcrfs", ROOT_HINT_DIR])
    for view, k in views(local):
        for i in range(local.num_images):
            assert (mnt / view / local.path(i)).read_bytes() == local.read(i, k), (view, i)
    doc = stats_of(mnt)
    assert doc["store"] == url
    if order == "source":  # every stored byte fetched once: no duplicate downloads, nothing unused
        assert doc["store_reads"]["bytes"] == view_bytes(local, local.num_groups)
    else:  # and with mixed records, only the few images read before their record's prefix again
        remote = RemoteOptions(endpoint_url=moto.endpoint)
        assert view_bytes(local, local.num_groups) <= doc["store_reads"]["bytes"] \
            <= view_bytes(local, local.num_groups) + mixed_overhead(url, remote, 1)
    assert doc["errors"]["eio"] == 0


@needs_fuse
@pytest.mark.parametrize("k", [1, 5, 10])
def test_sequential_epoch_costs_few_requests_and_shuffled_no_waste(one_record_store, moto, local, mounts, k):
    url, storage = one_record_store
    remote = RemoteOptions(endpoint_url=moto.endpoint)
    opts = ropts(remote)
    n = local.num_images
    # what a pass reads more than the view: nothing in path order; the few images of each
    # mixed record read before its prefix
    extra = 0 if storage == "source" else mixed_overhead(url, remote, k)
    seq = Path(mounts.mount(url, f"seq{k}", read_options=opts).mountpoint)
    for i in range(n):
        (seq / f"scan{k}" / local.path(i)).read_bytes()
    doc = stats_of(seq)["store_reads"]
    assert view_bytes(local, k) <= doc["bytes"] <= view_bytes(local, k) + extra
    # mixed records: the first class read image by image, a request per group, before the
    # reads look like an epoch (store/read/prefixpolicy.py EpochGate)
    first_class = 0 if storage == "source" else sum(1 for i in range(n) if local.label(i) == 0)
    assert doc["requests"] <= 1.2 * n + k * first_class, doc

    shuf = Path(mounts.mount(url, f"shuf{k}", read_options=opts).mountpoint)
    order = list(range(n))
    random.Random(k).shuffle(order)
    for i in order:
        assert (shuf / f"scan{k}" / local.path(i)).read_bytes() == local.read(i, k)
    # readahead wasted nothing
    assert view_bytes(local, k) <= stats_of(shuf)["store_reads"]["bytes"] <= view_bytes(local, k) + extra


@needs_fuse
def test_a_walk_then_a_path_order_pass_fetches_prefixes_from_the_first_image(remote_store, moto, local, mounts):
    """torchvision's ImageFolder lists every class directory before its first read: on a store
    whose records mix the dataset that walk opens the epoch gate, so a path-order pass (a
    validation epoch) reads no image one by one -- exactly the view's bytes, a request or so
    per record. A copy of one class lists only its own directory: image by image, its bytes."""
    opts = ropts(RemoteOptions(endpoint_url=moto.endpoint))
    k, n = 5, local.num_images
    records = int((local.index.records["n_images"] > 0).sum())
    mnt = Path(mounts.mount(remote_store, "walked", read_options=opts).mountpoint) / f"scan{k}"
    files = [Path(root) / f for root, _, names in sorted(os.walk(mnt)) for f in sorted(names)]
    assert len(files) == n
    for i, f in enumerate(files):
        assert f.read_bytes() == local.read(i, k), f
    doc = stats_of(mnt.parent)
    assert doc["io"]["record_prefix"]["epoch_gate"] == "walk"
    assert doc["io"]["record_prefix"]["deferred"] == 0
    assert doc["store_reads"]["bytes"] == view_bytes(local, k)
    assert doc["store_reads"]["requests"] <= 2 * records, doc["store_reads"]

    one = Path(mounts.mount(remote_store, "oneclass", read_options=opts).mountpoint) / f"scan{k}"
    cls = local.classes[0]
    mine = [i for i in range(n) if local.label(i) == 0]
    copied = [Path(root) / f for root, _, names in os.walk(one / cls) for f in names]
    assert sorted(copied) == sorted(one / local.path(i) for i in mine)
    for f in copied:
        f.read_bytes()
    doc = stats_of(one.parent)
    assert doc["io"]["record_prefix"]["epoch_gate"] == "shut"
    assert doc["io"]["record_prefix"]["fetches"] == 0
    assert doc["store_reads"]["bytes"] <= 2 * sum(local.size(i, k) - 2 for i in mine)


@needs_fuse
def test_server_going_away_is_eio_and_the_mount_recovers(remote_store, moto, local, mounts):
    proxy = FaultProxy(moto.port)
    try:
        info = mounts.mount(remote_store, "flaky", read_options=ropts(RemoteOptions(endpoint_url=proxy.endpoint)))
        mnt = Path(info.mountpoint)
        assert (mnt / "scan2" / local.path(0)).read_bytes() == local.read(0, 2)
        proxy.down()
        victim = mnt / "full" / local.path(50)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            victim.read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t0 < 20  # bounded retries, then an answer
        doc = stats_of(mnt)  # the daemon is alive and answers
        assert doc["errors"]["eio"] >= 1
        proxy.up()
        assert wait_until(lambda: _reads(victim) == local.read(50, local.num_groups), timeout=20)
        assert (mnt / "scan3" / local.path(70)).read_bytes() == local.read(70, 3)
    finally:
        proxy.close()


def _reads(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# ---- caches and the bandwidth limit ---------------------------------------------------------------

@needs_fuse
def test_disk_cache_serves_a_remount_without_downloads(remote_store, moto, local, mounts, tmp_path):
    opts = ropts(RemoteOptions(endpoint_url=moto.endpoint), disk_cache=str(tmp_path / "dc"),
                 disk_cache_bytes=64 << 20)
    first = Path(mounts.mount(remote_store, "dc1", read_options=opts).mountpoint)
    for i in range(local.num_images):
        (first / "scan4" / local.path(i)).read_bytes()
    got = stats_of(first)["store_reads"]["bytes"]
    assert view_bytes(local, 4) <= got <= view_bytes(local, 4) + mixed_overhead(remote_store, opts.remote, 4)
    mounts.cleanup()
    second = Path(mounts.mount(remote_store, "dc2", read_options=opts).mountpoint)
    for i in range(local.num_images):
        assert (second / "scan3" / local.path(i)).read_bytes() == local.read(i, 3)
    assert stats_of(second)["store_reads"]["requests"] == 0


def test_bwlimit_caps_the_store_bandwidth(remote_store, remote, local):
    rate = 1 << 20
    with open_store(remote_store, options=ropts(remote, bwlimit=rate, readahead_bytes=0)) as s:
        s.read(0, 1)  # the bucket's burst
        t0 = time.monotonic()
        got = sum(len(s.read(i, s.num_groups)) for i in range(1, 40))
        elapsed = time.monotonic() - t0
        assert s.io_stats()["source"]["bwlimit_bytes_per_s"] == rate
    assert got > rate  # more than a second's worth
    assert elapsed >= 0.9 * got / rate


@needs_fuse
def test_mount_helper_passes_the_remote_options(remote_store, moto, local, mounts, tmp_path):
    """`mount -t pcrfs s3://... DIR -o endpoint_url=...` (an fstab line) reaches the store."""
    from pcrfs.fuse.mount_helper import main as mount_pcrfs

    mnt = mounts.point("helper-s3")
    cache = tmp_path / "disk-cache"
    opts = f"endpoint_url={moto.endpoint},bwlimit=64M,disk_cache={cache},disk_cache_size=1G,readahead=0,_netdev"
    assert mount_pcrfs([remote_store, str(mnt), "-o", opts]) == 0
    mounts.track(mnt)
    for i in range(local.num_images):
        assert (mnt / "scan3" / local.path(i)).read_bytes() == local.read(i, 3)
    io = stats_of(mnt)["io"]
    assert io["source"]["bwlimit_bytes_per_s"] == 64 << 20
    assert any(cache.rglob("*")), "the disk cache was not used"


def test_mount_helper_rejects_malformed_options(remote_store, tmp_path, capsys):
    from pcrfs.fuse.mount_helper import main as mount_pcrfs

    # -f (fake) checks the options and mounts nothing
    assert mount_pcrfs([remote_store, str(tmp_path), "-f", "-o", "readahead=lots"]) == 32
    assert "readahead" in capsys.readouterr().err
    assert mount_pcrfs([remote_store, str(tmp_path), "-f", "-o", "bwlimit=fast"]) == 32
    assert "bwlimit" in capsys.readouterr().err


@needs_fuse
def test_adaptive_views_of_a_remote_store(demo_src, remote, moto, local, mounts):
    """`pcrfs quality s3://... --write-index` installs the adaptive index in the bucket
    (array first, manifest last) and a mount of the URL serves ssim90/95/98."""
    from pcrfs.store.format import adaptiveindex as adaptive
    from pcrfs.store.write import install

    url = f"s3://{BUCKET}/adaptive.pcr"
    convert(demo_src, url, record_bytes=RECORD_BYTES, workers=2, remote=remote)
    res = CliRunner().invoke(main, ["quality", url, "--write-index", "-q", "-j", "2", "--json",
                                    "--endpoint-url", moto.endpoint])
    assert res.exit_code == 0, res.output
    entry = json.loads(res.output)
    store = pcrfs.open_store(url, options=ropts(remote))
    index = adaptive.load(store)
    assert index is not None and index.views == ["ssim90", "ssim95", "ssim98"]
    fs = filesystem(url, remote)
    assert fs.exists(f"{BUCKET}/adaptive.pcr/index/{entry['file']}")

    mnt = Path(mounts.mount(url, "adaptive", read_options=ropts(remote)).mountpoint)
    for view in index.views:
        ks = index.column(view, local.num_groups)
        for i in range(0, local.num_images, 7):
            data = (mnt / view / local.path(i)).read_bytes()
            assert data == local.read(i, int(ks[i])), (view, i)
    # replaced: the new array is in place and named by the manifest, the old one is gone
    whole = np.full_like(index.ks, local.num_groups)
    again = install.adaptive_index(store, whole)
    assert again["file"] != entry["file"]
    assert fs.exists(f"{BUCKET}/adaptive.pcr/index/{again['file']}")
    assert not fs.exists(f"{BUCKET}/adaptive.pcr/index/{entry['file']}")
    assert np.array_equal(adaptive.load(pcrfs.open_store(url, options=ropts(remote))).ks, whole)


def test_opening_a_store_on_an_endpoint_that_never_answers_ends_within_the_read_deadline():
    """An endpoint that accepts connections and never answers: opening a store there (its
    first request, the manifest) gives up within the read deadline, all retries included --
    before, attempts x read timeout (2.5 minutes at the defaults)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accepted, never answered
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        remote = RemoteOptions(endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}", read_deadline=2.0)
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            open_store("s3://bucket/x.pcr", options=ReadOptions(remote=remote))
        took = time.monotonic() - t0
        assert took < 8, took           # one 2 s attempt and no retry past the deadline; 5 attempts were ~12 s
        assert "s3://bucket/x.pcr" in str(e.value) and "\n" not in str(e.value)
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        server.close()
