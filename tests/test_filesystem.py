"""The pcr:// fsspec filesystem: the mount's tree and bytes without FUSE, read-only.

One real mount of the demo store is the reference for every file of every view;
moto serves the same store over S3; fsspec's own abstract "get" tests run on a
store laid out as their scenarios (the copy/put/pipe/open suites write to the
filesystem under test, which a store refuses).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import shutil
from pathlib import Path

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fsspec.implementations.local import make_path_posix
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.get import AbstractGetTests
from PIL import Image

from pcrfs.convert import convert
from pcrfs.access.filesystem import PCRFileSystem, ReadOnlyError, register
from pcrfs.store import format as fmt
from pcrfs.store.errors import CorruptData, StoreError

from mountutil import Mounts, fuse_unavailable
from s3util import store_on_moto

BUCKET = "pcrfs-fsspec"
REPO = Path(__file__).resolve().parent.parent

register()  # the venv's installed metadata may predate the entry point


@pytest.fixture(scope="module")
def fs(demo_store) -> PCRFileSystem:
    return fsspec.filesystem("pcr", fo=str(demo_store))


@pytest.fixture(scope="module")
def views(reader) -> list[str]:
    return [f"scan{k}" for k in range(1, reader.num_groups + 1)] + ["full"]


@pytest.fixture(scope="module")
def mnt(demo_store, tmp_path_factory):
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    mounts = Mounts(tmp_path_factory.mktemp("fmnt"))
    try:
        yield Path(mounts.mount(demo_store, "demo").mountpoint)
    finally:
        mounts.cleanup()


def mount_tree(root: Path) -> tuple[set[str], set[str]]:
    files, dirs = set(), set()
    for d, subs, names in os.walk(root):
        dirs.update(os.path.relpath(os.path.join(d, s), root) for s in subs)
        files.update(os.path.relpath(os.path.join(d, n), root) for n in names)
    return files, dirs


# ---- the same tree and bytes as the mount --------------------------------------------------------

def test_root_lists_the_views(fs, views):
    assert fs.ls("", detail=False) == views
    assert [e["type"] for e in fs.ls("/")] == ["directory"] * len(views)
    assert not fs.exists(".pcrfs") and not fs.exists(".pcrfs/stats")


def test_every_file_of_every_view_equals_the_mount(fs, mnt, views, reader):
    for view in views:
        files, dirs = mount_tree(mnt / view)
        found = fs.find(view, withdirs=True, detail=True)
        assert {p[len(view) + 1:] for p, e in found.items() if e["type"] == "file"} == files, view
        assert {p[len(view) + 1:] for p, e in found.items() if e["type"] == "directory" and p != view} == dirs
        for rel in sorted(files):
            st = os.stat(mnt / view / rel)
            info = found[f"{view}/{rel}"]
            assert info["size"] == st.st_size and info["mtime"] == pytest.approx(st.st_mtime, abs=1e-6)
            assert fs.cat_file(f"{view}/{rel}") == (mnt / view / rel).read_bytes(), (view, rel)
    d = os.path.dirname(reader.path(0))
    assert fs.ls(f"scan2/{d}", detail=False) == [f"scan2/{d}/{n}" for n in os.listdir(mnt / "scan2" / d)]


def test_info_and_listings_read_no_data(demo_store):
    fs = PCRFileSystem(fo=str(demo_store), skip_instance_cache=True)
    before = fs.store.records.requests
    sizes = {p: e["size"] for p, e in fs.find("", detail=True).items()}
    assert all(fs.info(p)["size"] == s for p, s in list(sizes.items())[:50])
    assert fs.store.records.requests == before
    assert sum(sizes.values()) > 0


def test_ranged_reads(fs, reader):
    rng = __import__("random").Random(5)
    for _ in range(30):
        i = rng.randrange(reader.num_images)
        k = rng.randrange(1, reader.num_groups + 1)
        path = f"scan{k}/{reader.path(i)}"
        whole = reader.read(i, k)
        a, b = sorted(rng.sample(range(len(whole) + 10), 2))
        assert fs.cat_file(path, start=a, end=b) == whole[a:b]
        start = rng.randrange(len(whole))
        assert fs.cat_file(path, start=start) == whole[start:]
        assert fs.cat_file(path, start=-7) == whole[-7:]
        assert fs.cat_file(path, start=5, end=-3) == whole[5:-3]
        with fs.open(path, block_size=512) as f:
            assert f.size == len(whole)
            f.seek(start)
            assert f.read(700) == whole[start:start + 700]
            f.seek(-10, os.SEEK_END)
            assert f.read() == whole[-10:]


OFFSETS = st.one_of(st.none(), st.integers(-40_000, 40_000))


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, 10**6), start=OFFSETS, end=OFFSETS)
def test_cat_file_ranges_slice_like_python(fs, reader, which, start, end):
    # fsspec's start/end are Python slice bounds (None, negative from the end, clipped)
    i, k = which % reader.num_images, which % reader.num_groups + 1
    path = f"scan{k}/{reader.path(i)}"
    assert fs.cat_file(path, start=start, end=end) == reader.read(i, k)[start:end]


def test_a_range_reads_only_the_groups_it_overlaps(demo_store, reader):
    fs = PCRFileSystem(fo=str(demo_store), skip_instance_cache=True)
    i = next(i for i in range(reader.num_images) if reader.n_groups(i) >= 4)
    g1 = reader.ranges(i, reader.num_groups)[0]
    before = (fs.store.records.requests, fs.store.records.bytes_read)
    with fs.open(f"full/{reader.path(i)}", block_size=64, cache_type="none") as f:
        assert f.read(64) == reader.read(i, 1)[:64]
    assert fs.store.records.requests - before[0] == 1  # group 1 only, read whole for its CRC
    assert fs.store.records.bytes_read - before[1] == g1.length


def test_walk_glob_exists_isdir(fs, reader, views):
    path = reader.path(0)
    cls = path.split("/")[0]
    assert fs.isdir("full") and fs.isdir(f"full/{cls}") and fs.isfile(f"full/{path}")
    assert fs.exists(f"scan1/{path}") and not fs.exists(f"scan1/{path}x") and not fs.exists("scan99")
    assert sorted(fs.glob(f"scan3/{cls}/*")) == sorted(f"scan3/{p}" for p in reader.paths() if p.startswith(cls + "/"))
    assert len(fs.glob("full/**/*.jpg")) == reader.num_images
    walked = {root: (sorted(dirs), sorted(files)) for root, dirs, files in fs.walk("scan2")}
    assert walked["scan2"][0] == sorted(reader.classes)
    assert sum(len(files) for _, files in walked.values()) == reader.num_images
    with pytest.raises(FileNotFoundError):
        fs.info("scan2/no/such/file.jpg")
    with pytest.raises(FileNotFoundError):
        fs.ls("nope")
    with pytest.raises(IsADirectoryError):
        fs.cat_file("full")
    assert fs.cat_file(f"pcr://scan2//{path}/") == reader.read(0, 2)  # a path fsspec may hand over untidy


def test_chained_urls_and_url_to_fs(demo_store, reader):
    path = reader.path(4)
    with fsspec.open(f"pcr://scan3/{path}::{demo_store}", "rb") as f:
        assert f.read() == reader.read(4, 3)
    with fsspec.open(f"pcr://full/{path}::file://{demo_store}", "rb") as f:
        f.seek(10)
        assert f.read(20) == reader.read(4, reader.num_groups)[10:30]
    fs2, p = fsspec.core.url_to_fs(f"pcr://scan1/{path}::{demo_store}")
    assert isinstance(fs2, PCRFileSystem) and p == f"scan1/{path}"
    assert fsspec.open_files(f"pcr://scan2/*/*::{demo_store}")[0].fs.cat_file(f"scan2/{reader.path(0)}") \
        == reader.read(0, 2)


def test_pickles(fs, reader):
    copy = pickle.loads(pickle.dumps(fs))
    assert copy.cat_file(f"scan2/{reader.path(1)}") == reader.read(1, 2)


def test_entry_point_registers_the_protocol():
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = doc["project"]["entry-points"]["fsspec.specs"]["pcr"]
    module, _, name = target.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is PCRFileSystem
    assert "torch" in doc["project"]["optional-dependencies"]


# ---- read-only --------------------------------------------------------------------------------

def test_every_write_is_refused(fs, reader, tmp_path):
    path = f"full/{reader.path(0)}"
    d = os.path.dirname(path)
    local = tmp_path / "x.jpg"
    local.write_bytes(b"x")
    before = fs.find("", detail=True)
    attempts = {
        "open wb": lambda: fs.open(path, "wb"),
        "open ab": lambda: fs.open(path, "ab"),
        "open new": lambda: fs.open(f"{d}/new.jpg", "wb"),
        "pipe": lambda: fs.pipe(f"{d}/new.jpg", b"data"),
        "pipe_file": lambda: fs.pipe_file(path, b"data"),
        "put": lambda: fs.put(str(local), f"{d}/new.jpg"),
        "touch": lambda: fs.touch(f"{d}/new.jpg"),
        "mkdir": lambda: fs.mkdir(f"{d}/newdir"),
        "makedirs": lambda: fs.makedirs(f"{d}/a/b"),
        "rm": lambda: fs.rm(path),
        "rm recursive": lambda: fs.rm("scan1", recursive=True),
        "rm_file": lambda: fs.rm_file(path),
        "rmdir": lambda: fs.rmdir(d),
        "copy": lambda: fs.copy(path, f"{d}/copy.jpg"),
        "mv": lambda: fs.mv(path, f"{d}/moved.jpg"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(PermissionError) as e:
            attempt()
        assert isinstance(e.value, ReadOnlyError) and e.value.errno == errno.EROFS, what
        assert "read-only" in str(e.value), what
    assert fs.find("", detail=True) == before


# ---- bad input --------------------------------------------------------------------------------

def test_not_a_store_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="not a PCR store"):
        fsspec.filesystem("pcr", fo=str(tmp_path), skip_instance_cache=True)
    with pytest.raises(StoreError, match="no such store"):
        fsspec.open(f"pcr://full/x.jpg::{tmp_path}/missing.pcr").open()
    with pytest.raises(ValueError, match="needs the store"):
        PCRFileSystem()


def test_corrupt_group_names_the_file(demo_store, reader, tmp_path):
    copy = tmp_path / "damaged.pcr"
    shutil.copytree(demo_store, copy)
    i = next(i for i in range(1, reader.num_images) if reader.n_groups(i) >= 3)
    g2 = reader.ranges(i, 2)[1]
    with open(copy / fmt.record_name(g2.record), "r+b") as f:
        f.seek(g2.offset + 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x55]))
    fs = PCRFileSystem(fo=str(copy), skip_instance_cache=True)
    assert fs.cat_file(f"scan1/{reader.path(i)}") == reader.read(i, 1)
    for path in (f"scan2/{reader.path(i)}", f"full/{reader.path(i)}"):
        with pytest.raises(CorruptData, match=reader.path(i)):
            fs.cat_file(path)
        with pytest.raises(CorruptData, match=reader.path(i)):
            fs.open(path).read()
    assert fs.info(f"full/{reader.path(i)}")["size"] == reader.size(i, reader.num_groups)


# ---- S3 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(demo_store, tmp_path_factory):
    with store_on_moto(demo_store, BUCKET, "demo.pcr", tmp_path_factory) as where:
        yield where


def test_s3_store_gives_the_same_tree_and_bytes(fs, s3, views):
    key, endpoint = s3
    remote = fsspec.filesystem("pcr", fo=f"s3://{key}", target_options={"endpoint_url": endpoint})
    also = fsspec.filesystem("pcr", fo=key, target_protocol="s3",
                             target_options={"client_kwargs": {"endpoint_url": endpoint}})
    assert remote.find("", detail=True) == fs.find("", detail=True)
    for view in ("scan1", "scan4", "full"):
        for path in fs.find(view):
            assert remote.cat_file(path) == fs.cat_file(path), path
    path = fs.find("scan2")[7]
    assert also.cat_file(path, start=20, end=200) == fs.cat_file(path)[20:200]
    with fsspec.open(f"pcr://{path}::s3://{key}", "rb", s3={"endpoint_url": endpoint}) as f:
        assert f.read() == fs.cat_file(path)


def test_s3_errors_are_store_errors(s3):
    key, endpoint = s3
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        fsspec.filesystem("pcr", fo="s3://no-such-bucket/x.pcr", target_options={"endpoint_url": endpoint})
    with pytest.raises(StoreError, match="no such store"):
        fsspec.open(f"pcr://full/a.jpg::s3://{BUCKET}/nothing.pcr", s3={"endpoint_url": endpoint}).open()
    with pytest.raises(StoreError, match="credentials"):
        fsspec.filesystem("pcr", fo=f"s3://{key}", target_options={"endpoint_url": endpoint, "key": "k"})


# ---- fsspec's own tests, where they apply to a read-only filesystem ---------------------------------------------

SCENARIOS = {
    "bulk": ["file1", "file2", "subdir/subfile1", "subdir/subfile2", "subdir/nesteddir/nestedfile"],
    "glob": ["file1", "file2"] + [f"subdir{i}/{n}" for i in range(2)
                                  for n in ("subfile1", "subfile2", "nesteddir/nestedfile")],
    "prefix": ["subdir.txt", "subdir/subfile.txt"],
    "hashed": [f"{hashlib.md5(str(i).encode()).hexdigest()}.txt" for i in range(10)],
}


@pytest.fixture(scope="module")
def scenario_store(tmp_path_factory) -> Path:
    """fsspec's test scenarios as a store: each file a tiny JPEG of its own colour."""
    src = tmp_path_factory.mktemp("scen") / "src"
    n = 0
    for scenario, files in SCENARIOS.items():
        for rel in files:
            target = src / scenario / "source" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.new("RGB", (16, 8), (n * 9 % 256, n * 37 % 256, 200)).save(buf, "JPEG")
            target.write_bytes(buf.getvalue())
            n += 1
    store = tmp_path_factory.mktemp("scen") / "scenarios.pcr"
    convert(src, store, workers=1)
    return store


class TestFsspecGet(AbstractFixtures, AbstractGetTests):
    """fsspec.tests.abstract.AbstractGetTests: copying out of the store to local disk."""

    @pytest.fixture
    def fs(self, scenario_store):
        return PCRFileSystem(fo=str(scenario_store))

    @pytest.fixture
    def fs_path(self):
        return "full"

    @pytest.fixture
    def fs_bulk_operations_scenario_0(self):
        return "full/bulk/source"  # made by scenario_store, never removed

    @pytest.fixture
    def fs_glob_edge_cases_files(self):
        return "full/glob/source"

    @pytest.fixture
    def fs_dir_and_file_with_same_name_prefix(self):
        return "full/prefix/source"

    @pytest.fixture
    def fs_10_files_with_hashed_names(self):
        return "full/hashed/source"

    def test_get_directory_recursive(self):
        pytest.skip("creates its source on the filesystem under test (fs.mkdir/fs.touch): a store is read-only")

    def test_get_with_source_and_destination_as_list(self, fs, fs_join, local_fs, local_join, local_target,
                                                     fs_10_files_with_hashed_names):
        # fsspec's version checks contents it wrote ("0".."9"); ours are the store's JPEGs
        source = fs_10_files_with_hashed_names
        names = [f"{hashlib.md5(str(i).encode()).hexdigest()}.txt" for i in range(10)]
        sources = [fs_join(source, n) for n in names]
        targets = [make_path_posix(local_join(local_target, n)) for n in names]
        fs.get(rpath=sources, lpath=targets)
        for s, t in zip(sources, targets):
            assert local_fs.cat(t) == fs.cat_file(s)

