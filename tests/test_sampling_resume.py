"""RecordShuffleSampler resume: exact under StatefulDataLoader with workers, elastic over
another number of ranks, foreign states refused.

The exact-resume test reads a real mount through torchvision's ImageFolder; the
elastic ones run a StatefulDataLoader per rank over the demo store's real catalogue
(the dataset is the sample index itself: what is checked is which indices each rank
gets). The property tests check the split rule on random catalogues.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcrfs.access.sampling import RecordShuffleSampler, split, unseen

torch = pytest.importorskip("torch")
stateful = pytest.importorskip("torchdata.stateful_dataloader")
StatefulDataLoader = stateful.StatefulDataLoader


def read_file(path: str) -> tuple[str, int]:
    """An ImageFolder loader that reads the file through the mount and keeps its name."""
    with open(path, "rb") as f:
        return path, len(f.read())


def sampler_state(loader_state: dict) -> dict:
    found = RecordShuffleSampler.state_in(loader_state)
    assert found is not None
    return found


def names(batches) -> list[str]:
    return [Path(p).name for batch in batches for p in batch[0][0]]


def test_exact_resume_under_prefetching_workers(demo_store, mounts):
    """Stopped after k batches with 2 workers prefetching: consumed + resumed is the
    uninterrupted epoch, in the same order; the epoch after it is the uninterrupted one too."""
    from torchvision import datasets

    mnt = Path(mounts.mount(demo_store, "m", cache_size="4M").mountpoint)
    ds = datasets.ImageFolder(str(mnt / "scan2"), loader=read_file)

    def loader(sampler):
        return StatefulDataLoader(ds, batch_size=5, sampler=sampler, num_workers=2)

    def sampler(epoch):
        s = RecordShuffleSampler(mnt / "scan2", seed=3)
        s.set_epoch(epoch)
        return s

    whole = names(loader(sampler(1)))
    assert sorted(whole) == sorted(Path(p).name for p, _ in ds.samples)

    first_sampler = sampler(1)
    dl = loader(first_sampler)
    consumed, k = [], 7
    for batch in dl:
        consumed.append(batch)
        if len(consumed) == k:
            state = dl.state_dict()
            break
    # the workers had been handed more than was consumed: the loader's snapshot is what counts
    assert first_sampler.state_dict()["samples"] > k * 5
    saved = sampler_state(state)
    assert saved["samples"] == k * 5 and saved["progress"] == [[1, k * 5]] and saved["epoch"] == 1
    json.dumps(saved)  # plain numbers and strings
    del dl

    other_workers = sampler(1)  # a loader with another number of workers: the sampler's state alone
    other_workers.load_state_dict(saved)
    assert names(consumed) + names(StatefulDataLoader(ds, batch_size=5, sampler=other_workers)) == whole

    resumed_sampler = sampler(1)
    dl = loader(resumed_sampler)
    dl.load_state_dict(state)
    rest = names(dl)
    assert names(consumed) + rest == whole

    resumed_sampler.set_epoch(2)
    assert names(dl) == names(loader(sampler(2)))


def test_a_state_saved_at_the_end_of_an_epoch_starts_the_next(reader):
    s = RecordShuffleSampler(reader, view="scan2", window=3, seed=5)
    s.set_epoch(4)
    dl = StatefulDataLoader(list(range(len(s))), batch_size=8, sampler=s, num_workers=0)
    assert sorted(i for b in dl for i in b.tolist()) == list(range(len(s)))
    state = dl.state_dict()
    t = RecordShuffleSampler(reader, view="scan2", window=3, seed=5)
    fresh = StatefulDataLoader(list(range(len(t))), batch_size=8, sampler=t, num_workers=0)
    fresh.load_state_dict(state)
    got = [i for b in fresh for i in b.tolist()]
    assert t.epoch == 5
    s.set_epoch(5)
    assert got == list(s)


# ---- elastic --------------------------------------------------------------------------------------

def run_ranks(make, world_size: int, batches: int | None, state=None, workers: int = 0):
    """Each rank's StatefulDataLoader (batch 4) over the sample indices, stopped after
    ``batches`` batches (None: to the end), resumed from the loader ``state`` if given.
    Returns the indices each rank got and rank 0's loader state at the stop."""
    got, state0 = [], None
    for rank in range(world_size):
        s = make(rank, world_size)
        dl = StatefulDataLoader(list(range(len(s.images))), batch_size=4, sampler=s, num_workers=workers)
        if state is not None:
            dl.load_state_dict(state)
        mine = []
        for j, batch in enumerate(dl):
            mine += batch.tolist()
            if batches is not None and j + 1 == batches:
                break
        if rank == 0:
            state0 = dl.state_dict()
        got.append(mine)
    return got, state0


@pytest.mark.parametrize("new_world", [1, 3])
def test_elastic_resume_hands_every_unseen_sample_out_once(reader, new_world):
    """2 ranks stop after k batches (lockstep); rank 0's state resumes the epoch on 1 or on 3
    ranks: every sample no rank had seen comes exactly once, repeats are only padding, the
    ranks get equal shares, and the rest of the epoch keeps the global order."""
    def make(rank, world):
        s = RecordShuffleSampler(reader, view="scan2", window=3, seed=11, rank=rank, world_size=world)
        s.set_epoch(2)
        return s

    n = reader.num_images
    before, state = run_ranks(make, 2, batches=5, workers=2)
    assert all(len(b) == 20 for b in before)
    seen = {i for b in before for i in b}
    assert len(seen) == 40
    after, _ = run_ranks(make, new_world, batches=None, state=state, workers=2)
    assert len({len(a) for a in after}) == 1  # equal shares: lockstep goes on
    flat = [i for a in after for i in a]
    assert set(flat) == set(range(n)) - seen  # every unseen sample...
    assert len(flat) - len(set(flat)) < new_world  # ...once, but for padding
    order = make(0, 1).order()
    left = [i for i in order.tolist() if i not in seen]
    assert flat[:len(left)] == left  # the unseen samples in the epoch's order, split contiguously


def test_elastic_twice_and_back(reader):
    """2 ranks, then 3, then 2 again: each resume takes the union of what every phase handed out."""
    def make(rank, world):
        return RecordShuffleSampler(reader, view="scan2", window=2, seed=1, rank=rank, world_size=world)

    n = reader.num_images
    a, state = run_ranks(make, 2, batches=3)
    b, state = run_ranks(make, 3, batches=2, state=state)
    c, state = run_ranks(make, 2, batches=None, state=state)
    seen_a = {i for r in a for i in r}
    seen_b = {i for r in b for i in r}
    rest = [i for r in c for i in r]
    assert len(seen_a) == 24 and len(seen_b) == 24 and not seen_a & seen_b
    assert set(rest) == set(range(n)) - seen_a - seen_b
    assert len(rest) - len(set(rest)) < 2
    last = make(0, 2)
    assert sampler_state(state)["progress"] == [[2, 12], [3, 8], [2, (n - 48 + 1) // 2]]
    last.load_state_dict(sampler_state(state))
    assert last.epoch == 1  # a finished epoch: the next one starts
    nxt = make(0, 2)
    nxt.set_epoch(1)
    assert list(last) == list(nxt)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12), st.integers(1, 4),
       st.lists(st.tuples(st.integers(1, 5), st.floats(0, 1)), min_size=1, max_size=3),
       st.integers(1, 5), st.booleans(), st.integers(0, 99))
def test_any_chain_of_resumes_hands_out_the_unseen_exactly(sizes, window, phases, new_world, drop_last, seed):
    """Whatever world sizes and stops came before, the new ranks together get exactly what no
    rank got before, repeats only as padding (under drop_last: less the new split's tail)."""
    record_of = np.repeat(np.arange(len(sizes)), sizes)
    n = len(record_of)
    seen: set[int] = set()
    state = None
    for world, frac in phases:
        shares = []
        for rank in range(world):
            s = RecordShuffleSampler.from_records(record_of, window, seed, rank, world, drop_last)
            if state is not None:
                s.load_state_dict(state)
            shares.append(s)
        iters = [iter(s) for s in shares]
        length = len(shares[0]._share(shares[0].epoch, iters[0].closed)) - iters[0].start
        stop = int(frac * length)
        for it in iters:
            for _ in range(stop):
                seen.add(next(it))
        state = shares[0].state_dict()
        if stop == length:  # a finished epoch resumes at the next one: not what this test follows
            return
    fresh = [RecordShuffleSampler.from_records(record_of, window, seed, r, new_world, drop_last)
             for r in range(new_world)]
    for s in fresh:
        s.load_state_dict(state)
    got = [list(s) for s in fresh]
    assert len({len(g) for g in got}) == 1
    flat = [i for g in got for i in g]
    left = set(range(n)) - seen
    if drop_last:  # no repeats; the split's tail (fewer than a rank each) left out
        assert len(flat) == len(set(flat)) and set(flat) <= left and len(left - set(flat)) < new_world
    else:  # all of it, and fewer extras than ranks: padding (on as many ranks as before, the same padding)
        assert set(flat) >= left and len(flat) - len(left) < new_world
        if new_world != phases[-1][0]:
            assert set(flat) == left  # a new split pads with what it hands out itself


def test_same_world_size_resume_is_the_uninterrupted_epoch_with_padding():
    """n = 10 over 3 ranks pads the last share: resuming on 3 ranks continues each share
    exactly (padding included), not a re-split."""
    record_of = np.repeat(np.arange(5), 2)
    ranks = [RecordShuffleSampler.from_records(record_of, 2, 9, r, 3) for r in range(3)]
    whole = [list(s) for s in ranks]
    its = [iter(s) for s in ranks]
    for it in its:
        next(it)
    state = ranks[1].state_dict()
    for r in range(3):
        t = RecordShuffleSampler.from_records(record_of, 2, 9, r, 3)
        t.load_state_dict(state)
        assert whole[r][:1] + list(t) == whole[r]


def test_unseen_and_split():
    order = np.array([5, 3, 0, 1, 4, 2, 6])
    assert split(order, 3, False).tolist() == [[5, 3, 0], [1, 4, 2], [6, 5, 3]]
    assert split(order, 3, True).tolist() == [[5, 3], [0, 1], [4, 2]]
    assert unseen(order, [(3, 1)], False).tolist() == [3, 0, 4, 2]
    assert unseen(order, [(3, 3)], False).tolist() == []
    # [5 3 0 1][4 2 6 5] hands out 5 and 4, then [3 0 1][2 6 3] hands out 3 and 2
    assert unseen(order, [(2, 1), (2, 1)], False).tolist() == [0, 1, 6]
    with pytest.raises(ValueError):
        unseen(order, [(3, 4)], False)


# ---- foreign states ------------------------------------------------------------------------------

def test_foreign_states_are_refused_and_change_nothing(reader, demo_src, tmp_path):
    s = RecordShuffleSampler(reader, view="scan2", window=3, seed=1)
    s.set_epoch(2)
    it = iter(s)
    first = [next(it) for _ in range(10)]
    state = s.state_dict()
    assert state["samples"] == 10 and state["images"] == reader.num_images and state["view"] == "scan2"

    def refused(other, field: str, **changes):
        with pytest.raises(ValueError, match=field):
            other.load_state_dict({**state, **changes})

    fresh = RecordShuffleSampler(reader, view="scan2", window=3, seed=1)
    refused(RecordShuffleSampler(reader, view="scan2", window=3, seed=2), "seed")
    refused(RecordShuffleSampler(reader, view="scan2", window=2, seed=1), "window")
    refused(RecordShuffleSampler(reader, view="scan3", window=3, seed=1), "view")
    refused(RecordShuffleSampler(reader, view="scan2", window=3, seed=1, drop_last=True), "drop_last")
    refused(fresh, "images", images=reader.num_images + 1)
    refused(fresh, "another catalogue", fingerprint="0" * 16)
    refused(fresh, "handed", progress=[[1, reader.num_images + 1]])
    refused(fresh, "malformed", progress=[[0, 1]])
    refused(fresh, "version", version=99)
    with pytest.raises(ValueError, match="not a RecordShuffleSampler state"):
        fresh.load_state_dict({"epoch": 1})
    # the same image count, another record membership: the fingerprint tells
    shuffled = RecordShuffleSampler.from_records(np.roll(s.record_of, 1), 3, seed=1)
    shuffled.view = "scan2"
    with pytest.raises(ValueError, match="another catalogue"):
        shuffled.load_state_dict(state)
    # another store with the same image count: refused by its names and records
    from pcrfs.convert import convert
    from pcrfs.store.read.reader import open_store

    other = tmp_path / "other.pcr"
    convert(demo_src, other, record_bytes=128 * 1024, workers=2)
    with open_store(other) as o:
        assert o.num_images == reader.num_images
        theirs = RecordShuffleSampler(o, view="scan2", window=3, seed=1)
    with pytest.raises(ValueError, match="another catalogue"):
        theirs.load_state_dict(state)

    assert fresh.epoch == 0 and fresh.state_dict()["progress"] == [[1, 0]]  # nothing changed by the refusals
    fresh.set_epoch(2)
    whole = list(fresh)
    assert whole[:10] == first
    fresh.load_state_dict(state)
    assert first + list(fresh) == whole


def test_set_epoch_to_another_epoch_drops_a_loaded_resume():
    record_of = np.repeat(np.arange(6), 5)
    s = RecordShuffleSampler.from_records(record_of, 2, seed=4)
    s.set_epoch(3)
    it = iter(s)
    [next(it) for _ in range(7)]
    state = s.state_dict()
    t = RecordShuffleSampler.from_records(record_of, 2, seed=4)
    t.load_state_dict(state)
    assert t.epoch == 3 and len(list(t)) == 30 - 7
    t.load_state_dict(state)
    t.set_epoch(4)
    assert len(list(t)) == 30
    assert t.state_dict()["progress"] == [[1, 30]] and t.state_dict()["epoch"] == 4


@pytest.mark.parametrize("loader", ["torch", "stateful"])
def test_a_state_loaded_into_the_sampler_itself_survives_the_loaders_spare_iterators(loader):
    """``sampler.load_state_dict`` and then a DataLoader with workers (which makes an iterator,
    then another): the iterator that yields resumes; the next epoch starts afresh."""
    from torch.utils.data import DataLoader

    make_loader = DataLoader if loader == "torch" else StatefulDataLoader
    record_of = np.repeat(np.arange(8), 6)
    s = RecordShuffleSampler.from_records(record_of, 3, seed=2)
    s.set_epoch(1)
    whole = list(s)
    it = iter(s)
    [next(it) for _ in range(13)]
    t = RecordShuffleSampler.from_records(record_of, 3, seed=2)
    t.load_state_dict(s.state_dict())
    dl = make_loader(list(range(len(record_of))), batch_size=4, sampler=t, num_workers=2)
    assert [i for b in dl for i in b.tolist()] == whole[13:]
    assert t.state_dict()["progress"] == [[1, 48]]
    assert [i for b in dl for i in b.tolist()] == whole  # the same epoch again, from its start
