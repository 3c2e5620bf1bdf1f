"""The adaptive views ssim90/ssim95/ssim98 on a real FUSE mount (always unmounted afterwards)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pcrfs
from pcrfs.store.format import adaptiveindex as adaptive
from pcrfs.access.views import ROOT_HINT_DIR

from mountutil import Mounts, fuse_unavailable, pcrfs_cli

pytestmark = pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable()))

ADAPTIVE = ("ssim90", "ssim95", "ssim98")


@pytest.fixture(scope="module")
def indexed_store(demo_store, tmp_path_factory) -> Path:
    """A copy of the demo store with an adaptive index written by the command line."""
    copy = tmp_path_factory.mktemp("adaptive") / "demo.pcr"
    shutil.copytree(demo_store, copy)
    res = pcrfs_cli("quality", str(copy), "--write-index", "-q", "-j", "2", timeout=300)
    assert res.returncode == 0, res.stderr
    return copy


@pytest.fixture(scope="module")
def reader(indexed_store):
    s = pcrfs.open_store(indexed_store)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ks(reader) -> np.ndarray:
    return adaptive.load(reader).ks


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    m = Mounts(tmp_path_factory.mktemp("qmnt"))
    yield m
    m.cleanup()


@pytest.fixture(scope="module")
def mnt(indexed_store, mounts) -> Path:
    return Path(mounts.mount(indexed_store, "adaptive").mountpoint)


def tree_of(root: Path) -> tuple[set[str], set[str]]:
    files, dirs = set(), set()
    for d, subs, names in os.walk(root):
        dirs.update(os.path.relpath(os.path.join(d, s), root) for s in subs)
        files.update(os.path.relpath(os.path.join(d, n), root) for n in names)
    return files, dirs


def test_root_lists_the_adaptive_views(mnt, reader):
    names = sorted(p.name for p in mnt.iterdir())
    expected = [f"scan{k}" for k in range(1, reader.num_groups + 1)] + ["full", *ADAPTIVE, ".pcrfs", ROOT_HINT_DIR]
    assert names == sorted(expected)


def test_adaptive_views_list_the_same_tree(mnt):
    reference = tree_of(mnt / "scan1")
    assert len(reference[0]) > 0
    for view in ADAPTIVE + ("full",):
        assert tree_of(mnt / view) == reference, view


def test_each_file_is_the_scan_file_of_its_own_k(mnt, reader, ks):
    for t, view in enumerate(ADAPTIVE):
        for i in range(reader.num_images):
            path = reader.path(i)
            k = int(ks[i, t])
            mine = mnt / view / path
            assert os.stat(mine).st_size == os.stat(mnt / f"scan{k}" / path).st_size == reader.size(i, k)
            assert hashlib.md5(mine.read_bytes()).digest() == \
                hashlib.md5((mnt / f"scan{k}" / path).read_bytes()).digest(), (view, path, k)


def test_listing_sizes_match_and_thresholds_nest(mnt, reader, ks):
    d = Path(reader.path(0)).parent
    sizes = {view: {e.name: e.stat().st_size for e in os.scandir(mnt / view / d)} for view in ADAPTIVE}
    for name in sizes["ssim90"]:
        i = reader.find(f"{d}/{name}")
        assert [sizes[v][name] for v in ADAPTIVE] == [reader.size(i, int(k)) for k in ks[i]]
        assert sizes["ssim90"][name] <= sizes["ssim95"][name] <= sizes["ssim98"][name]
    total = {v: sum(sizes[v].values()) for v in ADAPTIVE}
    full = sum(e.stat().st_size for e in os.scandir(mnt / "full" / d))
    assert total["ssim90"] <= total["ssim95"] <= total["ssim98"] < full


def test_stats_count_the_adaptive_views(mnt, reader):
    (mnt / "ssim95" / reader.path(3)).read_bytes()
    doc = json.loads(os.getxattr(mnt, "user.pcrfs.stats"))
    assert set(ADAPTIVE) <= set(doc["views"])
    assert doc["views"]["ssim95"]["first_reads"] >= 1 and doc["errors"]["eio"] == 0


def test_store_without_index_has_no_adaptive_views(demo_store, mounts):
    plain = Path(mounts.mount(demo_store, "plain").mountpoint)
    assert not set(ADAPTIVE) & {p.name for p in plain.iterdir()}


def test_torchvision_imagefolder_over_ssim95(mnt, reader):
    datasets = pytest.importorskip("torchvision.datasets")
    ds = datasets.ImageFolder(str(mnt / "ssim95"))
    assert len(ds) == reader.num_images and ds.classes == sorted(reader.classes)
    img, label = ds[0]
    assert img.size[0] > 0 and label == reader.label(reader.find(os.path.relpath(ds.samples[0][0], mnt / "ssim95")))
