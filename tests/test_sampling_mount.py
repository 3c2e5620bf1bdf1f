"""RecordShuffleSampler sized by the mount it reads, opened with nothing but the mount.

Real FUSE mounts (tests/mountutil.py), real photos, and for the S3 cases a real S3
API (moto on loopback, tests/s3util.py): a sampler given ``MNT/scanK`` of an
``s3://`` mount works in a process with no credentials and no endpoint, and a
sampler given the URL takes ``storage_options`` and leaves no record client or
session behind.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from pcrfs.access.sampling import (HEADROOM, IN_FLIGHT_RECORDS, RecordShuffleSampler, WindowWarning, ahead_window,
                            catalogue_fingerprint, default_window)
from pcrfs.store.read.prefixpolicy import group_bounds
from pcrfs.store.read.reader import ReadOptions, open_store

from mountutil import fuse_unavailable
from s3util import NO_CREDENTIALS_ENV, s3_available, store_on_moto

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

CACHE = 4 << 20  # --cache-size 4M


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    """320 photos in 1 MiB records: the scan5 view is bigger than a 4 MiB cache."""
    from pcrfs.convert import convert
    from pcrfs.demo import make_demo

    base = tmp_path_factory.mktemp("big")
    make_demo(base / "photos", per_class=40, seed=2)
    convert(base / "photos", base / "big.pcr", record_bytes=1 << 20, workers=2)
    return base / "big.pcr"


def spans(store, k: int) -> np.ndarray:
    b = group_bounds(store.index.record_group_offsets, store.index.records["size"])
    return b[:, k] - b[:, 0]


def read_file(path: str) -> int:
    with open(path, "rb") as f:
        return len(f.read())


def test_the_default_window_fits_a_4M_mount(big_store, mounts):
    """Left at its defaults over a mount with --cache-size 4M, the sampler's window is as many
    records as the mount's cache holds at their largest prefix for the view (with the mount's
    10 % headroom), not what the sampler's own 256 MiB default would give (every record)."""
    from torchvision import datasets

    with open_store(big_store) as s:
        view_spans = spans(s, 5)
        records = len(s.index.records)
        assert RecordShuffleSampler(s, view="scan5").window >= records  # sized by 256 MiB: the whole view
    assert view_spans.sum() > CACHE  # the view does not fit: the window must
    mnt = Path(mounts.mount(big_store, "m", cache_size="4M").mountpoint)
    sampler = RecordShuffleSampler(mnt / "scan5", seed=0)
    assert sampler.cache_bytes == CACHE and sampler.view == "scan5"
    assert 2 <= sampler.window < records
    # the window and the record the loader's batches in flight still read fit, one more would not
    # (a local store: read image by image, nothing fetched ahead, so all of it)
    w = sampler.window + IN_FLIGHT_RECORDS
    assert w * view_spans.max() <= HEADROOM * CACHE < (w + 1) * view_spans.max()
    ds = datasets.ImageFolder(str(mnt / "scan5"), loader=read_file)
    assert sorted(sampler) == list(range(len(ds)))


def test_a_window_that_does_not_fit_the_mount_is_clamped_with_a_warning(big_store, mounts):
    """On a mount that fetches record prefixes (as a remote store's mount does), a window
    larger than its cache holds is clamped, with a warning saying what cache it would need;
    on one that reads image by image (a local store's, by default) it is taken as asked."""
    mnt = Path(mounts.mount(big_store, "m", cache_size="4M", read_options=ReadOptions(record_prefix=True)).mountpoint)
    with open_store(big_store) as store:
        fits = default_window(store, "full", CACHE)  # the largest window the mount holds
    assert RecordShuffleSampler(mnt / "full").window == ahead_window(fits)  # the default: half of it
    with pytest.warns(WindowWarning, match=r"does not fit .* at least \d+ bytes \(the mount's --cache-size\)"):
        s = RecordShuffleSampler(mnt / "full", window=fits + 5)
    assert s.window == fits
    with pytest.warns(WindowWarning, match="more than"):
        s = RecordShuffleSampler(mnt, view="full", cache_bytes=256 << 20)  # the mount root and a view
    assert s.window == ahead_window(fits) and s.cache_bytes == CACHE and s.view == "full"
    assert RecordShuffleSampler(mnt / "full", window=fits).window == fits  # what fits: no warning
    small = RecordShuffleSampler(mnt / "full", cache_bytes=CACHE // 4)  # less than the mount keeps: taken
    assert small.window <= fits and small.cache_bytes == CACHE // 4
    with pytest.raises(ValueError, match="storage_options"):
        RecordShuffleSampler(mnt / "full", storage_options={"endpoint_url": "http://127.0.0.1:1"})

    plain = Path(mounts.mount(big_store, "plain", cache_size="4M").mountpoint)
    assert RecordShuffleSampler(plain / "full").window == fits  # the default fits the cache all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error", WindowWarning)
        assert RecordShuffleSampler(plain / "full", window=fits + 5).window == fits + 5


def test_the_mount_and_the_store_give_the_same_catalogue(big_store, mounts):
    """Opened from the mount's index copy or from the store, the catalogue is the same:
    same order, same fingerprint, so a state moves between them."""
    mnt = Path(mounts.mount(big_store, "m", cache_size="4M").mountpoint)
    via_mount = RecordShuffleSampler(mnt / "scan3", window=3, seed=4)
    with open_store(big_store) as s:
        direct = RecordShuffleSampler(s, view="scan3", window=3, seed=4)
        assert via_mount.fingerprint == direct.fingerprint == catalogue_fingerprint(
            direct.images, s.index.records_of(direct.images), s.index.paths.blob())
    assert list(via_mount) == list(direct)
    it = iter(direct)
    [next(it) for _ in range(11)]
    via_mount.load_state_dict(direct.state_dict())
    assert list(via_mount) == list(direct.indices()[11:])


# ---- S3 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def on_moto(demo_store, tmp_path_factory):
    """demo_store on a private moto server: (URL, endpoint)."""
    with store_on_moto(demo_store, "sampler-test", "demo.pcr", tmp_path_factory) as (path, endpoint):
        yield f"s3://{path}", endpoint


def run_python(code: str, env: dict, tmp_path: Path) -> dict:
    """``code`` in a fresh interpreter with ``env``; its last stdout line as JSON, its stderr checked clean."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "loop" not in res.stderr, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def no_credentials(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in NO_CREDENTIALS_ENV and k != "AWS_ENDPOINT_URL"}
    env.update({k: v for k, v in NO_CREDENTIALS_ENV.items() if v is not None})
    env["XDG_CACHE_HOME"] = str(tmp_path / "empty-cache")  # not the mount's: nothing to find there
    return env


@pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
def test_a_mounted_s3_view_needs_no_credentials_and_no_endpoint(on_moto, demo_store, reader, mounts, tmp_path):
    from pcrfs.remote.fs import RemoteOptions

    url, endpoint = on_moto
    info = mounts.mount(url, "s3", cache_size="4M",
                        read_options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint)))
    mnt = Path(info.mountpoint)
    capacity = json.loads((mnt / ".pcrfs" / "stats").read_bytes())["cache"]["capacity"]
    got = run_python(f"""
        import json
        from pcrfs.sampling import RecordShuffleSampler
        import pcrfs.store.sources.backends as backends
        s = RecordShuffleSampler({str(mnt / "scan2")!r}, seed=1)
        print(json.dumps({{"order": list(s), "window": s.window, "cache": s.cache_bytes, "view": s.view,
                          "fingerprint": s.fingerprint, "obstore": backends._obstore_pid}}))
        """, no_credentials(tmp_path), tmp_path)
    assert got["cache"] == capacity and got["view"] == "scan2" and got["obstore"] is None
    local = RecordShuffleSampler(reader, view="scan2", seed=1, window=got["window"])
    assert got["order"] == list(local) and got["fingerprint"] == local.fingerprint
    assert not (tmp_path / "empty-cache").exists()  # nothing downloaded


@pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
def test_an_s3_url_takes_storage_options_and_leaves_nothing_open(on_moto, reader, tmp_path):
    """The URL form with ``storage_options`` (no AWS_ENDPOINT_URL): the same epoch as the local
    store; no record client opened in the process that forks the workers; its s3fs session
    closed at once; DataLoader workers over it and the interpreter's exit print nothing."""
    url, endpoint = on_moto
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    got = run_python(f"""
        import json, weakref
        import s3fs, torch
        from pcrfs.sampling import RecordShuffleSampler
        import pcrfs.store.sources.backends as backends
        s = RecordShuffleSampler({url!r}, view="scan2", seed=1, window=3,
                                 storage_options={{"endpoint_url": {endpoint!r}}})
        sessions = [f for f in weakref.finalize._registry
                    if f.peek() is not None and isinstance(f.peek()[0], s3fs.S3FileSystem)]
        dl = torch.utils.data.DataLoader(list(range(len(s))), batch_size=8, sampler=s, num_workers=2)
        loaded = [i for b in dl for i in b.tolist()]
        print(json.dumps({{"order": list(s), "loaded": loaded, "obstore": backends._obstore_pid,
                          "open_sessions": len(sessions), "cache": s.cache_bytes}}))
        """, env, tmp_path)
    local = RecordShuffleSampler(reader, view="scan2", seed=1, window=3)
    assert got["order"] == got["loaded"] == list(local)
    assert got["obstore"] is None and got["open_sessions"] == 0
    assert got["cache"] == 4 * (16 << 20)  # what a store opened with these options keeps (readahead's 4 windows)


def test_an_index_copy_changed_since_the_mount_is_refused(demo_store, mounts, tmp_path):
    """The mount's index copy is checked against the manifest's CRC-32s, as open_store does:
    a copy changed under the mount is an error naming it, not a silently other catalogue."""
    import shutil

    from pcrfs.store.errors import StoreError

    store = tmp_path / "copy.pcr"
    shutil.copytree(demo_store, store)
    mnt = Path(mounts.mount(store, "m").mountpoint)
    assert len(RecordShuffleSampler(mnt / "scan2", window=2)) == len(RecordShuffleSampler(store, window=2))
    paths = store / "index" / "paths.bin"
    data = bytearray(paths.read_bytes())
    data[0] ^= 1
    paths.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"index copy of the mount .*CRC.*store's location"):
        RecordShuffleSampler(mnt / "scan2", window=2)


@pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
def test_the_sampler_tells_an_s3_mount_what_it_reads_next(on_moto, mounts, tmp_path):
    """Iterated over a mounted view, the sampler names the records it reads next (an extended
    attribute on the mount's root): the mount fetches each record's prefix ahead, once, and
    reads no image one by one -- every GET is a prefix part. Malformed hints are EINVAL."""
    from pcrfs.remote.fs import RemoteOptions
    from torchvision import datasets

    url, endpoint = on_moto
    info = mounts.mount(url, "hint", cache_size="4M",
                        read_options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint), readahead_bytes=0))
    mnt = Path(info.mountpoint)
    ds = datasets.ImageFolder(str(mnt / "scan2"), loader=read_file)
    sampler = RecordShuffleSampler(mnt / "scan2", seed=2)
    # records fetched whole and mixing the dataset: half the window that fits, the rest of the
    # cache for the records fetched ahead
    with open_store(url, options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint))) as s:
        fits = int(HEADROOM * (4 << 20) // spans(s, 2).max()) - IN_FLIGHT_RECORDS
    assert sampler.window == ahead_window(max(1, fits))
    it = iter(sampler)
    first = next(it)
    stats = lambda: json.loads(os.getxattr(mnt, "user.pcrfs.stats"))  # noqa: E731
    for _ in range(500):  # the hints come from a thread that polls the sampler's position
        if stats()["fetch_ahead_hints"]:
            break
        time.sleep(0.01)
    for j in [first, *it]:
        read_file(ds.samples[j][0])
    st = stats()
    prefix = st["io"]["record_prefix"]
    assert st["fetch_ahead_hints"] >= 1 and prefix["prefetched"] >= 1
    assert prefix["deferred"] == 0 and prefix["declined"] == 0   # no image read one by one ...
    assert st["io"]["source"]["requests"] == prefix["parts"]      # ... every GET a prefix part
    with open_store(url, options=ReadOptions(remote=RemoteOptions(endpoint_url=endpoint))) as s:
        assert prefix["fetches"] == len(s.index.records)          # each record once
        n_records = len(s.index.records)
    for bad in ("x", "1", "1.0", f"{n_records}.1", "0.99", "0.1,", "-1.1"):
        with pytest.raises(OSError) as e:
            os.getxattr(mnt, "user.pcrfs.fetch_ahead." + bad)
        assert e.value.errno == errno.EINVAL, bad
    with pytest.raises(OSError):
        os.getxattr(mnt / "scan2", "user.pcrfs.fetch_ahead.0.1")  # the root only
