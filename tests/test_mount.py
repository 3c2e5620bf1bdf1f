"""End-to-end tests of the FUSE mount: everything here mounts for real.

Every mount is undone by a fixture even when a test fails, and every daemon it
started is killed by pid (tests/mountutil.py); the last test checks that no
pcrfs mount is left.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcrfs.fuse import mounting
from pcrfs.cli.mount import read_stats
from pcrfs.store import format as fmt
from pcrfs.access.views import ROOT_HINT_DIR

from mountutil import Mounts, fuse_unavailable, pcrfs_cli, wait_until

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def module_mounts(tmp_path_factory):
    mounts = Mounts(tmp_path_factory.mktemp("mnt"))
    yield mounts
    mounts.cleanup()


@pytest.fixture(scope="module")
def mnt(demo_store, module_mounts) -> Path:
    """One mount of the demo store shared by the read-only tests of this module."""
    return Path(module_mounts.mount(demo_store, "shared").mountpoint)


def views(store) -> list[tuple[str, int]]:
    """(view name, groups served) for every view of ``store``."""
    n = store.num_groups
    return [(f"scan{k}", k) for k in range(1, n + 1)] + [("full", n)]


def relative_files(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def relative_dirs(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, s), root) for d, subs, _ in os.walk(root) for s in subs}


def pixels(data_or_path) -> np.ndarray:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as im:
        return np.asarray(im)


def stats_of(mnt: Path) -> dict:
    return read_stats(mnt)  # the user.pcrfs.stats attribute: always fresh


# ---- the tree ----------------------------------------------------------------------------------

def test_root_lists_views_and_stats(mnt, reader):
    names = sorted(os.listdir(mnt))
    assert names == sorted([v for v, _ in views(reader)] + [".pcrfs", ROOT_HINT_DIR])
    assert os.listdir(mnt / ".pcrfs") == ["stats"]


def test_each_view_is_the_source_tree(mnt, reader, demo_src):
    src_files = relative_files(demo_src)
    assert src_files == set(reader.paths())
    for view, _ in views(reader):
        assert relative_files(mnt / view) == src_files, view
        assert relative_dirs(mnt / view) == relative_dirs(demo_src), view


def test_sizes_mtimes_and_inodes(mnt, reader, demo_src):
    n = reader.num_groups
    inodes = set()
    for i in range(reader.num_images):
        path = reader.path(i)
        sizes = []
        for view, k in views(reader):
            st = os.stat(mnt / view / path)
            assert st.st_size == reader.size(i, k), (view, path)
            assert st.st_mtime_ns == reader.source_mtime_ns(i) == os.stat(demo_src / path).st_mtime_ns
            assert st.st_ino == os.stat(mnt / view / path).st_ino  # stable
            inodes.add(st.st_ino)
            if view != "full":
                sizes.append(st.st_size)
        g = reader.n_groups(i)
        assert all(a < b for a, b in zip(sizes[:g], sizes[1:g])), (path, sizes)  # grows with each group
        assert len(set(sizes[g - 1:])) == 1  # beyond its own groups the image is whole
        assert os.stat(mnt / "full" / path).st_size == sizes[n - 1]
    assert len(inodes) == reader.num_images * len(views(reader))  # unique per file


def test_scandir_carries_attributes(mnt, reader):
    # readdir hands out complete attributes: DirEntry.stat() agrees with the reader
    d = mnt / "scan2" / Path(reader.path(0)).parent
    for entry in os.scandir(d):
        i = reader.find(os.path.relpath(entry.path, mnt / "scan2"))
        assert entry.is_file() and entry.stat().st_size == reader.size(i, 2)


# ---- contents -----------------------------------------------------------------------------------

def test_every_file_matches_reader_and_decodes(mnt, reader, demo_src):
    for i in range(reader.num_images):
        path = reader.path(i)
        original = pixels(demo_src / path)
        for view, k in views(reader):
            data = (mnt / view / path).read_bytes()
            assert data == reader.read(i, k), (view, path)
            px = pixels(data)
            assert px.shape == original.shape
            if view == "full":
                assert np.array_equal(px, original), path  # lossless at full fidelity


def test_partial_reads_at_offsets(mnt, reader):
    rng = random.Random(3)
    for _ in range(40):
        i = rng.randrange(reader.num_images)
        view, k = rng.choice(views(reader))
        whole = reader.read(i, k)
        off, size = rng.randrange(len(whole)), rng.randrange(1, 5000)
        with open(mnt / view / reader.path(i), "rb", buffering=0) as f:
            f.seek(off)
            assert f.read(size) == whole[off:off + size]


def test_shell_tools(mnt, reader, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(mnt / "scan2"), str(copy)], check=True)
    for i in range(reader.num_images):
        assert (copy / reader.path(i)).read_bytes() == reader.read(i, 2)

    found = subprocess.run(["find", str(mnt / "full"), "-type", "f"], check=True, capture_output=True,
                           text=True).stdout.split("\n")
    assert len([f for f in found if f]) == reader.num_images

    out = subprocess.run(["md5sum"] + [reader.path(i) for i in range(reader.num_images)],
                         cwd=mnt / "scan3", check=True, capture_output=True, text=True).stdout
    sums = dict(reversed(line.split("  ", 1)) for line in out.splitlines())
    for i in range(reader.num_images):
        assert sums[reader.path(i)] == hashlib.md5(reader.read(i, 3)).hexdigest()

    du = subprocess.run(["du", "-sb", "--apparent-size", str(mnt / "scan1")], check=True,
                        capture_output=True, text=True).stdout.split()[0]
    assert int(du) >= sum(reader.size(i, 1) for i in range(reader.num_images))


# ---- read-only -------------------------------------------------------------------------------------

def test_writes_fail_with_erofs_and_change_nothing(mnt, reader):
    path = reader.path(0)
    f = mnt / "full" / path
    d = f.parent
    before_files = relative_files(mnt / "full")
    attempts = {
        "open for writing": lambda: open(f, "wb"),
        "open for append": lambda: open(f, "ab"),
        "open r+": lambda: open(f, "r+b"),
        "O_WRONLY|O_TRUNC": lambda: os.open(f, os.O_WRONLY | os.O_TRUNC),
        "create": lambda: open(d / "new.jpg", "xb"),
        "create at root": lambda: open(mnt / "new", "xb"),
        "mkdir": lambda: os.mkdir(d / "newdir"),
        "rmdir": lambda: os.rmdir(d),
        "unlink": lambda: os.remove(f),
        "rename": lambda: os.rename(f, d / "renamed.jpg"),
        "rename a view": lambda: os.rename(mnt / "scan1", mnt / "scanX"),
        "chmod": lambda: os.chmod(f, 0o666),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (0, 0)),
        "truncate": lambda: os.truncate(f, 0),
        "link": lambda: os.link(f, d / "hard.jpg"),
        "symlink": lambda: os.symlink(f, d / "soft.jpg"),
        "setxattr": lambda: os.setxattr(f, "user.pcrfs", b"1"),
        "removexattr": lambda: os.removexattr(f, "user.pcrfs"),
        "mknod": lambda: os.mknod(d / "fifo", 0o600 | 0o010000),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, what
    assert relative_files(mnt / "full") == before_files
    assert f.read_bytes() == reader.read(0, reader.num_groups)
    assert oct(os.stat(f).st_mode & 0o777) == oct(0o444)


def test_operations_refuse_writes_without_the_kernel(reader):
    # the adapter itself answers EROFS too (defence in depth if the kernel passed a write on)
    from pcrfs.fuse.ops import PcrfsOperations, mf
    from pcrfs.access.views import ViewTree

    ops = PcrfsOperations(ViewTree(reader))
    for name in ("write", "create", "mknod", "mkdir", "rmdir", "unlink", "rename", "link", "symlink",
                 "chmod", "chown", "truncate", "utimens", "setxattr", "removexattr"):
        assert getattr(ops, name)("/full/x", 0, 0) == -errno.EROFS, name
    with pytest.raises(mf.FuseOSError) as e:
        ops.getattr("/full/no/such.jpg")
    assert e.value.errno == errno.ENOENT
    fh = ops.opendir("/scan1")
    entries = list(ops.readdir_with_offset("/scan1", 0, fh))
    assert [e[0] for e in entries[:2]] == [".", ".."]
    assert all(e[1]["st_ino"] > 0 and e[2] == pos + 1 for pos, e in enumerate(entries))


def test_stats_file_fits_the_size_the_kernel_was_told(reader):
    # the kernel keeps the size from the last getattr until the next invalidation: a
    # document grown since must still be served whole within that size
    from pcrfs.fuse.ops import STATS_FILE_HEADROOM, PcrfsOperations
    from pcrfs.access.views import ViewTree

    ops = PcrfsOperations(ViewTree(reader))
    told = ops.getattr("/.pcrfs/stats")["st_size"]
    grown = "x" * (STATS_FILE_HEADROOM - 100)
    ops.extra_stats["grown"] = grown
    data = ops.read("/.pcrfs/stats", told, 0, None)
    assert len(data) == told and json.loads(data)["grown"] == grown


def test_stats_file_follows_the_counters(demo_store, reader, mounts):
    # no open reaches the daemon, so the stats file cannot be direct_io: the daemon
    # drops the kernel's copy after each read of it, and a later read is a new snapshot
    mnt = Path(mounts.mount(demo_store, "statsfile").mountpoint)
    stats_file = mnt / ".pcrfs" / "stats"
    before = json.loads(stats_file.read_bytes())
    i = reader.num_images - 1
    (mnt / "scan2" / reader.path(i)).read_bytes()
    want = stats_of(mnt)["views"]["scan2"]["first_reads"]
    assert want >= before["views"]["scan2"]["first_reads"] + 1
    assert wait_until(lambda: json.loads(stats_file.read_bytes())["views"]["scan2"]["first_reads"] >= want)
    assert os.getxattr(mnt / ".pcrfs" / "stats", "user.pcrfs.stats").startswith(b"{")
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "scan1" / reader.path(0), "user.pcrfs.stats")
    assert e.value.errno == errno.ENODATA


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_overrides_and_the_compiled_path_are_dispatched(demo_store, reader, mounts, monkeypatch, compiled):
    """PcrfsFUSE's overrides of mfusepy internals and the compiled hot path really serve
    the mount: a silent fallback to mfusepy's own methods (after an mfusepy change) or to
    the Python read path (a broken build) fails here."""
    from pcrfs.fuse import fastpath

    if compiled:
        monkeypatch.delenv(fastpath.DISABLE_ENV, raising=False)
        if fastpath.load()[0] is None:
            # CI installs the compiler and headers (README's test command): there a missing
            # build is a failure, not a skip
            if os.environ.get("CI"):
                pytest.fail(f"compiled path not built in CI: {fastpath.load()[1]}")
            pytest.skip(f"compiled path unavailable: {fastpath.load()[1]}")
    else:
        monkeypatch.setenv(fastpath.DISABLE_ENV, "1")
    info = mounts.mount(demo_store, "dispatch-" + ("c" if compiled else "py"))
    mnt = Path(info.mountpoint)
    cls = reader.classes[0]
    sizes = {e.name: e.stat().st_size for e in os.scandir(mnt / "scan3" / cls)}  # readdir, then stat each
    assert os.stat(mnt / "scan3").st_mode & 0o040000  # a directory: Python's getattr_fuse_3 either way
    n = 0
    for i in range(reader.num_images):
        if reader.path(i).startswith(cls + "/"):
            f = mnt / "scan3" / reader.path(i)
            assert f.read_bytes() == reader.read(i, 3)
            assert sizes[f.name] == os.stat(f).st_size == reader.size(i, 3)
            n += 1
    doc = stats_of(mnt)
    assert all(v > 0 for v in doc["dispatched"].values()), doc["dispatched"]
    assert doc["views"]["scan3"]["first_reads"] == n
    log = Path(info.log_file).read_text()
    if compiled:
        fast = doc["fastpath"]
        records = {reader.ranges(i, 1)[0].record for i in range(reader.num_images) if reader.path(i).startswith(cls + "/")}
        assert fast["serves_reads"] and fast["reads"] >= n - len(records) and fast["reads"] > 0
        assert fast["crc32"] in ("pclmul", "zlib")  # pclmul only where it agreed with zlib at mount
        assert fast["python_reads"] <= len(records)  # the first read of each record hands its descriptor over
        assert "compiled path: lookups and reads in C" in log
    else:
        assert "fastpath" not in doc
        assert f"compiled path off: every callback in Python (turned off by {fastpath.DISABLE_ENV}=1)" in log


def test_reads_from_anywhere_in_a_file_match_the_store(demo_store, reader, mounts):
    """Reads that start past offset 0 (the kernel asks from that page on, cutting scan
    groups) come back exactly as the reader API assembles them, whichever path serves."""
    mnt = Path(mounts.mount(demo_store, "anywhere").mountpoint)
    rng = random.Random(7)
    for i in rng.sample(range(reader.num_images), 24):
        k = rng.choice([2, 5, reader.num_groups])
        want = reader.read(i, k)
        fd = os.open(mnt / f"scan{k}" / reader.path(i), os.O_RDONLY)
        try:
            for _ in range(4):
                off, size = rng.randrange(len(want)), rng.randrange(1, 70000)
                assert os.pread(fd, size, off) == want[off:off + size]
            assert os.pread(fd, len(want) + 10, 0) == want
        finally:
            os.close(fd)
    fast = stats_of(mnt).get("fastpath")
    if fast is not None:  # the compiled path served most of them (the cut groups included)
        assert fast["reads"] > fast["python_reads"]


# ---- concurrency and what is read from the store --------------------------------------------------------

def test_concurrent_random_reads(demo_store, reader, mounts):
    mnt = Path(mounts.mount(demo_store, "concurrent", cache_size="1M").mountpoint)
    jobs = [(random.Random(t * 1000 + j).randrange(reader.num_images),
             random.Random(t * 7 + j).choice(views(reader))) for t in range(8) for j in range(40)]

    def read(job):
        i, (view, k) = job
        return (mnt / view / reader.path(i)).read_bytes() == reader.read(i, k)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(read, jobs))
    assert all(results)
    assert stats_of(mnt)["errors"]["eio"] == 0


def test_a_scan_file_reads_only_its_groups(demo_store, reader, mounts):
    mnt = Path(mounts.mount(demo_store, "groups").mountpoint)
    i = next(i for i in range(reader.num_images) if reader.n_groups(i) >= 6)
    k = 3
    before = stats_of(mnt)
    data = (mnt / f"scan{k}" / reader.path(i)).read_bytes()
    after = stats_of(mnt)
    groups = reader.ranges(i, k)
    read_bytes = after["store_reads"]["bytes"] - before["store_reads"]["bytes"]
    assert data == reader.read(i, k)
    assert sum(g.length for g in groups) <= read_bytes <= sum(g.length for g in groups) + 64
    assert after["store_reads"]["requests"] - before["store_reads"]["requests"] == k
    assert after["views"][f"scan{k}"]["first_reads"] == before["views"][f"scan{k}"]["first_reads"] + 1
    assert after["views"][f"scan{k}"]["bytes_served"] - before["views"][f"scan{k}"]["bytes_served"] == len(data)

    # a higher fidelity of the same image reads exactly its own groups again: for a local
    # store the record files sit in the kernel's page cache, so pcrfs keeps no second copy
    (mnt / "scan5" / reader.path(i)).read_bytes()
    more = stats_of(mnt)
    assert more["store_reads"]["bytes"] - after["store_reads"]["bytes"] == sum(g.length for g in reader.ranges(i, 5))
    assert more["store_reads"]["requests"] - after["store_reads"]["requests"] == 5


def test_rereads_never_reach_the_daemon(demo_store, reader, mounts):
    mnt = Path(mounts.mount(demo_store, "cache").mountpoint)
    f = mnt / "full" / reader.path(1)
    f.read_bytes()
    first = stats_of(mnt)
    for _ in range(3):
        assert f.read_bytes() == reader.read(1, reader.num_groups)
    again = stats_of(mnt)
    # no open, no read: the kernel serves the reopened file from its page cache alone
    assert again["views"]["full"]["first_reads"] == first["views"]["full"]["first_reads"]
    assert again["store_reads"] == first["store_reads"]
    assert again["views"]["full"]["bytes_served"] == first["views"]["full"]["bytes_served"]


# ---- damaged data -----------------------------------------------------------------------------------

def test_corrupted_group_gives_eio_and_neighbours_read_fine(demo_store, reader, mounts, tmp_path):
    copy = tmp_path / "damaged.pcr"
    shutil.copytree(demo_store, copy)
    i = next(i for i in range(1, reader.num_images - 1) if reader.n_groups(i) >= 3)
    g2 = reader.ranges(i, 2)[1]
    record = copy / fmt.record_name(g2.record)
    with open(record, "r+b") as f:
        f.seek(g2.offset + g2.length // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))

    info = mounts.mount(copy, "damaged")
    mnt = Path(info.mountpoint)
    path = reader.path(i)
    assert (mnt / "scan1" / path).read_bytes() == reader.read(i, 1)  # group 1 is intact
    for view in ("scan2", "full"):
        with pytest.raises(OSError) as e:
            (mnt / view / path).read_bytes()
        assert e.value.errno == errno.EIO, view
    assert os.stat(mnt / "full" / path).st_size == reader.size(i, reader.num_groups)  # metadata is fine
    for j in (i - 1, i + 1):
        assert (mnt / "full" / reader.path(j)).read_bytes() == reader.read(j, reader.num_groups)
    doc = stats_of(mnt)
    # one failing read() is one error and one log line, though the kernel retries its
    # failed READ once more: the retry is counted as a request only
    assert doc["errors"]["eio"] == 2
    assert doc["errors"]["eio_requests"] >= 2
    assert mounting.daemon_alive(info.pid)
    log = Path(info.log_file).read_text()
    for view in ("scan2", "full"):
        assert log.count(f"EIO on /{view}/{path}:") == 1, log


# ---- daemon lifecycle ----------------------------------------------------------------------------------

def test_stats_command(mnt, reader, module_mounts):
    res = pcrfs_cli("stats", str(mnt))
    assert res.returncode == 0, res.stderr
    assert "scan1" in res.stdout and "hit rate" in res.stdout
    res = pcrfs_cli("stats", str(mnt), "--json")
    doc = json.loads(res.stdout)
    assert doc["pid"] in module_mounts.pids
    assert list(doc["views"]) == [v for v, _ in views(reader)]
    assert doc["mountpoint"] == str(mnt)


def test_cli_mount_and_umount(demo_store, reader, mounts):
    mnt = mounts.point("cli")
    res = pcrfs_cli("mount", str(demo_store), str(mnt), "--cache-size", "8M", "--log-file", str(mnt) + ".log")
    pid = mounts.track(mnt)
    assert res.returncode == 0, res.stderr
    assert f"pid {pid}" in res.stderr and "log" in res.stderr
    assert stats_of(mnt)["cache"]["capacity"] == 8 << 20
    assert (mnt / "full" / reader.path(0)).read_bytes() == reader.read(0, reader.num_groups)
    res = pcrfs_cli("umount", str(mnt))
    assert res.returncode == 0, res.stderr
    assert mounting.mount_entry(str(mnt)) is None
    assert wait_until(lambda: not mounting.daemon_alive(pid))


def test_kill9_then_mount_again_recovers(demo_store, reader, mounts):
    info = mounts.mount(demo_store, "stale")
    mnt = Path(info.mountpoint)
    os.kill(info.pid, signal.SIGKILL)
    assert wait_until(lambda: not mounting.daemon_alive(info.pid))
    with pytest.raises(OSError) as e:
        os.statvfs(mnt)
    assert e.value.errno in mounting.STALE_ERRNOS  # ENOTCONN, or ECONNABORTED if a request was in flight
    res = pcrfs_cli("mount", str(demo_store), str(mnt), "--log-file", info.log_file)
    mounts.track(mnt)
    assert res.returncode == 0, res.stderr
    assert "stale" in res.stderr
    assert (mnt / "scan1" / reader.path(2)).read_bytes() == reader.read(2, 1)


def test_sigterm_unmounts(demo_store, mounts):
    info = mounts.mount(demo_store, "term")
    os.kill(info.pid, signal.SIGTERM)
    assert wait_until(lambda: not mounting.daemon_alive(info.pid))
    assert mounting.mount_entry(info.mountpoint) is None
    assert not os.path.exists(info.pid_file)


def test_busy_umount_suggests_lazy(demo_store, reader, mounts):
    info = mounts.mount(demo_store, "busy")
    mnt = Path(info.mountpoint)
    with open(mnt / "scan1" / reader.path(0), "rb"):
        res = pcrfs_cli("umount", str(mnt))
        assert res.returncode == 1
        assert "busy" in res.stderr and "--lazy" in res.stderr
        res = pcrfs_cli("umount", "--lazy", str(mnt))
        assert res.returncode == 0, res.stderr
        assert mounting.mount_entry(str(mnt)) is None
    assert wait_until(lambda: not mounting.daemon_alive(info.pid))


def test_mount_refusals(demo_store, mnt, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    res = pcrfs_cli("mount", str(demo_store), str(full))
    assert res.returncode == 1 and "not empty" in res.stderr
    res = pcrfs_cli("mount", str(demo_store), str(mnt))
    assert res.returncode == 1 and "already mounted" in res.stderr
    res = pcrfs_cli("mount", str(demo_store), str(tmp_path / "missing"))
    assert res.returncode == 1 and "does not exist" in res.stderr
    res = pcrfs_cli("mount", str(tmp_path), str(full))
    assert res.returncode == 1 and "not a PCR store" in res.stderr
    res = pcrfs_cli("umount", str(tmp_path))
    assert res.returncode == 1 and "not mounted" in res.stderr


def test_mount_helper(demo_store, reader, mounts):
    from pcrfs.fuse.mount_helper import main as mount_pcrfs

    mnt = mounts.point("helper")
    assert mount_pcrfs([str(demo_store), str(mnt), "-f", "-o", "rw"]) == 0  # -f: fake, nothing mounted
    assert mounting.mount_entry(str(mnt)) is None
    opts = f"rw,cache_size=1M,nofail,noauto,x-systemd.automount,log_file={mnt}.log"
    rc = mount_pcrfs([str(demo_store), str(mnt), "-o", opts])
    mounts.track(mnt)
    assert rc == 0
    assert mounting.mount_entry(str(mnt)).fstype == "fuse.pcrfs"
    assert stats_of(mnt)["cache"]["capacity"] == 1 << 20
    assert (mnt / "scan2" / reader.path(0)).read_bytes() == reader.read(0, 2)


def test_torchvision_imagefolder(mnt, reader):
    datasets = pytest.importorskip("torchvision.datasets")
    torch = pytest.importorskip("torch")
    ds = datasets.ImageFolder(str(mnt / "scan2"))
    assert len(ds) == reader.num_images
    assert ds.classes == sorted(reader.classes)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, collate_fn=lambda b: b)
    assert sum(len(batch) for batch in loader) == reader.num_images


def test_no_mount_left_behind(module_mounts):
    # runs last in this module: the per-test fixtures have already cleaned up
    base = str(module_mounts.base.parent)
    with open("/proc/self/mountinfo") as f:
        left = [line for line in f if " fuse.pcrfs " in line and base in line and "/shared" not in line]
    assert left == []
