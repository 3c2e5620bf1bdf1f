"""Issue #27 (and #26's rough edges): the plausible mistakes of a first hour, each driven
through the real command line (or the real library door it concerns), each answered with
one line that names what is wrong and what to do.

Several answers were already right: those tests pin them. The ones that were not, and
fail without their fix: ``convert`` with its arguments swapped (it wrote a 0-image
store) or given an image tree as STORE, non-images in the source (exit 1), an image
tree given as the store to ``mount``/``info``, a mount path given to ``get``, an
endpoint that is down (a line per retry), ``ImageFolder(MNT)`` on the mount root, a
closed pipe (``pcrfs info | head -1``), ``info`` without its ``full`` row, symlinked
``records/``/``index/`` directories, the lock files a conversion to s3:// left behind,
and ``--cache-size``'s help.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mountutil import fuse_unavailable
from pcrfs.store import format as fmt
from pcrfs.store.errors import StoreError
from pcrfs.store.read.reader import open_store
from s3util import LOOPBACK, S3_ENV, MotoServer, free_port, s3_available

needs_fuse = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                  "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true"}


def cli(*args, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``pcrfs ARGS`` in a child process, as a user runs it; ``env`` entries set (None: unset)."""
    environ = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            environ.pop(k, None)
        else:
            environ[k] = v
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "pcrfs.cli", *map(str, args)], stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=timeout, env=environ, **kwargs)


def one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed (status 1) with exactly one line on stderr, an error holding every needle."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("pcrfs: error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def small_source(demo_src: Path, dest: Path, per_class: int = 2) -> Path:
    for cls in sorted(p for p in demo_src.iterdir() if p.is_dir())[:3]:
        (dest / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy2(f, dest / cls.name / f.name)
    return dest


def some_image(store: Path) -> str:
    with open_store(store) as s:
        return s.path(0)


# ---- convert ------------------------------------------------------------------------------------

def test_convert_with_the_arguments_swapped(demo_store, demo_src, tmp_path):
    """`pcrfs convert STORE TREE`: refused naming the swap, the tree left as it was. And
    `pcrfs convert STORE NEW` wrote a 0-image store (every store file "not an image"): now
    it is refused the same way, or, where convert copies a store into a new layout, NEW
    holds every image -- never an empty store."""
    target = small_source(demo_src, tmp_path / "photos")
    before = tree(target)
    one_line(cli("convert", "-q", demo_store, target), "swapped", "pcrfs convert IMAGE_TREE STORE")
    assert tree(target) == before

    res = cli("convert", "-q", demo_store, tmp_path / "new.pcr")
    if res.returncode == 0:
        with open_store(demo_store) as a, open_store(tmp_path / "new.pcr") as b:
            assert b.num_images == a.num_images > 0
    else:
        one_line(res, "swapped", "pcrfs convert IMAGE_TREE STORE")
        assert not (tmp_path / "new.pcr").exists()


def test_convert_into_an_image_tree_names_the_swap(demo_src, tmp_path):
    """`pcrfs convert OTHER_TREE TREE`: an image tree given as STORE is left as it was."""
    src, target = small_source(demo_src, tmp_path / "a"), small_source(demo_src, tmp_path / "b")
    before = tree(target)
    for extra in ((), ("--overwrite",)):
        res = cli("convert", "-q", src, target, *extra)
        one_line(res, "looks like an image tree", "swapped")
    assert tree(target) == before


def test_non_images_in_the_source_are_skipped_and_counted(demo_src, tmp_path):
    """A README.md, labels.txt, meta.json or LICENSE beside the classes is skipped, as torchvision's
    ImageFolder skips it, and counted (report.json's skipped list, the summary line); a JPEG named
    without an extension, or with another one, is still converted (its bytes say what it is), and
    a file named as an image that fails stays bad."""
    src = small_source(demo_src, tmp_path / "src")
    (src / "README.md").write_text("# my dataset\n")
    (src / "labels.txt").write_text("cat\ndog\n")
    (src / "meta.json").write_text("{}")
    (src / "LICENSE").write_text("CC-BY 4.0\n")
    (src / ".DS_Store").write_bytes(b"\0" * 10)  # hidden: ignored, not even reported
    jpeg = next(p for p in sorted(src.rglob("*.jpg")))
    shutil.copy(jpeg, jpeg.parent / "no_extension")
    shutil.copy(jpeg, jpeg.parent / "misnamed.txt")
    res = cli("convert", "-q", src, tmp_path / "s.pcr")
    assert res.returncode == 0, res.stderr
    assert "8 images" in res.stderr and "4 skipped, 0 bad" in res.stderr, res.stderr
    report = json.loads((tmp_path / "s.pcr" / fmt.REPORT).read_text())
    assert sorted(p["path"] for p in report["skipped"]) == ["LICENSE", "README.md", "labels.txt", "meta.json"]
    assert report["bad"] == []
    with open_store(tmp_path / "s.pcr") as s:
        n = s.num_groups
        for name in ("no_extension", "misnamed.txt"):
            assert s.read(f"{jpeg.parent.name}/{name}", n) == s.read(str(jpeg.relative_to(src)), n)

    (src / "broken.jpg").write_text("this claims to be a JPEG")
    res = cli("convert", "-q", src, tmp_path / "t.pcr")
    one_line_tail = [line for line in res.stderr.splitlines() if line.startswith("pcrfs: error")]
    assert res.returncode == 1 and "4 skipped, 1 bad" in res.stderr, res.stderr
    assert "broken.jpg" in res.stderr and one_line_tail and "--skip-bad" in one_line_tail[0]


@needs_fuse
def test_convert_of_a_mount_root_names_a_view(demo_store, tmp_path, mounts):
    info = mounts.mount(demo_store, "root")
    res = cli("convert", "-q", info.mountpoint, tmp_path / "again.pcr")
    one_line(res, "root of a pcrfs mount", os.path.join(info.mountpoint, "full"))
    assert not (tmp_path / "again.pcr").exists()


def test_conversion_to_s3_leaves_no_lock_file(demo_src, tmp_path, moto):
    """Nothing of a finished conversion stays in the cache directory: the staging directory
    went already; its empty ``.lock`` file (and the staging directory above) stayed."""
    src = small_source(demo_src, tmp_path / "src", per_class=1)
    cache = Path(os.environ["XDG_CACHE_HOME"])
    res = cli("convert", "-q", src, f"s3://{moto.bucket}/lockless.pcr", "--endpoint-url", moto.endpoint)
    assert res.returncode == 0, res.stderr
    assert not (cache / "pcrfs" / "staging").exists(), list((cache / "pcrfs" / "staging").iterdir())


def test_a_lock_file_removed_under_a_waiter_is_locked_again(demo_src, tmp_path, monkeypatch):
    """The lock file goes when its holder finishes, so a conversion that opened the old file
    and then got its lock holds a lock on nothing: it must lock the file that is there now."""
    import fcntl

    from pcrfs.convert import target as target_mod
    from pcrfs.remote.fs import RemoteOptions

    src = small_source(demo_src, tmp_path / "src", per_class=1)
    t = target_mod.StoreTarget.open(src, "s3://bucket/x.pcr", RemoteOptions(endpoint_url="http://127.0.0.1:9"),
                                    tmp_path / "cache")
    real, calls = target_mod.lock_exclusive, []

    def finished_meanwhile(path, *, create_file=False):
        fd = real(path, create_file=create_file)
        if not calls:  # the holder we waited for removed the file between our open and our flock
            os.unlink(path)
        calls.append(path)
        return fd

    monkeypatch.setattr(target_mod, "lock_exclusive", finished_meanwhile)
    lock = t.work_dir.parent / (t.work_dir.name + ".lock")
    with t.locked():
        assert len(calls) == 2
        fd = os.open(lock, os.O_RDONLY)  # a third conversion finds the file locked
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not lock.exists() and not lock.parent.exists()


# ---- the store argument -------------------------------------------------------------------------

def test_a_path_that_is_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line(cli("info", tmp_path / "empty"), "is not a PCR store", "pcr.yaml")
    one_line(cli("verify", tmp_path / "nowhere"), "no such store")


@needs_fuse
def test_an_image_tree_given_as_the_store(demo_src, tmp_path, mounts):
    src = small_source(demo_src, tmp_path / "photos")
    for cmd in (("info", src), ("verify", src), ("mount", src, mounts.point("m"))):
        one_line(cli(*cmd), "is an image tree", f"pcrfs convert {src} STORE")


def test_scan11_of_a_10_group_store(demo_store):
    with open_store(demo_store) as s:
        n, path = s.num_groups, s.path(0)
    one_line(cli("get", demo_store, path, "--scan", n + 1, "-o", "/dev/null"), f"at most {n}")


def test_get_of_a_path_as_the_mount_shows_it(demo_store):
    path = some_image(demo_store)
    one_line(cli("get", demo_store, f"scan3/{path}", "-o", "/dev/null"),
             "without a view", f"pcrfs get {demo_store} {path} --scan 3")


@pytest.mark.parametrize("view,needle", [("scan99", "asks for 99 scan groups"),
                                         ("medium", "has no view 'medium'"),
                                         ("ssim95", "pcrfs quality STORE --write-index")])
def test_an_unknown_view_names_the_views(demo_store, view, needle):
    """The dataset and fsspec name the views there are; ssim95 without the adaptive index
    says how to make one (the mount can only answer ENOENT)."""
    code = ("import sys, fsspec, pcrfs.filesystem\n"
            "from pcrfs.torch import ImageFolder\n"
            "try:\n"
            f"    ImageFolder({str(demo_store)!r}, view={view!r})\n"
            "except Exception as e:\n"
            "    print('dataset', type(e).__name__, e)\n"
            "try:\n"
            f"    fsspec.filesystem('pcr', fo={str(demo_store)!r}).ls({view!r} + '/x')\n"
            "except Exception as e:\n"
            "    print('fsspec', type(e).__name__, e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = res.stdout.splitlines()
    assert len(lines) == 2, res.stdout + res.stderr
    assert lines[0].startswith("dataset StoreError") and needle in lines[0], lines
    assert lines[1].startswith("fsspec FileNotFoundError") and needle in lines[1], lines


# ---- mount / umount -----------------------------------------------------------------------------

@needs_fuse
def test_a_missing_mount_point(demo_store, tmp_path):
    one_line(cli("mount", demo_store, tmp_path / "nope"), "does not exist", "mkdir -p")


@needs_fuse
def test_a_non_empty_mount_point(demo_store, mounts):
    mnt = mounts.point("full_dir")
    (mnt / "keep.txt").write_text("mine")
    one_line(cli("mount", demo_store, mnt), "is not empty", "-o nonempty")
    assert (mnt / "keep.txt").read_text() == "mine"


@needs_fuse
def test_mounting_twice_unmounting_twice_and_a_busy_mount(demo_store, mounts, tmp_path):
    mnt = mounts.point("twice")
    res = cli("mount", demo_store, mnt, "--log-file", tmp_path / "twice.log")
    assert res.returncode == 0, res.stderr
    mounts.track(mnt)
    one_line(cli("mount", demo_store, mnt, "--log-file", tmp_path / "again.log"),
             "is already mounted", f"pcrfs umount {mnt}")
    inside = subprocess.Popen(["sleep", "60"], cwd=mnt / "full")
    try:
        one_line(cli("umount", mnt), "is busy", "--lazy")
    finally:
        inside.kill()
        inside.wait()
    assert cli("umount", mnt).returncode == 0
    one_line(cli("umount", mnt), "is not mounted")


@needs_fuse
def test_imagefolder_on_the_mount_root_names_the_view_to_use(demo_store, mounts):
    """torchvision takes every directory of its root for a class. The mount root's were the
    views and .pcrfs, and it said "Found no valid file for the classes .pcrfs": an empty
    hidden directory there now makes the one line say what to do."""
    torchvision = pytest.importorskip("torchvision")
    info = mounts.mount(demo_store, "imagefolder")
    with pytest.raises(FileNotFoundError) as e:
        torchvision.datasets.ImageFolder(info.mountpoint)
    message = str(e.value)
    assert "\n" not in message and "point-the-loader-at-a-view-such-as-full-or-scan5" in message, message
    assert len(torchvision.datasets.ImageFolder(os.path.join(info.mountpoint, "scan3"))) > 0
    with open_store(demo_store) as s:
        assert os.stat(info.mountpoint).st_nlink == 2 + s.num_groups + 1 + 2  # views, .pcrfs, the hint


# ---- object stores ------------------------------------------------------------------------------

class _Moto:
    def __init__(self, server: MotoServer, bucket: str) -> None:
        self.server, self.endpoint, self.bucket = server, server.endpoint, bucket


@pytest.fixture(scope="module")
def moto(tmp_path_factory, demo_store):
    """A moto S3 server on loopback with the demo store at s3://mistakes/demo.pcr; the AWS
    test credentials and a private XDG_CACHE_HOME in the environment meanwhile."""
    why = s3_available()
    if why:
        pytest.skip(why)
    saved = {k: os.environ.get(k) for k in list(S3_ENV) + ["XDG_CACHE_HOME"]}
    os.environ.update(S3_ENV)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        from pcrfs.remote.fs import RemoteOptions, filesystem

        fs = filesystem("s3://mistakes", RemoteOptions(endpoint_url=server.endpoint))
        fs.mkdir("mistakes")
        fs.put(str(demo_store), "mistakes/demo.pcr", recursive=True)
        yield _Moto(server, "mistakes")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_s3_store_reads(moto):
    res = cli("info", "s3://mistakes/demo.pcr", "--endpoint-url", moto.endpoint)
    assert res.returncode == 0 and "images" in res.stdout, res.stderr


def test_missing_credentials(moto):
    res = cli("info", "s3://mistakes/demo.pcr", "--endpoint-url", moto.endpoint, env=NO_CREDENTIALS)
    one_line(res, "no credentials", "AWS_ACCESS_KEY_ID")


def test_a_missing_bucket(moto):
    one_line(cli("info", "s3://no-such-bucket/demo.pcr", "--endpoint-url", moto.endpoint),
             "bucket 'no-such-bucket' does not exist", "create it")


def test_an_endpoint_that_is_down_is_one_line_not_one_per_retry(moto):
    down = f"http://{LOOPBACK}:{free_port()}"
    one_line(cli("info", "s3://mistakes/demo.pcr", "--endpoint-url", down), "cannot reach the object store", down)


# ---- output, info and help ----------------------------------------------------------------------

def test_a_closed_pipe_is_quiet(demo_store):
    """`pcrfs info STORE | head -1`: the reader goes away before pcrfs writes; pcrfs stops
    as cat would (status 141, as for SIGPIPE), with nothing on stderr."""
    for args in (("info", demo_store), ("info", "--json", demo_store)):
        proc = subprocess.Popen([sys.executable, "-m", "pcrfs.cli", *map(str, args)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # long before the child has opened the store
        err = proc.stderr.read()
        assert proc.wait(60) == 141 and err == "", (proc.returncode, err)


def test_info_has_a_full_row(demo_store):
    res = cli("info", demo_store)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines()[4:] if line.strip()}
    with open_store(demo_store) as s:
        last = f"scan{s.num_groups}"
    assert rows["full"] == rows[last], rows  # every group: the same bytes as scanN, 100%
    assert rows["full"][-1] == "100.0%"


def test_cache_size_help_says_what_0_gives_with_readahead():
    """`--cache-size 0` on a remote store keeps 4x the readahead window for the groups fetched
    ahead (64 MiB by default); the help said only "0 disables it"."""
    res = cli("mount", "--help")
    text = " ".join(res.stdout.split())
    assert "at least 4x the readahead window" in text and "--readahead 0 --cache-size 0 keeps nothing" in text


# ---- a store's directories ----------------------------------------------------------------------

@pytest.mark.parametrize("directory", [fmt.RECORDS_DIR, fmt.INDEX_DIR])
def test_a_symlinked_store_directory_is_refused(demo_store, tmp_path, directory):
    """records/ or index/ as a symlink to a directory outside the store: the files inside were
    checked (no symlinks), the directory was followed. Refused at open, like symlinked files."""
    store = tmp_path / "s.pcr"
    shutil.copytree(demo_store, store)
    outside = tmp_path / "elsewhere" / directory
    outside.parent.mkdir()
    (store / directory).rename(outside)
    (store / directory).symlink_to(outside)
    with pytest.raises(StoreError, match=f"{directory} is a symlink"):
        open_store(store)
    one_line(cli("verify", store), f"{store / directory} is a symlink", "put the", "directory itself there")
    one_line(cli("info", store), "is a symlink")
    (store / directory).unlink()
    outside.rename(store / directory)
    assert cli("verify", "-q", store).returncode == 0  # the same files, in place: fine


# ---- where state goes ---------------------------------------------------------------------------

def test_a_non_root_user_s_runtime_files_go_to_xdg_runtime_dir(tmp_path, monkeypatch):
    """Pid files and daemon logs: $XDG_RUNTIME_DIR/pcrfs for a user, /run/pcrfs only for root."""
    from pcrfs.fuse import mounting

    monkeypatch.delenv("PCRFS_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run-user"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    (tmp_path / "run-user").mkdir()
    assert mounting.runtime_dir() == tmp_path / "run-user" / "pcrfs"
    assert mounting.default_log_file("/mnt/x").parent == tmp_path / "run-user" / "pcrfs"
