"""A 100k-entry store (ImageNet-like names, tools/make_scale_store.py) mounted for real."""
from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path

import psutil
import pytest
from PIL import Image

import pcrfs
from mountutil import Mounts, fuse_unavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_scale_store import make_scale_store  # noqa: E402

N = 100_000

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))


@pytest.fixture(scope="module")
def scale_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("scale") / "s100k.pcr"
    make_scale_store(store, N, n_classes=100, per_record=1000)
    return store


@pytest.fixture(scope="module")
def scale_mount(scale_store, tmp_path_factory):
    mounts = Mounts(tmp_path_factory.mktemp("scale-mnt"))
    info = mounts.mount(scale_store, "m")
    yield Path(info.mountpoint), info.pid
    mounts.cleanup()


def test_store_has_convert_layout(scale_store):
    s = pcrfs.open_store(scale_store)
    assert s.num_images == N and len(s.classes) == 100 and s.num_groups == 10
    assert s.classes == sorted(s.classes)
    # every image's label is its top-level directory's position among the classes
    for i in random.Random(0).sample(range(N), 200):
        assert s.classes[s.label(i)] == s.path(i).split("/")[0]
        assert s.find(s.path(i)) == i
    index_bytes = sum(f.stat().st_size for f in (scale_store / "index").iterdir()
                      if f.name not in ("paths.bin", "path_offsets.npy", "dirs.bin", "dir_offsets.npy"))
    assert index_bytes / N <= 100


def test_list_stat_and_read_a_class(scale_store, scale_mount):
    mnt, _ = scale_mount
    s = pcrfs.open_store(scale_store)
    cls = s.classes[37]
    names = sorted(os.listdir(mnt / "scan2" / cls))
    want = sorted(s.path(i).split("/", 1)[1] for i in range(s.num_images) if s.path(i).startswith(cls + "/"))
    assert names == want and len(names) == 1000
    for name in random.Random(1).sample(names, 20):
        i = s.find(f"{cls}/{name}")
        for view, k in (("scan1", 1), ("scan2", 2), ("full", 10)):
            path = mnt / view / cls / name
            assert path.stat().st_size == s.size(i, k)
            data = path.read_bytes()
            assert data == s.read(i, k)
            with Image.open(io.BytesIO(data)) as im:
                im.load()


def test_walk_whole_view_counts_every_file_with_bounded_memory(scale_mount):
    mnt, pid = scale_mount
    files = sum(len(f) for _, _, f in os.walk(mnt / "scan1"))
    assert files == N
    rss_mb = psutil.Process(pid).memory_info().rss / 2**20
    assert rss_mb < 300, f"daemon RSS {rss_mb:.0f} MiB after listing {N} entries"


def test_listing_attributes_follow_their_use(scale_store, tmp_path_factory):
    """Readdirplus attributes go with every listed file while callers stat what they
    list (ls -l); after a bare walk, which never looks at them (each costs the kernel
    an inode), listings are names only until a file lookup shows they are used again."""
    import json

    mounts = Mounts(tmp_path_factory.mktemp("attrs-mnt"))
    try:
        mnt = Path(mounts.mount(scale_store, "m").mountpoint)
        classes = pcrfs.open_store(scale_store).classes

        def attr_requests() -> int:  # the stats attribute: fresh, and no lookup of its own
            return json.loads(os.getxattr(mnt, "user.pcrfs.stats"))["attr_requests"]

        def ls_l(view: str, cls: str) -> int:
            os.stat(mnt / view / cls)  # the directory's own lookup is not what is measured
            before = attr_requests()
            sizes = [e.stat().st_size for e in os.scandir(mnt / view / cls)]  # readdir, stat each as it comes
            assert len(sizes) == 1000 and all(sizes)
            return attr_requests() - before

        assert ls_l("scan3", classes[1]) == 0  # every file came with its attributes
        assert sum(len(f) for _, _, f in os.walk(mnt / "scan4")) == N  # a bare walk: names only
        assert ls_l("scan5", classes[2]) == 1000  # names only: every file was looked up
        assert ls_l("scan6", classes[3]) == 0  # stat-ing callers are back: attributes for all again
    finally:
        mounts.cleanup()
