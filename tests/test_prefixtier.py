"""Record-prefix fetching against a real S3 API (moto on 127.0.0.1) and through real mounts.

Shuffled reads of a remote store fetch each record's group-1..k span once (a few
ranged GETs), check every group, and serve the record's other images from it; the
disk cache keeps prefixes for the next mount; damage -- a bad group in the object,
a part that fails, a truncated object -- is EIO for exactly the images it touches.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

from pcrfs.remote.fs import RemoteOptions, filesystem
from pcrfs.store import format as fmt
from pcrfs.store.sources.cache import PrefixKey
from pcrfs.store.errors import CorruptData, StoreUnavailable
from pcrfs.store.read.reader import ReadOptions, open_store

from mountutil import fuse_unavailable
from s3util import MotoServer, s3_available, s3_environment

pytestmark = pytest.mark.skipif(s3_available() is not None, reason=str(s3_available()))
needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

BUCKET = "pcrfs-prefix"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with s3_environment(tmp_path_factory.mktemp("xdg-cache")):
        server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
        remote = RemoteOptions(endpoint_url=server.endpoint)
        filesystem(f"s3://{BUCKET}", remote).mkdir(BUCKET)
        yield server
        server.stop()


@pytest.fixture(scope="module")
def remote(moto) -> RemoteOptions:
    return RemoteOptions(endpoint_url=moto.endpoint)


def upload(store: Path, name: str, remote: RemoteOptions, record_bytes: dict[int, bytes] | None = None) -> str:
    """A copy of the local ``store`` at s3://BUCKET/name, with some record objects replaced."""
    url = f"s3://{BUCKET}/{name}"
    fs = filesystem(url, remote)
    base = url[len("s3://"):]
    files = sorted(p for p in store.rglob("*") if p.is_file() and p.name != fmt.MANIFEST)
    for p in files + [store / fmt.MANIFEST]:
        fs.put_file(str(p), f"{base}/{p.relative_to(store)}")
    for r, data in (record_bytes or {}).items():
        fs.pipe_file(f"{base}/{fmt.record_name(r)}", data)
    return url


@pytest.fixture(scope="module")
def url(source_store, remote) -> str:
    """Records of consecutive images (format version 1): a record's prefix is fetched on its
    first read. Records that mix the dataset: test_mixed_records_* below."""
    return upload(source_store, "demo.pcr", remote)


@pytest.fixture(scope="module")
def reader(source_store):
    s = open_store(source_store)
    yield s
    s.close()


@pytest.fixture(scope="module")
def mixed_url(demo_store, remote) -> str:
    return upload(demo_store, "mixed.pcr", remote)


def test_mixed_records_serve_a_small_read_image_by_image_and_an_epoch_by_prefix(demo_store, mixed_url, remote):
    """A shuffled store (format version 2): reading one class touches most records, a few
    images each -- no prefix is fetched and the bytes are that class's; an epoch (path
    order) fetches every record's prefix after a few images of each."""
    with open_store(demo_store) as intact, open_store(mixed_url, options=opts(remote)) as s:
        assert s.index.shuffled
        cls = intact.classes[0]
        mine = [i for i in range(s.num_images) if s.path(i).startswith(cls + "/")]
        assert len({s.index.record_of(i) for i in mine}) >= 3  # one class spans several records
        for i in mine:
            assert s.read(i, 3) == intact.read(i, 3)
        io = s.io_stats()
        assert io["record_prefix"]["fetches"] == 0
        class_bytes = sum(intact.size(i, 3) - 2 for i in mine)
        assert io["source"]["bytes"] <= 2 * class_bytes
    with open_store(demo_store) as intact, open_store(mixed_url, options=opts(remote)) as s:
        for i in range(s.num_images):
            assert s.read(i, 3) == intact.read(i, 3)
        io = s.io_stats()
        assert io["record_prefix"]["fetches"] >= 1
        # no more than the view plus the images read one by one before their record's prefix
        view = sum(intact.size(i, 3) - 2 for i in range(s.num_images))
        assert io["source"]["bytes"] <= 2 * view


def opts(remote: RemoteOptions, **kw) -> ReadOptions:
    kw.setdefault("readahead_bytes", 0)
    kw.setdefault("cache_bytes", 64 << 20)
    return ReadOptions(remote=remote, **kw)


def records_with_images(store) -> int:
    return int((store.index.records["n_images"] > 0).sum())


def shuffled(n: int, seed: int = 0) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ---- the happy path ---------------------------------------------------------------------------

def test_shuffled_reads_cost_one_request_per_record(url, remote, reader):
    with open_store(url, options=opts(remote)) as s:
        n = s.num_images
        assert records_with_images(s) >= 3  # the fixture has several records
        for i in shuffled(n):
            assert s.read(i, 3) == reader.read(i, 3)
        io = s.io_stats()
        assert io["source"]["requests"] == records_with_images(s)  # one part per (small) record
        view = sum(reader.size(i, 3) - 2 for i in range(n))
        assert io["source"]["bytes"] == view  # exactly the view's groups: nothing twice, nothing else
        assert io["record_prefix"]["fetches"] == records_with_images(s)
        # the second epoch, and lower fidelities, come from memory
        for i in shuffled(n, 1):
            assert s.read(i, 2) == reader.read(i, 2)
            assert s.read_at(i, 3, 100, 700) == reader.read(i, 3)[100:800]
        assert s.io_stats()["source"]["requests"] == records_with_images(s)


def test_a_higher_fidelity_extends_the_prefix(url, remote, reader):
    # adaptive views read each image at its own k: a record's prefix grows to the largest
    with open_store(url, options=opts(remote)) as s:
        r0 = [i for i in range(s.num_images) if s.index.record_of(i) == 0]
        assert s.read(r0[0], 2) == reader.read(r0[0], 2)
        assert s.read(r0[1], 5) == reader.read(r0[1], 5)
        assert s.read(r0[2], 3) == reader.read(r0[2], 3)
        assert s.records.requests == 2  # groups 1..2, then 3..5
        assert s.records.bytes_read == sum(reader.size(i, 5) - 2 for i in r0)


def test_prefixes_split_into_concurrent_parts(url, remote, reader):
    with open_store(url, options=opts(remote)) as s:
        s.prefixes.policy.part_bytes = 20_000
        s.prefixes.policy.max_parts = 4
        assert s.read(0, s.num_groups) == reader.read(0, s.num_groups)
        assert s.records.requests == 4


def test_concurrent_readers_of_a_record_wait_on_one_fetch(url, remote, reader):
    with open_store(url, options=opts(remote)) as s:
        r0 = [i for i in range(s.num_images) if s.index.record_of(i) == 0]
        barrier = threading.Barrier(8)
        errors = []

        def read(i: int) -> None:
            barrier.wait()
            try:
                assert s.read(i, 4) == reader.read(i, 4)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=read, args=(r0[j % len(r0)],)) for j in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert s.records.requests == 1


def test_the_disk_cache_serves_the_next_mount(url, remote, reader, tmp_path):
    o = opts(remote, disk_cache=str(tmp_path / "dc"), disk_cache_bytes=1 << 30, cache_bytes=1 << 20)
    with open_store(url, options=o) as s:
        for i in shuffled(s.num_images):
            s.read(i, 4)
        assert s.records.requests == records_with_images(s)
    with open_store(url, options=o) as s:
        for i in shuffled(s.num_images, 2):
            assert s.read(i, 4) == reader.read(i, 4)
            assert s.read(i, 1) == reader.read(i, 1)
        assert s.records.requests == 0
        # a damaged cache file is noticed by its CRC, dropped, and fetched again
        victim = next((tmp_path / "dc").rglob("r1"))
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0xFF
        victim.write_bytes(bytes(data))
        for i in range(s.num_images):
            assert s.read(i, 4) == reader.read(i, 4)
        assert s.records.requests == 1


def test_a_full_disk_cache_evicts_and_never_fails_reads(url, remote, reader, tmp_path, monkeypatch):
    # too small for the view: WINDOW mode; shuffled reads still all succeed
    o = opts(remote, disk_cache=str(tmp_path / "dc"), disk_cache_bytes=600_000, cache_bytes=1 << 20)
    with open_store(url, options=o) as s:
        for i in shuffled(s.num_images):
            assert s.read(i, s.num_groups) == reader.read(i, s.num_groups)
        assert s.images.disk.nbytes <= 600_000
    # a disk that refuses writes (ENOSPC): reads are served all the same
    o = opts(remote, disk_cache=str(tmp_path / "dc2"), disk_cache_bytes=1 << 30)
    with open_store(url, options=o) as s:
        def no_space(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr("pcrfs.store.sources.diskcache.DiskCache._create", staticmethod(no_space))
        for i in shuffled(s.num_images):
            assert s.read(i, 2) == reader.read(i, 2)
        assert len(s.images.disk) == 0
    # ... and with no room in memory either: one prefix, then image by image (no refetching)
    spans = reader.index.record_group_offsets[:, 2].astype(int) - reader.index.record_group_offsets[:, 0].astype(int)
    smallest = int(spans[spans > 0].min())  # a memory cache too small for any record's prefix at k=2
    o = opts(remote, disk_cache=str(tmp_path / "dc3"), disk_cache_bytes=1 << 30, cache_bytes=smallest - 1)
    with open_store(url, options=o) as s:
        for i in shuffled(s.num_images):
            assert s.read(i, 2) == reader.read(i, 2)
        assert s.io_stats()["record_prefix"]["fetches"] == 1
        assert s.records.bytes_read < 2 * sum(reader.size(i, 2) for i in range(reader.num_images))


def test_an_epoch_fetches_the_rest_of_the_view_ahead_of_its_reads(url, remote, reader):
    with open_store(url, options=opts(remote)) as s:
        prefixes = s.prefixes
        prefixes.policy.prefetch_after = 2
        records = sorted({s.index.record_of(i) for i in range(s.num_images)})
        firsts = [next(i for i in range(s.num_images) if s.index.record_of(i) == r) for r in records[:2]]
        for i in firsts:  # two records read: the other records' prefixes are fetched in the background
            assert s.read(i, 3) == reader.read(i, 3)
        deadline = time.monotonic() + 30
        while prefixes.prefetched < len(records) - 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prefixes.prefetched == len(records) - 2
        requests = s.records.requests
        assert requests == prefixes.parts  # nothing image by image
        for i in shuffled(s.num_images):  # the epoch: no more requests
            assert s.read(i, 3) == reader.read(i, 3)
        assert s.records.requests == requests
        assert s.io_stats()["record_prefix"]["fetches"] == len(records)


def test_small_caches_fall_back_to_image_reads(url, remote, reader):
    with open_store(url, options=opts(remote, cache_bytes=64 << 10)) as s:
        for i in shuffled(s.num_images)[:20]:
            assert s.read(i, 3) == reader.read(i, 3)
        assert s.io_stats()["record_prefix"]["fetches"] == 0


def test_off_for_local_stores_and_when_asked(url, remote, source_store):
    """The read tiers a store chooses when it opens, in the order reads try them."""
    with open_store(source_store) as s:
        assert s.prefixes is None and s.pread is not None and s.reads_direct
        assert s.tiers == ("memory cache", "local pread") and s.io_stats()["tiers"] == list(s.tiers)
    with open_store(source_store, options=ReadOptions(readahead_bytes=1 << 20)) as s:
        assert s.tiers == ("per-image groups",) and s.pread is None  # readahead needs the fetching machinery
    with open_store(url, options=opts(remote, record_prefix=False)) as s:
        assert s.prefixes is None and s.tiers == ("per-image groups",)
    with open_store(url, options=opts(remote)) as s:
        assert s.tiers == ("record prefixes", "per-image groups")


def test_a_declined_read_says_why_and_the_next_tier_serves_it(url, remote, reader):
    """The record-prefix tier either serves a read or declines it with a reason (a typed
    answer, never None); the per-image tier then serves it."""
    from pcrfs.store.read.tiers import Declined

    with open_store(url, options=opts(remote, cache_bytes=64 << 10)) as s:  # too small: IMAGES mode
        i = 3
        wanted = s.ranges(i, 2)
        with s.records.deadline() as deadline:
            answer = s.prefixes.serve(i, 2, wanted, deadline)
            assert isinstance(answer, Declined) and "policy" in answer.why
            assert s.images.serve(i, 2, wanted, deadline) == [reader.read(i, 2)[:-2][:wanted[0].length],
                                                              reader.read(i, 2)[wanted[0].length:-2]]


# ---- damage: exactly the affected images fail -------------------------------------------------

def damaged_group(source_store: Path, reader, i: int, g: int) -> tuple[int, bytes]:
    """Record bytes of image i's record with a byte of its group g flipped."""
    rng = reader.ranges(i, g)[g - 1]
    data = bytearray((source_store / fmt.record_name(rng.record)).read_bytes())
    data[rng.offset + rng.length // 2] ^= 0x55
    return rng.record, bytes(data)


def affected(reader, record: int, k: int, bad: set[tuple[int, int]]) -> set[int]:
    return {i for i, g in bad if g <= min(k, reader.n_groups(i))}


def test_a_damaged_group_is_eio_for_its_image_only(source_store, remote, reader):
    victim = 30
    r, data = damaged_group(source_store, reader, victim, 3)
    url = upload(source_store, "bad-group.pcr", remote, {r: data})
    with open_store(url, options=opts(remote)) as s:
        for k in (2, 3, s.num_groups):
            for i in shuffled(s.num_images, k):
                if i == victim and k >= 3:
                    with pytest.raises(CorruptData) as e:
                        s.read(i, k)
                    assert e.value.errno == errno.EIO and "scan group 3" in str(e.value)
                else:
                    assert s.read(i, k) == reader.read(i, k), (i, k)
        assert s.io_stats()["record_prefix"]["bad_groups"] >= 1


def test_a_failing_part_is_eio_for_the_images_in_it_and_heals(url, remote, reader):
    with open_store(url, options=opts(remote)) as s:
        prefixes = s.prefixes
        prefixes.policy.part_bytes = 30_000
        prefixes.retry_after = 0.0
        r = 1
        bounds = prefixes.policy.bounds
        k = 4
        start, end = int(bounds[r, 0]), int(bounds[r, k])
        hole = (start + (end - start) // 3, start + (end - start) // 3 + 5000)
        real = s.records._fetch
        broken = [True]

        def fetch(span, *into):  # the server fails every request touching the hole (after retries)
            if broken[0] and span.record == r and span.offset < hole[1] and span.offset + span.length > hole[0]:
                raise StoreUnavailable(f"{s.records.describe(r)}: InternalError (injected)")
            return real(span, *into)
        s.records._fetch = fetch
        images = [i for i in range(s.num_images) if s.index.record_of(i) == r]
        hit = {i for i in images for rng in s.ranges(i, k)
               if rng.offset < hole[1] and rng.offset + rng.length > hole[0]}
        assert hit and len(hit) < len(images)
        for i in shuffled(len(images)):
            i = images[i]
            if i in hit:
                with pytest.raises(StoreUnavailable):
                    s.read(i, k)
            else:
                assert s.read(i, k) == reader.read(i, k)
        assert prefixes.stats()["failed_parts"] >= 1
        broken[0] = False  # the server recovers: the same mount serves everything
        for i in images:
            assert s.read(i, k) == reader.read(i, k)


def test_a_truncated_record_is_eio_for_the_images_past_the_cut(source_store, remote, reader):
    r = 1
    full = (source_store / fmt.record_name(r)).read_bytes()
    with open_store(source_store) as local:
        cut = int(local.index.record_group_offsets[r, 1]) + 1000  # inside the group-2 region
    url = upload(source_store, "short.pcr", remote, {r: full[:cut]})
    with open_store(url, options=opts(remote)) as s:
        images = [i for i in range(s.num_images) if s.index.record_of(i) == r]
        for i in images:
            assert s.read(i, 1) == reader.read(i, 1)  # the group-1 region is whole
        for i in images:
            g2 = s.ranges(i, 2)[-1]
            if s.n_groups(i) >= 2 and g2.offset + g2.length > cut:
                with pytest.raises(OSError) as e:  # short read, or the server refusing the range
                    s.read(i, 2)
                assert e.value.errno == errno.EIO
            else:
                assert s.read(i, 2) == reader.read(i, 2)


@needs_fuse
def test_mount_damaged_group_is_eio_and_the_daemon_keeps_serving(source_store, remote, reader, mounts, tmp_path):
    victim = 50
    r, data = damaged_group(source_store, reader, victim, 2)
    url = upload(source_store, "bad-mount.pcr", remote, {r: data})
    o = ReadOptions(remote=remote, disk_cache=str(tmp_path / "dc"), disk_cache_bytes=1 << 30)
    mnt = Path(mounts.mount(url, "bad", read_options=o).mountpoint)
    for i in shuffled(reader.num_images):
        path = mnt / "scan5" / reader.path(i)
        if i == victim:
            with pytest.raises(OSError) as e:
                path.read_bytes()
            assert e.value.errno == errno.EIO
        else:
            assert path.read_bytes() == reader.read(i, 5)
    assert (mnt / "scan1" / reader.path(victim)).read_bytes() == reader.read(victim, 1)
    import json
    doc = json.loads((mnt / ".pcrfs" / "stats").read_bytes())
    assert doc["errors"]["eio"] >= 1  # the kernel may retry a failed read
    assert doc["io"]["record_prefix"]["fetches"] == records_with_images(reader)


def _prefix_files(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("r*") if p.name[1:].isdigit()]


def _stats(mnt: Path) -> dict:
    import json
    return json.loads((mnt / ".pcrfs" / "stats").read_bytes())


def _deleted_cache_files_held(pid: int, cache: Path) -> list[str]:
    """Files under ``cache`` that the daemon still holds open although they were deleted."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(cache)) and target.endswith("(deleted)"):
            held.append(target)
    return held


def _compiled_or_skip(monkeypatch) -> None:
    from pcrfs.fuse import fastpath
    monkeypatch.delenv(fastpath.DISABLE_ENV, raising=False)
    if fastpath.load()[0] is None:
        pytest.skip(f"compiled path unavailable: {fastpath.load()[1]}")


@needs_fuse
def test_the_compiled_path_serves_prefix_files_and_lets_a_damaged_one_go(url, remote, reader, mounts, tmp_path,
                                                                          monkeypatch):
    _compiled_or_skip(monkeypatch)
    cache = tmp_path / "dc"
    o = ReadOptions(remote=remote, disk_cache=str(cache), disk_cache_bytes=1 << 30, readahead_bytes=0)
    info = mounts.mount(url, "cfiles", read_options=o, cache_size=64 << 10)  # the view fits on disk only
    mnt = Path(info.mountpoint)
    n, records = reader.num_images, records_with_images(reader)
    for i in shuffled(n, 3):
        assert (mnt / "scan3" / reader.path(i)).read_bytes() == reader.read(i, 3)
    doc = _stats(mnt)
    fast = doc["fastpath"]
    assert fast["serves_reads"]
    # a record's first read fetches its prefix in Python; the compiled path serves the rest from
    # the file (a few more reads reach Python under load, when the kernel's requests overlap)
    assert fast["reads"] >= n // 2 and fast["reads"] + fast["python_reads"] >= n, fast
    assert fast["prefix_reads"] >= 3 * fast["reads"], fast  # 3 groups per image, each checked
    assert doc["io"]["record_prefix"]["fetches"] == records
    assert doc["io"]["source"]["requests"] == doc["io"]["record_prefix"]["parts"]  # nothing image by image

    # damage the cached file of record 1 in place (the daemon's descriptor sees it): the compiled
    # path's CRC check refuses the group, Python drops the file, fetches the prefix again, and
    # the image is served right; the old file is let go (no descriptor on a deleted file)
    victim = next(i for i in range(n) if reader.index.record_of(i) == 1 and reader.n_groups(i) >= 2)
    rng = reader.ranges(victim, 2)[1]
    base = int(reader.index.record_group_offsets[1, 0])
    path = next(cache.rglob("r1"))
    with open(path, "r+b") as f:
        f.seek(rng.offset - base + rng.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    assert (mnt / "scan2" / reader.path(victim)).read_bytes() == reader.read(victim, 2)
    doc = _stats(mnt)
    assert doc["io"]["record_prefix"]["fetches"] == records + 1
    assert doc["errors"]["eio"] == 0
    assert _deleted_cache_files_held(info.pid, cache) == []
    others = [i for i in range(n) if reader.index.record_of(i) == 1 and i != victim]
    for i in others:
        assert (mnt / "scan2" / reader.path(i)).read_bytes() == reader.read(i, 2)
    assert _stats(mnt)["fastpath"]["prefix_reads"] > doc["fastpath"]["prefix_reads"]


@needs_fuse
def test_evicted_and_extended_prefix_files_are_let_go(url, remote, reader, mounts, tmp_path, monkeypatch):
    from pcrfs.store.read.prefixpolicy import group_bounds

    _compiled_or_skip(monkeypatch)
    bounds = group_bounds(reader.index.record_group_offsets, reader.index.records["size"])
    spans = bounds - bounds[:, :1]
    # room for every record's group-1 prefix (VIEW mode at k=1), not for all of them at k=4
    capacity = int(spans[:, 1].sum() / 0.9) + 1
    assert spans[:, 4].sum() > 0.9 * capacity and spans[:, 4].max() < capacity / 2
    cache = tmp_path / "dc"
    o = ReadOptions(remote=remote, disk_cache=str(cache), disk_cache_bytes=capacity, readahead_bytes=0)
    info = mounts.mount(url, "cevict", read_options=o, cache_size=64 << 10)
    mnt = Path(info.mountpoint)
    n = reader.num_images
    for i in shuffled(n, 4):
        assert (mnt / "scan1" / reader.path(i)).read_bytes() == reader.read(i, 1)
    assert _stats(mnt)["fastpath"]["prefix_reads"] > 0
    # record by record at k=4: prefixes grow (files replaced) and push others out (files deleted)
    for i in range(n):
        assert (mnt / "scan4" / reader.path(i)).read_bytes() == reader.read(i, 4)
    doc = _stats(mnt)
    assert doc["io"]["disk_cache"]["evicted"] >= 1, doc["io"]
    assert doc["io"]["disk_cache"]["bytes"] <= capacity
    assert doc["errors"]["eio"] == 0
    assert _deleted_cache_files_held(info.pid, cache) == []


@needs_fuse
def test_prefixes_served_from_memory_are_saved_to_the_disk_cache_for_the_next_mount(url, remote, reader, mounts,
                                                                                   tmp_path, monkeypatch):
    _compiled_or_skip(monkeypatch)
    cache = tmp_path / "dc"
    o = ReadOptions(remote=remote, disk_cache=str(cache), disk_cache_bytes=1 << 30)
    n, records = reader.num_images, records_with_images(reader)
    first = mounts.mount(url, "cmem1", read_options=o, cache_size=64 << 20)  # the view fits in memory
    mnt = Path(first.mountpoint)
    for i in shuffled(n, 5):
        assert (mnt / "scan3" / reader.path(i)).read_bytes() == reader.read(i, 3)
    doc = _stats(mnt)
    assert doc["fastpath"]["reads"] >= n // 2, doc["fastpath"]
    assert doc["fastpath"]["prefix_reads"] >= 3 * doc["fastpath"]["reads"], doc["fastpath"]
    assert doc["io"]["record_prefix"]["fetches"] == records
    assert not _prefix_files(cache), "memory first: nothing written while the view fits there"
    mounts.cleanup()  # the unmount writes the prefixes back
    assert len(_prefix_files(cache)) == records
    o = ReadOptions(remote=remote, disk_cache=str(cache), disk_cache_bytes=1 << 30, readahead_bytes=0)
    second = Path(mounts.mount(url, "cmem2", read_options=o, cache_size=64 << 10).mountpoint)
    for i in shuffled(n, 6):
        assert (second / "scan2" / reader.path(i)).read_bytes() == reader.read(i, 2)
    doc = _stats(second)
    assert doc["io"]["source"]["requests"] == 0
    assert doc["fastpath"]["reads"] >= n // 2, doc["fastpath"]
    assert doc["fastpath"]["prefix_reads"] >= 2 * doc["fastpath"]["reads"], doc["fastpath"]


def test_a_prefix_leaving_memory_is_written_back_once(url, remote, reader, tmp_path):
    o = opts(remote, disk_cache=str(tmp_path / "dc"), disk_cache_bytes=1 << 30)
    with open_store(url, options=o) as s:
        prefixes = s.prefixes
        for i in shuffled(s.num_images):
            assert s.read(i, 2) == reader.read(i, 2)
        assert prefixes.written_back == 0 and len(s.images.disk) == 0
        held = [key for key, _ in s.cache.items() if isinstance(key, PrefixKey)]
        assert len(held) == records_with_images(s)
        s.cache.put("filler", b"x" * (s.cache.capacity - 1))  # pushes every prefix out
        assert prefixes.written_back == len(held) and len(s.images.disk) == len(held)
        for i in shuffled(s.num_images, 1):  # now served from the disk cache: no request
            before = s.records.requests
            assert s.read(i, 2) == reader.read(i, 2)
            assert s.records.requests == before
    assert prefixes.written_back == len(held)  # nothing twice at close


def test_the_mount_option_travels_to_the_daemon():
    from pcrfs.fuse.config import MountConfig

    for spelling, value in (("off", False), ("on", True), ("auto", None), (None, None)):
        config = MountConfig.from_values("s", "m", {"record_prefix": spelling})
        assert config.read_options().record_prefix is value
        back = MountConfig.from_argv(config.to_argv())
        assert back.read_options().record_prefix is value
        assert MountConfig.from_fstab("s", "m", [config.to_fstab()]).read_options().record_prefix is value
    with pytest.raises(ValueError, match="record_prefix"):
        MountConfig.from_fstab("s", "m", ["record_prefix=sometimes"])


def test_s3_reads_use_obstore_when_installed_and_s3fs_on_request(url, remote, reader, monkeypatch):
    pytest.importorskip("obstore")
    from pcrfs.store.sources.backends import FsspecRecords, ObstoreRecords

    with open_store(url, options=opts(remote)) as s:
        assert isinstance(s.records, ObstoreRecords)
        assert s.read(5, 3) == reader.read(5, 3)
        assert s.io_stats()["source"]["client"] == "obstore"
    monkeypatch.setenv("PCRFS_S3_CLIENT", "s3fs")
    with open_store(url, options=opts(remote)) as s:
        assert isinstance(s.records, FsspecRecords)
        assert s.read(5, 3) == reader.read(5, 3)


def test_a_process_forked_after_obstore_ran_reads_with_s3fs(url, remote, reader):
    # obstore's runtime does not survive fork: a DataLoader worker forked from a parent that
    # read through obstore hung on its first request before this rule
    pytest.importorskip("obstore")
    import multiprocessing

    with open_store(url, options=opts(remote)) as s:
        assert s.read(5, 3) == reader.read(5, 3)  # obstore's runtime now runs in this process
        assert s.io_stats()["source"]["client"] == "obstore"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_read_in_child, (url, remote)).get(timeout=60)
    assert got == ("s3fs", reader.read(5, 3), reader.read(7, 10))


def _read_in_child(url: str, remote: RemoteOptions) -> tuple[str, bytes, bytes]:
    with open_store(url, options=opts(remote)) as s:
        return s.io_stats()["source"]["client"], s.read(5, 3), s.read(7, 10)


def test_pcrfs_stats_shows_the_prefix_counters():
    from pcrfs.cli.mount import format_stats

    io = {"source": {"requests": 3, "bytes": 10, "retries": 0},
          "record_prefix": {"fetches": 2, "parts": 3, "failed_parts": 0, "bad_groups": 1, "declined": 4}}
    text = format_stats({"store_reads": {"requests": 3, "bytes": 10}, "io": io})
    assert "2 record prefixes in 3 requests (0 failed, 1 bad groups; 4 reads image by image)" in text


def test_a_500_mid_prefix_costs_only_its_images_a_second_read(url, moto, reader):
    """A real server error (a proxy answering 500 once, no retries) hits one part of the
    prefix: the other parts are served from it, the images in the failed part are read
    image by image -- and, the error being over, successfully."""
    from s3util import FaultProxy

    proxy = FaultProxy(moto.port)
    try:
        remote = RemoteOptions(endpoint_url=proxy.endpoint, attempts=1)
        with open_store(url, options=opts(remote)) as s:
            prefixes = s.prefixes
            prefixes.policy.part_bytes = 20_000
            r = 1
            images = [i for i in range(s.num_images) if s.index.record_of(i) == r]
            proxy.fail_next(1)
            for i in images:
                assert s.read(i, 4) == reader.read(i, 4)
            st = prefixes.stats()
            assert proxy.failed == 1 and st["failed_parts"] == 1 and st["parts"] >= 3
            # images with a group in the failed part were read again, image by image
            assert 0 < st["fallbacks"] <= len(images)
    finally:
        proxy.close()
