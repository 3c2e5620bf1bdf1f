"""pcrfs.torch.ImageFolder: the same dataset torchvision's ImageFolder gives over the mount, without one.

One real mount per module (of a small store with nested class directories, a
file at the root, a non-image extension and adaptive views) is the reference;
moto serves the same store over S3.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("torchvision.datasets")

import pcrfs  # noqa: E402
from pcrfs.convert import convert  # noqa: E402
from pcrfs.store import format as fmt  # noqa: E402
from pcrfs.store.errors import CorruptData, StoreError  # noqa: E402
from pcrfs.access.torch import ImageFolder  # noqa: E402

from mountutil import Mounts, fuse_unavailable, pcrfs_cli  # noqa: E402
from s3util import NO_CREDENTIALS_ENV, store_on_moto  # noqa: E402

BUCKET = "pcrfs-torch"

# Where the demo photos go in the test tree: nested directories whose string order
# differs from the store's component order ("b c" < "b.d" < "b" < "b/..."), upper-case
# and non-JPEG extensions, a JPEG under a non-image name, and a file outside any class.
LAYOUT = [
    "alpha/a.jpg", "alpha/b/x.jpg", "alpha/b c/y.jpg", "alpha/b.d/z.jpg", "alpha/c.jpg", "alpha/b/deep/w.jpg",
    "beta/img.JPEG", "beta/data.bin", "beta/pic.png",
    "gamma/only/nested.jpeg",
    "top.jpg",
]


@pytest.fixture(scope="module")
def tree_src(demo_src, tmp_path_factory) -> Path:
    photos = sorted(p for p in demo_src.rglob("*.jpg"))
    dest = tmp_path_factory.mktemp("tree") / "src"
    for rel, photo in zip(LAYOUT, photos[::7]):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".png"):
            from PIL import Image

            Image.open(photo).save(target)  # re-encoded by the converter, name kept
        else:
            shutil.copyfile(photo, target)
    return dest


@pytest.fixture(scope="module")
def tree_store(tree_src, tmp_path_factory) -> Path:
    """The tree converted, with an adaptive index (views ssim90/95/98)."""
    store = tmp_path_factory.mktemp("tstore") / "tree.pcr"
    convert(tree_src, store, record_bytes=64 * 1024, workers=2)
    res = pcrfs_cli("quality", str(store), "--write-index", "-q", "-j", "2", timeout=300)
    assert res.returncode == 0, res.stderr
    return store


@pytest.fixture(scope="module")
def store(tree_store):
    s = pcrfs.open_store(tree_store)
    yield s
    s.close()


@pytest.fixture(scope="module")
def view_list(store) -> list[str]:
    n = store.num_groups
    return [f"scan{k}" for k in range(1, n + 1)] + ["full", "ssim90", "ssim95", "ssim98"]


@pytest.fixture(scope="module")
def mnt(tree_store, tmp_path_factory):
    if fuse_unavailable():
        pytest.skip(fuse_unavailable())
    mounts = Mounts(tmp_path_factory.mktemp("tmnt"))
    try:
        yield Path(mounts.mount(tree_store, "tree").mountpoint)
    finally:
        mounts.cleanup()


def raw_loader(f) -> bytes:
    """A loader that keeps the bytes, so tests can see which view a worker read."""
    return f.read()


def keep(batch):
    return batch


def pixels(img) -> np.ndarray:
    return np.asarray(img)


# ---- identity with torchvision over the mount ------------------------------------------------------

def test_same_dataset_as_torchvision_over_the_mount_for_every_view(tree_store, mnt, view_list):
    for view in view_list:
        theirs = datasets.ImageFolder(str(mnt / view))
        ours = ImageFolder(tree_store, view=view)
        assert ours.classes == theirs.classes and ours.class_to_idx == theirs.class_to_idx, view
        assert ours.targets == theirs.targets, view
        assert len(ours) == len(theirs) == len(ours.samples), view
        assert [(os.path.relpath(p, mnt / view), t) for p, t in theirs.samples] == ours.samples, view
        assert ours.imgs == ours.samples
        for j in range(len(theirs)):
            a, ta = theirs[j]
            b, tb = ours[j]
            assert ta == tb and a.mode == b.mode == "RGB", (view, j)
            assert np.array_equal(pixels(a), pixels(b)), (view, ours.samples[j][0])
            assert ours.read_bytes(j) == (mnt / view / ours.samples[j][0]).read_bytes(), (view, j)


def test_order_differs_from_the_store_and_skips_non_images(tree_store, store):
    ds = ImageFolder(tree_store, view="scan1")
    paths = [p for p, _ in ds.samples]
    # directories in string order ("b" < "b c" < "b.d" < "b/deep"), each one's files by name
    assert paths[:6] == ["alpha/a.jpg", "alpha/c.jpg", "alpha/b/x.jpg", "alpha/b c/y.jpg",
                         "alpha/b.d/z.jpg", "alpha/b/deep/w.jpg"]
    assert "beta/data.bin" not in paths and "top.jpg" not in paths and "beta/data.bin" in list(store.paths())
    assert ds.classes == ["alpha", "beta", "gamma"]


def test_transforms_and_custom_loader(tree_store, store):
    seen = []

    def loader(f):
        seen.append(f.name)
        return f.read()

    ds = ImageFolder(tree_store, view="scan2", transform=len, target_transform=lambda t: -t, loader=loader)
    size, target = ds[1]
    assert seen == [ds.samples[1][0]] and target == -ds.samples[1][1]
    assert size == store.size(store.find(ds.samples[1][0]), 2)


def test_samples_can_be_assigned_to_subset(tree_store):
    ds = ImageFolder(tree_store, view="full")
    first = ds[3]
    ds.samples = ds.samples[3:5]
    assert len(ds) == 2 and ds[0][1] == first[1]
    assert np.array_equal(pixels(ds[0][0]), pixels(first[0]))


# ---- views between epochs, workers --------------------------------------------------------------

@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_view_reaches_persistent_workers(tree_store, store, context):
    ds = ImageFolder(tree_store, view="scan1", loader=raw_loader)
    workers = 2 if context == "fork" else 1
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, persistent_workers=True,
                                         collate_fn=keep, multiprocessing_context=context)
    expect = {v: [store.read(store.find(p), k) for p, _ in ds.samples]
              for v, k in (("scan1", 1), ("scan3", 3), ("full", store.num_groups))}
    for view in ("scan1", "scan3", "full", "scan1"):
        ds.set_view(view)
        got = [data for batch in loader for data, _ in batch]
        assert got == expect[view], view
    assert loader._iterator is not None and len(loader._iterator._workers) == workers  # the same workers
    del loader


class _Probe(torch.utils.data.Dataset):
    """Reports, from inside a worker, whether the dataset opened a store of its own."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, j):
        inherited = self.ds._store
        self.ds.read_bytes(j)
        return os.getpid(), self.ds._forks, inherited is not None and inherited is self.ds._store


def test_forked_workers_open_their_own_store(tree_store):
    ds = ImageFolder(tree_store, view="scan2")
    ds[0]  # the parent has an open store when the workers fork
    loader = torch.utils.data.DataLoader(_Probe(ds), batch_size=1, num_workers=2, collate_fn=keep)
    rows = [row for batch in loader for row in batch]
    assert {pid for pid, _, _ in rows}.isdisjoint({os.getpid()})
    assert all(forks == pcrfs.access.forks + 1 for _, forks, _ in rows)  # opened after its fork
    # only a worker's own store is ever reused (the first item of each worker replaced the parent's)
    assert sum(1 for _, _, reused in rows if not reused) == 2


def test_pickle_keeps_the_view_with_a_slot_of_its_own(tree_store):
    ds = ImageFolder(tree_store, view="scan3")
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.view == "scan3" and copy.read_bytes(2) == ds.read_bytes(2)
    ds.set_view("full")
    assert copy.view == "scan3"


def test_distributed_sampler_splits_the_dataset(tree_store):
    ds = ImageFolder(tree_store, view="scan2", loader=raw_loader)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=1, collate_fn=keep)
        got = [data for batch in loader for data, _ in batch]
        assert got == [ds.read_bytes(j) for j in sampler]
        seen += list(sampler)
    assert set(seen) == set(range(len(ds))) and len(seen) == 2 * ((len(ds) + 1) // 2)


# ---- bad input -------------------------------------------------------------------------------------------

def test_errors_name_what_is_wrong(tree_store, tmp_path, store):
    with pytest.raises(StoreError, match="no such store"):
        ImageFolder(tmp_path / "missing.pcr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a PCR store"):
        ImageFolder(tmp_path / "plain")
    with pytest.raises(StoreError, match=r"no view 'scanX'.*scan1"):
        ImageFolder(tree_store, view="scanX")
    n = store.num_groups
    with pytest.raises(StoreError, match=rf"'scan{n + 1}' asks for {n + 1} scan groups .* has {n}"):
        ImageFolder(tree_store, view=f"scan{n + 1}")
    with pytest.raises(StoreError, match="unknown storage option 'endpoint'"):
        ImageFolder(tree_store, storage_options={"endpoint": "http://x"})
    ds = ImageFolder(tree_store, view="scan1")
    with pytest.raises(StoreError, match="no view 'ssim42'"):
        ds.set_view("ssim42")
    assert ds.view == "scan1"


def test_adaptive_view_of_a_store_without_one_says_why(demo_store):
    with pytest.raises(StoreError, match="no adaptive index"):
        ImageFolder(demo_store, view="ssim95")


def test_corrupt_group_names_the_image_also_from_a_worker(tree_store, store, tmp_path):
    copy = tmp_path / "damaged.pcr"
    shutil.copytree(tree_store, copy)
    ds = ImageFolder(copy, view="full")
    j = next(j for j in range(len(ds)) if store.n_groups(store.find(ds.samples[j][0])) >= 3)
    path = ds.samples[j][0]
    g2 = store.ranges(store.find(path), 2)[1]
    with open(copy / fmt.record_name(g2.record), "r+b") as f:
        f.seek(g2.offset + g2.length // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    ds = ImageFolder(copy, view="full")
    with pytest.raises(CorruptData, match=path):
        ds[j]
    ds.set_view("scan1")
    assert ds[j][1] == ds.samples[j][1]  # group 1 is intact
    ds.set_view("full")
    assert ds[j - 1] and ds[j + 1 if j + 1 < len(ds) else 0]  # neighbours read fine
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=keep)
    with pytest.raises(CorruptData, match=path):
        for _ in loader:
            pass


def test_import_without_torch_says_what_to_install():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "import pcrfs, pcrfs.filesystem, pcrfs.access.imagefolder\n"
            "try:\n    import pcrfs.torch\nexcept ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "pip install 'pcrfs[torch]'" in res.stdout


# ---- the same store on S3 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(tree_store, tmp_path_factory):
    with store_on_moto(tree_store, BUCKET, "tree.pcr", tmp_path_factory) as (where, endpoint):
        yield f"s3://{where}", {"endpoint_url": endpoint}


def test_s3_store_gives_the_same_dataset(tree_store, s3):
    url, options = s3
    local = ImageFolder(tree_store, view="ssim95", loader=raw_loader)
    remote = ImageFolder(url, view="ssim95", loader=raw_loader, storage_options=options)
    assert remote.samples == local.samples and remote.classes == local.classes
    assert [remote[j] for j in range(len(remote))] == [local[j] for j in range(len(local))]
    client = ImageFolder(url, view="scan2", loader=raw_loader,
                         storage_options={"client_kwargs": {"endpoint_url": options["endpoint_url"]}})
    loader = torch.utils.data.DataLoader(client, batch_size=3, num_workers=2, collate_fn=keep)
    local.set_view("scan2")
    assert [x for batch in loader for x in batch] == [local[j] for j in range(len(local))]


def test_s3_errors_are_store_errors(s3, monkeypatch):
    url, options = s3
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        ImageFolder("s3://no-such-bucket/tree.pcr", storage_options=options)
    with pytest.raises(StoreError, match="no such store"):
        ImageFolder(f"s3://{BUCKET}/nothing.pcr", storage_options=options)
    for key, value in NO_CREDENTIALS_ENV.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with pytest.raises(StoreError, match="no credentials .*AWS_ACCESS_KEY_ID"):
        ImageFolder(url, storage_options=options)
