"""RecordShuffleSampler: a permutation, disjoint ranks, the window bound, determinism, ImageFolder order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcrfs.access.sampling import RecordShuffleSampler, record_shuffle

catalogues = st.lists(st.integers(0, 40), min_size=0, max_size=25).map(
    lambda sizes: np.repeat(np.arange(len(sizes)), sizes))  # record_of: record r holds sizes[r] items


def open_records(order: np.ndarray, record_of: np.ndarray) -> int:
    """The most records open (an item read, an item of it still to come in ``order``) at any point."""
    left = np.bincount(record_of[order], minlength=int(record_of.max(initial=-1)) + 1)
    started = set()
    most = 0
    for item in order:
        r = int(record_of[item])
        started.add(r)
        left[r] -= 1
        most = max(most, sum(1 for s in started if left[s] > 0) + (left[r] == 0))
        if left[r] == 0:
            started.discard(r)
    return most


@settings(max_examples=60, deadline=None)
@given(catalogues, st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_an_epoch_is_a_permutation_within_the_window(record_of, window, seed):
    order = record_shuffle(record_of, window, np.random.default_rng(seed))
    assert sorted(order.tolist()) == list(range(len(record_of)))
    assert open_records(order, record_of) <= window


@settings(max_examples=60, deadline=None)
@given(catalogues, st.integers(1, 5), st.integers(1, 4), st.booleans(), st.integers(0, 1000), st.integers(0, 5))
def test_ranks_share_the_epoch(record_of, window, world, drop_last, seed, epoch):
    ranks = [RecordShuffleSampler.from_records(record_of, window, seed, r, world, drop_last) for r in range(world)]
    for s in ranks:
        s.set_epoch(epoch)
    shares = [list(s) for s in ranks]
    n = len(record_of)
    assert all(len(sh) == len(s) for sh, s in zip(shares, ranks))
    assert len({len(sh) for sh in shares}) <= 1  # equal lengths, as DDP needs
    flat = [i for sh in shares for i in sh]
    if drop_last:
        assert len(flat) == len(set(flat)) == (n // world) * world  # disjoint
    else:
        assert set(flat) == set(range(n))  # everything, the padding only repeats
        assert len(flat) - len(set(flat)) < world
    for r, sh in enumerate(shares):  # a stretch of the order (padding aside): no more records open
        real = sh[:max(0, n - r * len(sh))]
        if real:
            assert open_records(np.asarray(real), record_of) <= window


def test_determinism_per_seed_and_epoch():
    record_of = np.repeat(np.arange(30), 50)
    a = RecordShuffleSampler.from_records(record_of, 4, seed=7)
    b = RecordShuffleSampler.from_records(record_of, 4, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != first
    assert list(RecordShuffleSampler.from_records(record_of, 4, seed=8)) != first
    a.set_epoch(0)
    assert list(a) == first


def test_windows_mix_records_and_a_window_of_one_is_record_by_record():
    record_of = np.repeat(np.arange(20), 100)
    order = record_shuffle(record_of, 1, np.random.default_rng(0))
    recs = record_of[order]
    assert (np.diff(recs) != 0).sum() == 19  # each record read through before the next
    assert sorted(order[:100] % 100) == list(range(100))
    order = record_shuffle(record_of, 8, np.random.default_rng(0))
    assert len(set(record_of[order[:100]].tolist())) == 8  # the first 100 draws span the window
    assert not np.array_equal(order[:100], np.sort(order[:100]))


def test_bad_arguments():
    with pytest.raises(ValueError):
        RecordShuffleSampler.from_records(np.zeros(3, dtype=int), 0)
    with pytest.raises(ValueError):
        RecordShuffleSampler.from_records(np.zeros(3, dtype=int), 2, rank=2, world_size=2)


def test_a_store_or_a_mounted_view(demo_store, reader, mounts):
    from torchvision import datasets

    s = RecordShuffleSampler(reader, view="scan2", window=3, seed=1)
    assert len(s) == reader.num_images and sorted(s) == list(range(reader.num_images))
    mnt = Path(mounts.mount(demo_store, "m").mountpoint)
    ds = datasets.ImageFolder(str(mnt / "scan2"))
    mine = RecordShuffleSampler(mnt / "scan2", window=3, seed=1)
    assert mine.view == "scan2" and list(mine) == list(s)
    rel = [str(Path(p).relative_to(mnt / "scan2")) for p, _ in ds.samples]
    assert rel == [reader.path(int(i)) for i in mine.images]  # dataset index -> the same image
    assert [label for _, label in ds.samples] == [reader.label(int(i)) for i in mine.images]
    for j in list(mine)[:10]:  # records open at once: the window
        assert reader.index.record_of(int(mine.images[j])) == mine.record_of[j]


def test_the_default_window_fits_the_cache(reader):
    big = RecordShuffleSampler(reader, view="scan5")
    small = RecordShuffleSampler(reader, view="full", cache_bytes=600_000)
    assert big.window >= small.window >= 1
    assert small.window <= 3  # 256 KiB records


def test_no_torch_import():
    code = "import sys, pcrfs.sampling; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
