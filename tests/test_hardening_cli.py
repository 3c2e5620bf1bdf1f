"""Issue #18, the command line's share: what an adversarial probe found in `convert`,
`get`, `mount` and `umount`, each turned into a test that failed before the fix.

Source and store never overlap (item 5); a stopped daemon makes `mount` and `umount`
answer within seconds with what to do (item 8); bad paths and crafted stores give one
line, not a traceback (item 9); over-long names are refused at convert (item 10);
directories count their subdirectories in st_nlink (item 11); one convert at a time
per store, and a resumed one reports the ratio of the whole source (item 12).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mountutil import fuse_unavailable, pcrfs_cli, wait_until
from pcrfs.cli import main
from pcrfs.convert import SourceFile, SourceListing, StoreBusy, convert, list_sources
from pcrfs.fsutil import lock_exclusive
from pcrfs.fuse import mounting
from pcrfs.store import format as fmt
from pcrfs.store.format.index import Index, StringTable
from pcrfs.store.read.reader import open_store

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_one_line_error(stderr: str, *needles: str) -> None:
    """Exactly one line, an error naming the problem, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("pcrfs: error: "), stderr
    for n in needles:
        assert n in stderr, (n, stderr)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def small_source(demo_src: Path, dest: Path, per_class: int = 2) -> Path:
    for cls in sorted(p for p in demo_src.iterdir() if p.is_dir())[:3]:
        (dest / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy2(f, dest / cls.name / f.name)
    return dest


# ---- item 5: the source is never deleted ------------------------------------------------------

def test_overwrite_with_source_inside_store_is_refused(demo_store, demo_src, tmp_path):
    """The issue's reproduction: cp -a S S3; cp -r SRC S3/imgs; convert S3/imgs S3 --overwrite
    removed S3/imgs and wrote a 0-image store."""
    s3 = tmp_path / "S3"
    shutil.copytree(demo_store, s3)
    shutil.copytree(demo_src, s3 / "imgs")
    src_before, store_before = tree(s3 / "imgs"), tree(s3)
    res = pcrfs_cli("convert", "-q", str(s3 / "imgs"), str(s3), "--overwrite")
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "inside the store")
    assert tree(s3 / "imgs") == src_before
    assert tree(s3) == store_before


@pytest.mark.parametrize("layout", ["same directory", "source inside store", "via a symlink",
                                    "via a bind-like second path"])
def test_any_overlap_is_refused_after_resolving_links(demo_store, demo_src, tmp_path, layout):
    store = tmp_path / "store"
    shutil.copytree(demo_store, store)
    if layout == "same directory":
        small_source(demo_src, store / "x")
        src = dst = store
    elif layout == "source inside store":
        src, dst = small_source(demo_src, store / "deep" / "imgs"), store
    elif layout == "via a symlink":  # the source is named through a link that resolves into the store
        small_source(demo_src, store / "imgs")
        (tmp_path / "alias").symlink_to(store / "imgs")
        src, dst = tmp_path / "alias", store
    else:  # the store is named through a link to its parent: realpath and inode both see it
        small_source(demo_src, store / "imgs")
        (tmp_path / "parent").symlink_to(tmp_path)
        src, dst = store / "imgs", tmp_path / "parent" / "store"
    before = tree(store)
    with pytest.raises(ValueError, match="inside"):
        convert(src, dst, overwrite=True)
    # a Dask conversion goes through the same entry, before the cluster is used
    with pytest.raises(ValueError, match="inside"):
        convert(src, dst, overwrite=True, client=object())
    r = run("convert", "-q", src, dst, "--overwrite")
    assert r.exit_code == 1 and "inside" in r.stderr and "Traceback" not in r.stderr
    assert tree(store) == before


# ---- item 12: one convert per store; the ratio on resume ----------------------------------------

def test_second_convert_into_a_locked_store_is_refused(demo_src, tmp_path):
    src = small_source(demo_src, tmp_path / "src")
    store = tmp_path / "s.pcr"
    store.mkdir()
    fd = lock_exclusive(store)  # what a running convert holds
    assert fd is not None
    try:
        with pytest.raises(StoreBusy, match="another convert is writing this store"):
            convert(src, store)
        res = pcrfs_cli("convert", "-q", str(src), str(store))
        assert res.returncode == 1
        assert_one_line_error(res.stderr, "another convert is writing this store")
        assert list(store.iterdir()) == []  # the second one wrote nothing
    finally:
        os.close(fd)
    res = pcrfs_cli("convert", "-q", str(src), str(store))  # released: converts
    assert res.returncode == 0, res.stderr
    # --overwrite keeps the directory (and so the lock) while it replaces the store
    fd = lock_exclusive(store)
    try:
        res = pcrfs_cli("convert", "-q", str(src), str(store), "--overwrite")
        assert res.returncode == 1 and "another convert" in res.stderr
        assert (store / fmt.MANIFEST).exists()
    finally:
        os.close(fd)


def test_second_convert_to_the_same_url_is_refused(demo_src, tmp_path):
    """For s3:// stores the lock is the staging directory's lock file: conversions on one
    machine. It is taken before the object store is contacted (none runs here)."""
    from pcrfs.remote.fs import RemoteOptions
    from pcrfs.convert.target import staging_path

    src = small_source(demo_src, tmp_path / "src", per_class=1)
    url, remote = "s3://bucket/train.pcr", RemoteOptions(endpoint_url="http://127.0.0.1:9")
    staging = staging_path(url, tmp_path / "cache")
    staging.parent.mkdir(parents=True)
    fd = lock_exclusive(staging.parent / (staging.name + ".lock"), create_file=True)
    try:
        with pytest.raises(StoreBusy, match="another convert is writing this store"):
            convert(src, url, remote=remote, staging_dir=tmp_path / "cache")
    finally:
        os.close(fd)


def test_two_real_converts_at_once(demo_src, tmp_path):
    """Two `pcrfs convert` processes on one store: one finishes, the other says why it stops."""
    src = small_source(demo_src, tmp_path / "src", per_class=4)
    store = tmp_path / "s.pcr"
    slow = ("import sys, time, pcrfs.convert.local as c\norig = c.transcode_source\n"
            "def slow(*a):\n    time.sleep(0.2)\n    return orig(*a)\nc.transcode_source = slow\n"
            "from pcrfs.cli import main\nsys.exit(main())\n")
    first = subprocess.Popen([sys.executable, "-c", slow, "convert", "-q", "-j", "1", "--record-size", "32K",
                              str(src), str(store)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (store / fmt.PARTIAL_DIR).is_dir(), timeout=30)
        second = pcrfs_cli("convert", "-q", "-j", "1", "--record-size", "32K", str(src), str(store))
        assert second.returncode == 1
        assert_one_line_error(second.stderr, "another convert is writing this store")
        assert first.wait(120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    with open_store(store) as s:
        assert len(s) == 12


def test_resumed_convert_reports_the_ratio_of_the_whole_source(demo_src, tmp_path):
    src = small_source(demo_src, tmp_path / "src", per_class=4)
    store = tmp_path / "s.pcr"

    class Stop(Exception):
        pass

    seen = 0

    def bomb(n, nbytes):
        nonlocal seen
        seen += n
        if seen == 9:
            raise Stop

    with pytest.raises(Stop):
        convert(src, store, record_bytes=32 * 1024, workers=1, on_progress=bomb)
    res = pcrfs_cli("convert", str(src), str(store), "-q", "--record-size", "32K", "-j", "1")
    assert res.returncode == 0, res.stderr
    assert "Resuming" in res.stderr
    total = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    stored = open_store(store).manifest["total_bytes"]
    line = [ln for ln in res.stderr.splitlines() if "stored" in ln][0]
    assert f"({stored / total:.1%} of " in line, line
    assert stored / total < 1.05  # lossless transcoding: the store is about the source's size


# ---- item 9: one-line errors --------------------------------------------------------------------

def _remove_deep(top: Path) -> None:
    """Remove a tree of any depth bottom-up without recursion (shutil.rmtree, and so
    pytest's own clean-up of old temporary directories, recurses and would fail)."""
    stack = [(os.fspath(top), False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, False))
                else:
                    os.unlink(e.path)


def test_source_tree_deeper_than_the_recursion_limit(demo_src, tmp_path):
    src = tmp_path / "deep"
    src.mkdir()
    try:
        jpeg = next(demo_src.rglob("*.jpg"))
        shutil.copy(jpeg, src / "top.jpg")
        d = src
        for _ in range(1100):  # mkdir one level at a time: os.makedirs itself recurses
            d = d / "d"
            d.mkdir()
        shutil.copy(jpeg, d / "bottom.jpg")
        res = pcrfs_cli("convert", "-q", str(src), str(tmp_path / "deep.pcr"))
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert len(list_sources(src).files) == 2
        with open_store(tmp_path / "deep.pcr") as s:
            assert len(s) == 2
            assert s.read("/".join(["d"] * 1100) + "/bottom.jpg", 1)
    finally:
        _remove_deep(src)


@pytest.mark.parametrize("dest", ["/nonexistent/dir/x", "/dev/full"])
def test_get_to_an_unwritable_output(demo_store, reader, dest):
    path = reader.path(0)
    res = pcrfs_cli("get", str(demo_store), path, "-o", dest)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, dest)


def test_get_to_a_full_stdout(demo_store, reader):
    path = reader.path(0)
    with open("/dev/full", "wb") as full:
        res = subprocess.run([sys.executable, "-m", "pcrfs.cli", "get", str(demo_store), path],
                             stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, "standard output", "No space")


@pytest.mark.parametrize("option", [("--log-file", "/nonexistent/x.log"), ("--disk-cache", "/proc/x")])
def test_mount_with_an_unusable_path(demo_store, tmp_path, option):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = pcrfs_cli("mount", str(demo_store), str(mnt), *option, timeout=60)
    assert res.returncode == 1
    assert_one_line_error(res.stderr, option[1])
    assert mounting.mount_entry(str(mnt)) is None


def test_store_errors_anywhere_in_a_command_are_one_line(demo_store, monkeypatch):
    """The CLI's net: a StoreError or CorruptData raised past a command, or any other
    exception, is one line (PCRFS_DEBUG=1 gives the traceback back)."""
    import pcrfs.store.read.verify as verify_mod
    from pcrfs.store.errors import CorruptData, StoreError

    for exc, needle in ((StoreError("index is inconsistent: crafted"), "crafted"),
                        (CorruptData("group 3 of x.jpg failed its CRC"), "failed its CRC"),
                        (TypeError("'int' object is not iterable"), "unexpected TypeError")):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(verify_mod, "cumulative_fractions", boom)
        r = run("info", demo_store)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.output, r.exception)
        assert_one_line_error(r.stderr, needle)
    monkeypatch.setenv("PCRFS_DEBUG", "1")
    r = run("info", demo_store)
    assert isinstance(r.exception, TypeError)


def _drop_parent_directory(store: Path) -> str:
    """Rewrite the store's directory table without one parent directory (and re-sign the
    index in the manifest), as the probe's crafted store did; returns the removed name."""
    with open_store(store) as s:
        index = s.index
        names = [index.dirs[d] for d in range(len(index.dirs))]
        parent = next(n for n in names if n and any(m.startswith(n + "/") for m in names))
        keep = [d for d, n in enumerate(names) if n != parent]
        crafted = Index(images=np.array(index.images), group_lengths=np.array(index.group_lengths),
                        group_crc32=np.array(index.group_crc32), records=np.array(index.records),
                        record_group_offsets=np.array(index.record_group_offsets),
                        paths=StringTable(index.paths.blob_bytes(), np.array(index.paths.offsets)),
                        dirs=StringTable.from_strings([names[d] for d in keep]),
                        dir_ranges=np.array(index.dir_ranges)[keep])
    scratch = store / "index.new"
    checks = crafted.save(scratch)
    shutil.rmtree(store / fmt.INDEX_DIR)
    scratch.rename(store / fmt.INDEX_DIR)
    m = yaml.safe_load((store / fmt.MANIFEST).read_text())
    m["index_files"] = checks
    (store / fmt.MANIFEST).write_text(yaml.safe_dump(m, sort_keys=False))
    return parent


@needs_fuse
def test_mount_reports_a_daemon_startup_failure_in_one_line(demo_src, tmp_path, mounts):
    src = tmp_path / "src"
    for rel in ("a/b/x.jpg", "a/b/y.jpg", "c/z.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(demo_src.rglob("*.jpg")), src / rel)
    store = tmp_path / "crafted.pcr"
    convert(src, store)
    _drop_parent_directory(store)
    mnt = mounts.point("crafted")
    log = tmp_path / "crafted.log"
    res = pcrfs_cli("mount", str(store), str(mnt), "--log-file", str(log), timeout=60)
    mounts.track(mnt)
    assert res.returncode == 1
    assert_one_line_error(res.stderr)
    assert mounting.mount_entry(str(mnt)) is None
    for cmd in (["info", str(store)], ["verify", "-q", str(store)], ["get", str(store), "a/b/x.jpg", "-o",
                                                                       str(tmp_path / "out.jpg")]):
        res = pcrfs_cli(*cmd)
        assert "Traceback" not in res.stderr, (cmd, res.stderr)
        if res.returncode:
            assert_one_line_error(res.stderr)


CRAFTED_MANIFESTS = {
    "YAML nested 20,000 deep": lambda text: text + "extra: " + "[" * 20000 + "]" * 20000 + "\n",
    "classes: 5": lambda text: text.replace("\nclasses:\n", "\nclasses: 5\nold_classes:\n"),
    "total_bytes: lots": lambda text: "".join(
        'total_bytes: "lots"\n' if line.startswith("total_bytes:") else line
        for line in text.splitlines(keepends=True)),
}


@needs_fuse
@pytest.mark.parametrize("what", sorted(CRAFTED_MANIFESTS))
def test_crafted_manifests_give_one_line_in_every_command(demo_store, tmp_path, mounts, what):
    """The store layer decides what it refuses (and how it words it); whatever it raises,
    info, verify, get and mount print one line, never a traceback."""
    store = tmp_path / "crafted.pcr"
    shutil.copytree(demo_store, store)
    with open_store(store) as s:
        path = s.path(0)
    manifest = store / fmt.MANIFEST
    edited = CRAFTED_MANIFESTS[what](manifest.read_text())
    assert edited != manifest.read_text()
    manifest.write_text(edited)
    mnt = mounts.point("crafted")
    for cmd in (["info", str(store)], ["verify", "-q", str(store)],
                ["get", str(store), path, "-o", str(tmp_path / "x.jpg")],
                ["mount", str(store), str(mnt), "--log-file", str(tmp_path / "m.log")]):
        res = pcrfs_cli(*cmd)
        mounts.track(mnt)
        assert "Traceback" not in res.stderr, (cmd, res.stderr)
        if res.returncode:
            assert_one_line_error(res.stderr)


# ---- item 10: names a mount could not serve -------------------------------------------------------

def test_path_component_over_255_bytes_is_a_bad_file(demo_src, tmp_path):
    """Linux names stop at 255 bytes, but exFAT/NTFS/SMB sources may hold longer UTF-8
    names (255 UTF-16 units): the listing is crafted here to hold one."""
    src = small_source(demo_src, tmp_path / "src", per_class=1)
    listing = list_sources(src)
    victim = listing.files[0]
    long_name = "é" * 200 + ".jpg"  # 404 bytes in UTF-8
    cls = victim.rel.split("/")[0]
    crafted = SourceListing(listing.files + [SourceFile(f"{cls}/{long_name}", victim.abs, victim.size,
                                                        victim.mtime_ns, victim.dev, victim.ino)], listing.problems)
    crafted.files.sort(key=lambda f: fmt.path_sort_key(f.rel))
    res = convert(src, tmp_path / "s.pcr", listing=crafted)
    assert [b["path"] for b in res.bad] == [f"{cls}/{long_name}"]
    assert "404 bytes" in res.bad[0]["reason"] and "255" in res.bad[0]["reason"]
    with open_store(tmp_path / "s.pcr") as s:
        assert len(s) == len(listing.files)
        assert all(len(fmt.encode_path(part)) <= 255 for i in range(len(s)) for part in s.path(i).split("/"))


# ---- item 11: directory link counts -------------------------------------------------------------

def test_view_tree_nlink_in_a_nested_tree(demo_src, tmp_path):
    from pcrfs.access.views import ViewTree

    src = tmp_path / "src"
    for rel in ("a/b/x.jpg", "a/c/y.jpg", "a/w.jpg", "d/z.jpg", "top.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(demo_src.rglob("*.jpg")), src / rel)
    convert(src, tmp_path / "s.pcr")
    with open_store(tmp_path / "s.pcr") as s:
        tree = ViewTree(s)
        expect = {"/": 2 + len(tree.views) + 2, "/.pcrfs": 2, "/scan1": 4,  # + .pcrfs and the hint "/full/a": 4, "/scan2/a/b": 2,
                  "/scan1/d": 2}
        assert {p: tree.getattr(p).nlink for p in expect} == expect
        listed = {name: a.nlink for name, a in tree.readdir("/scan1")}
        assert listed["a"] == 4 and listed["d"] == 2 and listed["top.jpg"] == 1


@needs_fuse
def test_directory_nlink_counts_subdirectories(demo_store, reader, mounts):
    info = mounts.mount(demo_store, "nlink")
    mnt = Path(info.mountpoint)
    views = [p for p in mnt.iterdir() if not p.name.startswith(".")]
    assert os.stat(mnt).st_nlink == 2 + len(views) + 2  # the views, .pcrfs and the hint directory
    assert os.stat(mnt / ".pcrfs").st_nlink == 2
    for root, dirs, _ in os.walk(mnt / "scan1"):
        assert os.stat(root).st_nlink == 2 + len(dirs), root
    # readdirplus attributes agree with lookups
    for e in os.scandir(mnt / "scan1"):
        assert e.stat(follow_symlinks=False).st_nlink == 2, e.name
    found = subprocess.run(["find", str(mnt / "scan1"), "-type", "f"], capture_output=True, text=True, timeout=60)
    assert len(found.stdout.split()) == len(reader)
    if shutil.which("perl"):
        # File::Find trusts nlink to know when a directory has no more subdirectories
        script = ("use File::Find; $File::Find::dont_use_nlink = 0; my $n = 0; "
                  "find(sub { $n++ if -f $_ }, $ARGV[0]); print $n;")
        res = subprocess.run(["perl", "-e", script, str(mnt / "scan1")], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert int(res.stdout) == len(reader)


# ---- item 8: a stopped daemon --------------------------------------------------------------------

@needs_fuse
def test_stopped_daemon_mount_and_umount_answer_with_what_to_do(demo_store, reader, mounts):
    info = mounts.mount(demo_store, "stopped")
    mnt = Path(info.mountpoint)
    reader_proc = None
    os.kill(info.pid, signal.SIGSTOP)
    try:
        res = pcrfs_cli("mount", str(demo_store), str(mnt), "--log-file", str(mnt) + "-2.log", timeout=60)
        assert res.returncode == 1
        assert_one_line_error(res.stderr, "stopped", f"kill -CONT {info.pid}", "--lazy")
        # a file no one has read: its read waits for the stopped daemon
        reader_proc = subprocess.Popen(["cat", str(mnt / "full" / reader.path(len(reader) - 1))],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        assert reader_proc.poll() is None
        res = pcrfs_cli("umount", str(mnt), timeout=60)
        assert res.returncode == 1
        assert_one_line_error(res.stderr, "--lazy", f"kill -CONT {info.pid}")
        assert "timed out" not in res.stderr
        res = pcrfs_cli("umount", "--lazy", str(mnt), timeout=60)
        assert res.returncode == 0, res.stderr
        assert mounting.mount_entry(str(mnt)) is None
    finally:
        os.kill(info.pid, signal.SIGCONT)
        if reader_proc is not None:
            try:
                reader_proc.wait(10)
            except subprocess.TimeoutExpired:
                reader_proc.kill()
                reader_proc.wait()
    assert wait_until(lambda: not mounting.daemon_alive(info.pid), timeout=15)


@needs_fuse
def test_umount_of_an_idle_stopped_daemon_says_it_exits_once_resumed(demo_store, mounts):
    info = mounts.mount(demo_store, "stopped-idle")
    os.kill(info.pid, signal.SIGSTOP)
    try:
        res = pcrfs_cli("umount", info.mountpoint, timeout=60)
        assert res.returncode == 0, res.stderr
        assert mounting.mount_entry(info.mountpoint) is None
        assert f"kill -CONT {info.pid}" in res.stderr and "stopped" in res.stderr
    finally:
        os.kill(info.pid, signal.SIGCONT)
    assert wait_until(lambda: not mounting.daemon_alive(info.pid), timeout=15)
