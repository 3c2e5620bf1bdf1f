"""The record-prefix policy alone: modes from the budgets, spans, parts, locality in WINDOW mode."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcrfs.store.read.prefixpolicy import Mode, RecordPrefixPolicy, group_bounds, split_parts

MiB = 1 << 20


def bounds(records: int = 10, per_group=(1, 2, 3, 4), header: int = 16) -> np.ndarray:
    """Records whose group regions are ``per_group`` MiB long, after the header."""
    regions = np.cumsum([0] + [g * MiB for g in per_group])[:-1] + header
    offsets = np.tile(regions, (records, 1))
    sizes = np.full(records, header + sum(per_group) * MiB)
    return group_bounds(offsets, sizes)


def test_group_bounds_give_the_span_of_groups_1_to_k():
    b = bounds(records=2)
    assert b.shape == (2, 5)
    assert b[0].tolist() == [16, 16 + MiB, 16 + 3 * MiB, 16 + 6 * MiB, 16 + 10 * MiB]
    p = RecordPrefixPolicy(b, memory_bytes=0, disk_bytes=1 << 40)
    assert p.view_bytes.tolist() == [0, 2 * MiB, 6 * MiB, 12 * MiB, 20 * MiB]


def test_view_mode_when_the_disk_cache_holds_the_view():
    b = bounds(records=10)  # V(2) = 30 MiB, V(4) = 100 MiB
    p = RecordPrefixPolicy(b, memory_bytes=8 * MiB, disk_bytes=50 * MiB)
    assert p.mode(2)[0] is Mode.VIEW
    assert p.mode(4)[0] is Mode.WINDOW  # 100 MiB do not fit; 45 MiB hold 4 prefixes of 10
    plan = p.access(3, 2, held=0)
    assert (plan.record, plan.first_group, plan.groups) == (3, 1, 2)
    assert (plan.start, plan.end) == (16, 16 + 3 * MiB)
    assert p.access(3, 2, held=2) is None  # already held
    assert p.access(3, 1, held=2) is None


def test_memory_alone_may_hold_the_view():
    p = RecordPrefixPolicy(bounds(records=10), memory_bytes=256 * MiB, disk_bytes=0)
    assert all(p.mode(k)[0] is Mode.VIEW for k in (1, 2, 3, 4))


def test_headroom_is_kept():
    b = bounds(records=10)  # V(1) = 10 MiB
    assert RecordPrefixPolicy(b, 0, disk_bytes=12 * MiB).mode(1)[0] is Mode.VIEW
    assert RecordPrefixPolicy(b, 0, disk_bytes=10 * MiB).mode(1)[0] is not Mode.VIEW


def test_images_mode_when_not_even_two_prefixes_fit():
    p = RecordPrefixPolicy(bounds(records=10), memory_bytes=12 * MiB, disk_bytes=0)
    assert p.mode(4) == (Mode.IMAGES, 0)  # a prefix at k=4 is 10 MiB
    assert p.access(0, 4, held=0) is None
    assert p.mode(1)[0] is Mode.VIEW  # 10 MiB fit in 0.9 x 12


def test_extension_fetches_only_the_missing_groups():
    p = RecordPrefixPolicy(bounds(records=2), memory_bytes=1 << 30)
    plan = p.access(1, 4, held=2)
    assert (plan.first_group, plan.groups) == (3, 4)
    assert (plan.start, plan.end) == (16 + 3 * MiB, 16 + 10 * MiB)


def test_k_beyond_the_store_is_clipped():
    p = RecordPrefixPolicy(bounds(records=2), memory_bytes=1 << 30)
    assert p.access(0, 99, held=0).groups == 4


def test_parts():
    assert split_parts(0, 0, 8, 4) == ()
    assert split_parts(10, 15, 8, 4) == ((10, 5),)
    assert split_parts(0, 20 * MiB, 8 * MiB, 8) == ((0, 6990506), (6990506, 6990507), (13981013, 6990507))
    assert len(split_parts(0, 1000 * MiB, 8 * MiB, 8)) == 8


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 36), st.integers(1, 1 << 30), st.integers(1, 64))
def test_parts_cover_the_span_exactly(start, length, part, most):
    parts = split_parts(start, start + length, part, most)
    assert len(parts) <= most
    pos = start
    for off, n in parts:
        assert off == pos and n > 0
        pos += n
    assert pos == start + length
    if parts:
        assert max(n for _, n in parts) - min(n for _, n in parts) <= 1


def test_plans_split_large_spans_into_parts():
    p = RecordPrefixPolicy(bounds(records=2), memory_bytes=1 << 30, part_bytes=4 * MiB, max_parts=3)
    plan = p.access(0, 4, held=0)
    assert len(plan.parts) == 3
    assert plan.parts[0][0] == plan.start and sum(n for _, n in plan.parts) == plan.end - plan.start


def window_policy(records: int, mixed: bool = False) -> RecordPrefixPolicy:
    # 10 records fit (10 MiB each at k=4, 0.9 x 112 MiB); a history of 30 reads. ``mixed``: the
    # records mix the dataset (a shuffled store: pins apply), with an epoch gate open from the start
    from pcrfs.store.read.prefixpolicy import EpochGate

    gate = EpochGate(np.zeros(records, np.int64), min_images=1) if mixed else None
    if gate is not None:
        gate.listed(0)  # the one class listed: a loader's walk opened it
    return RecordPrefixPolicy(bounds(records=records), memory_bytes=112 * MiB, disk_bytes=0, gate=gate)


def test_window_mode_fetches_once_reads_show_record_locality():
    p = window_policy(1000)
    assert p.mode(4) == (Mode.WINDOW, 10)
    # a record-aware order: reads cycle over a window of 8 records; once 30 reads are seen
    # (8 records <= 10 that fit), every read may fetch its record's prefix
    plans = [p.access(r, 4, held=0) for _ in range(5) for r in range(8)]
    assert plans[:29] == [None] * 29
    assert [pl.record for pl in plans[29:]] == [5, 6, 7] + list(range(8))
    assert p.stats() == {"fetches": 11, "declined": 29, "deferred": 0, "pinned": 0}


@pytest.mark.parametrize("records", [20, 30, 1000])
def test_window_mode_declines_a_uniform_shuffle(records):
    p = window_policy(records)  # 10 of them fit: 50 %, 33 %, 1 %
    rng = random.Random(0)
    reads = [rng.randrange(records) for _ in range(20_000)]
    fetched = sum(p.access(r, 4, held=0) is not None for r in reads)
    assert fetched < 0.002 * len(reads)


def test_window_mode_accepts_record_shuffle_sampler_orders():
    from pcrfs.access.sampling import record_shuffle

    p = window_policy(200)
    record_of = np.repeat(np.arange(200), 50)
    order = record_shuffle(record_of, 8, np.random.default_rng(0))
    decisions = [p.access(int(record_of[i]), 4, held=0) is not None for i in order]
    assert not any(decisions[:29])  # the history fills
    assert sum(not d for d in decisions[29:]) < 0.005 * len(order)  # a record closing may cost a read


def test_modes_per_fidelity_are_remembered():
    p = RecordPrefixPolicy(bounds(records=10), memory_bytes=0, disk_bytes=50 * MiB)
    assert p.mode(2) is p.mode(2)
    with pytest.raises(IndexError):
        p.access(10, 2, held=0)  # no such record


def test_prefixes_that_cannot_be_kept_turn_the_fidelity_to_image_reads():
    p = RecordPrefixPolicy(bounds(records=10), memory_bytes=0, disk_bytes=1 << 30)
    assert p.access(0, 2, held=0) is not None
    p.not_kept(2)
    assert p.mode(2) == (Mode.IMAGES, 0)
    assert p.access(1, 2, held=0) is None
    assert p.mode(3)[0] is Mode.VIEW  # other fidelities are unaffected


def test_the_rest_of_the_view_is_prefetched_once_an_epoch_is_under_way():
    b = bounds(records=6)
    b[4, 1:] = b[4, 0]  # record 4 has no images: nothing to fetch there
    p = RecordPrefixPolicy(b, memory_bytes=0, disk_bytes=1 << 40, prefetch_after=3)
    assert p.prefetch(2, 2) == [] and p.prefetch(2, 2) == []  # one record, however often
    assert p.prefetch(0, 2) == []
    assert p.prefetch(5, 2) == [1, 3]  # the third distinct record: every other non-empty one
    assert p.prefetch(1, 2) == []  # once per fidelity
    assert p.prefetch(0, 3) == [] and p.prefetch(1, 3) == [] and p.prefetch(2, 3) == [3, 5]
    assert p.plan(3, 3, 2) == p.plan(3, 3, 2)  # what a prefetch fetches: groups held+1..k
    assert p.plan(3, 3, 2).first_group == 3 and p.plan(3, 3, 2).start == int(b[3, 2])


def test_no_prefetching_outside_view_mode_or_when_off():
    b = bounds(records=10)
    window = RecordPrefixPolicy(b, memory_bytes=0, disk_bytes=45 * MiB, prefetch_after=2)
    assert window.mode(4)[0] is Mode.WINDOW
    assert [window.prefetch(r, 4) for r in range(5)] == [[]] * 5
    off = RecordPrefixPolicy(b, memory_bytes=0, disk_bytes=1 << 40, prefetch_after=0)
    assert [off.prefetch(r, 2) for r in range(5)] == [[]] * 5


# ---- records that mix the dataset (format version 2) -----------------------------------------

def test_a_small_read_of_mixed_records_fetches_no_prefix_and_an_epoch_fetches_all():
    """A class of 1,281 images spread over 1,000 records (1.3 per record) never opens the gate;
    a uniform epoch opens it within its first percent and fetches every record once."""
    from pcrfs.store.read.prefixpolicy import EpochGate

    rng = np.random.default_rng(5)
    n_rec, per, n_classes = 1000, 1281, 1000
    n = n_rec * per
    classes_of = np.repeat(np.arange(n_classes), n // n_classes)
    owner = rng.permutation(n) // per  # image -> record, shuffled
    p = RecordPrefixPolicy(bounds(records=n_rec), 1 << 50, gate=EpochGate(classes_of, int(0.005 * n)))
    one_class = np.flatnonzero(classes_of == 17)
    assert all(p.access(int(owner[i]), 4, 0, image=int(i)) is None for i in one_class)
    assert p.stats()["fetches"] == 0 and p.stats()["deferred"] == len(one_class)
    q = RecordPrefixPolicy(bounds(records=n_rec), 1 << 50, gate=EpochGate(classes_of, int(0.005 * n)))
    fetched, first_plan = set(), {}
    for t, i in enumerate(rng.permutation(n)):
        r = int(owner[i])
        if r in fetched:
            continue
        if q.access(r, 4, 0, image=int(i)) is not None:
            fetched.add(r)
            first_plan[r] = t
    assert len(fetched) == n_rec
    assert min(first_plan.values()) == int(0.005 * n) - 1  # the gate opened at 0.5 % of the images
    assert np.percentile(list(first_plan.values()), 99) < 0.02 * n


def test_the_epoch_gate_opens_for_an_epoch_and_never_for_a_class_copy():
    """A mixed store's prefixes wait until reads touch two classes and 0.5 % of the images:
    a copy of one class (any size) never opens it, a second class does."""
    from pcrfs.store.read.prefixpolicy import EpochGate

    classes_of = np.repeat(np.arange(10), 100)           # 10 classes of 100 images
    gate = EpochGate(classes_of, min_images=5)
    assert not any(gate.note(i) for i in range(100))     # all of class 0, image by image
    assert gate.note(100) and gate.open                   # the first image of class 1
    assert gate.note(3)                                   # open stays open
    p = RecordPrefixPolicy(bounds(records=4), 1 << 40, gate=EpochGate(classes_of, min_images=5))
    assert all(p.access(0, 4, 0, image=i) is None for i in range(50))  # one class: no prefix
    plan = p.access(0, 4, 0, image=500)                   # another class: the gate opens
    assert plan is not None and plan.record == 0
    assert p.stats()["deferred"] == 50


def test_in_view_mode_an_open_gate_fetches_at_once_and_prefetches_the_rest():
    """Once the gate is open, a VIEW-mode read fetches its record's prefix on its first
    image and starts the rest of the view (a path-order pass reads no more images one by
    one); in WINDOW mode the reads must still stay in few records."""
    from pcrfs.store.read.prefixpolicy import EpochGate

    classes_of = np.repeat(np.arange(10), 100)
    view = RecordPrefixPolicy(bounds(records=8), 1 << 40, gate=EpochGate(classes_of, min_images=5))
    assert view.mode(4)[0] is Mode.VIEW
    assert all(view.access(i % 8, 4, 0, image=i) is None for i in range(100))  # class 0: gate shut
    plan = view.access(3, 4, 0, image=100)              # class 1's first image: fetched at once
    assert plan is not None and plan.record == 3
    assert view.prefetch(3, 4) == [0, 1, 2, 4, 5, 6, 7]  # and the rest of the view, ahead
    one = bounds(records=16)
    fit_two = int((one[:, 4] - one[:, 0]).mean() * 2.5)  # ~2 average prefixes fit (of 16: too few to pin)
    window = RecordPrefixPolicy(one, fit_two, gate=EpochGate(classes_of, min_images=5))
    assert window.mode(4)[0] is Mode.WINDOW
    window.access(0, 4, 0, image=500)
    assert [window.access(r % 8, 4, 0, image=600 + r) for r in range(20)] == [None] * 20
    # the gate opened at the fifth image (two classes); the reads after it touch 8 records: not local
    assert (window.stats()["deferred"], window.stats()["declined"]) == (4, 17)


def test_an_announced_reader_fetches_on_first_read_whatever_the_gate_and_history():
    """A reader that named its records (a sampler's fetch-ahead hint) keeps at most a cache's
    worth of records open: from then on any read of an unheld record fetches its prefix."""
    from pcrfs.store.read.prefixpolicy import EpochGate

    classes_of = np.repeat(np.arange(10), 100)
    one = bounds(records=8)
    fit_two = int((one[:, 4] - one[:, 0]).mean() * 2.5)
    p = RecordPrefixPolicy(one, fit_two, gate=EpochGate(classes_of, min_images=5))
    assert p.access(5, 4, 0, image=0) is None            # gate shut, history empty
    p.announce()
    plan = p.access(5, 4, 0, image=1)
    assert plan is not None and plan.record == 5 and (plan.first_group, plan.groups) == (1, 4)
    assert p.access(5, 4, 4, image=2) is None            # held: nothing to fetch
    tiny = RecordPrefixPolicy(one, 1)                    # IMAGES mode: a prefix fits no cache
    tiny.announce()
    assert tiny.access(0, 4, 0, image=0) is None


def test_a_walk_of_every_class_directory_opens_the_gate_and_one_class_listing_does_not():
    """A dataset loader lists every class before its first read (torchvision's ImageFolder):
    that opens the gate, so a path-order pass fetches prefixes from its first image; a
    ``cp -r`` of one class lists only its directory and still reads image by image."""
    from pcrfs.store.read.prefixpolicy import EpochGate

    classes_of = np.concatenate([[-1, -1], np.repeat(np.arange(8), 50)])  # two images at the root
    gate = EpochGate(classes_of, min_images=100)
    assert not gate.listed(-1) and not gate.listed(3) and not gate.listed(3)
    assert not any(gate.note(i) for i in range(2, 52))    # class 0 read: still shut
    assert [gate.listed(c) for c in range(8)] == [False] * 7 + [True]  # the last class listed
    assert gate.open and gate.opened_by == "walk" and gate.note(0)
    p = RecordPrefixPolicy(bounds(records=8), 1 << 40, gate=EpochGate(classes_of, min_images=100))
    p.listed(5)                                           # a copy of class 5 lists its directory
    assert all(p.access(i % 8, 4, 0, image=i) is None for i in range(252, 302))
    assert p.stats()["epoch_gate"] == "shut"
    for c in range(8):
        p.listed(c)
    plan = p.access(2, 4, 0, image=2)                      # the first read after the walk
    assert plan is not None and plan.record == 2
    assert p.prefetch(2, 4) == [0, 1, 3, 4, 5, 6, 7]       # and the rest of the view ahead
    assert p.stats()["epoch_gate"] == "walk"
    ungated = RecordPrefixPolicy(bounds(records=8), 1 << 40)
    ungated.listed(0)                                      # a store in source order: no gate at all
    assert "epoch_gate" not in ungated.stats()


def test_window_mode_pins_prefixes_where_the_cache_holds_a_large_share_of_the_records():
    """Reads that are not record-local (a uniform shuffle; a path-order pass over a shuffled
    store) with 10 of 20 records fitting: the first 10 records met are fetched once and kept,
    so about half the reads come from prefixes and nothing is fetched twice (the first 30
    reads fill the history, image by image). With 10 of 1,000 fitting nothing is pinned
    (they would serve 1 % of the reads)."""
    rng = random.Random(3)
    held: dict[int, int] = {}            # what a cache that keeps every fetched prefix holds
    p = window_policy(20, mixed=True)
    served = fetched = 0
    for _ in range(4000):
        r = rng.randrange(20)
        plan = p.access(r, 4, held=held.get(r, 0))
        if plan is not None:
            fetched += 1
            held[r] = plan.groups
        served += r in held
    assert fetched == 10 == p.stats()["pinned"] and len(held) == 10
    assert 0.45 < served / 4000 < 0.55
    assert p.access(next(iter(held)), 4, held=4) is None     # a kept prefix serves, no new fetch
    few = window_policy(1000, mixed=True)
    assert all(few.access(rng.randrange(1000), 4, held=0) is None for _ in range(4000))
    assert few.stats()["pinned"] == 0
    source = window_policy(20)
    for _ in range(4000):
        source.access(rng.randrange(20), 4, held=0)
    assert source.stats()["pinned"] == 0


def test_a_pinned_prefix_dropped_stops_pinning_at_that_fidelity():
    """A pinned record read again with nothing held was evicted (the other reads' groups need
    the cache): pinning more would fetch prefixes to lose them, so it stops -- at that k only."""
    p = window_policy(20, mixed=True)
    assert all(p.access(5 + t % 15, 4, held=0) is None for t in range(29))  # the history fills: 15 records
    assert p.access(0, 4, held=0) is not None                # not local: pinned
    assert p.access(1, 4, held=0) is not None
    assert p.access(0, 4, held=2) is not None                 # held, at a lower k: extended
    assert p.access(1, 4, held=0) is None                     # dropped: no refetch ...
    assert p.access(2, 4, held=0) is None                     # ... and no new pin at k = 4
    assert p.stats()["pinned"] == 2
    # k = 3 pins on its own (16 fit there): once 48 reads fill its history, records are pinned
    held: dict[int, int] = {}
    for t in range(60):
        r = 5 + t % 15
        plan = p.access(r, 3, held=held.get(r, 0))
        if plan is not None:
            held[r] = plan.groups
    assert len(held) == 15 and p.stats()["pinned"] > 2      # each fetched once, kept


def test_the_memory_cache_evicts_no_kept_entry():
    """ByteLRU.keep_while: kept entries (pinned record prefixes) are passed over by eviction,
    whatever their age; a value that fits only by evicting kept ones is not cached."""
    from pcrfs.store.sources.cache import ByteLRU, GroupKey, PrefixKey

    cache = ByteLRU(100)
    pinned = {1, 2}
    cache.keep_while(lambda key: type(key) is PrefixKey and key.record in pinned)
    gone = []
    cache.on_evict(lambda key, value: gone.append(key))
    cache.put(PrefixKey(1), b"a" * 30)
    cache.put(PrefixKey(2), b"b" * 30)
    for i in range(10):                                   # per-image groups stream through
        cache.put(GroupKey(i, 1), b"g" * 20)
    assert cache.peek(PrefixKey(1)) is not None and cache.peek(PrefixKey(2)) is not None
    assert gone == [GroupKey(i, 1) for i in range(8)] and cache.nbytes == 100
    cache.put(GroupKey(99, 1), b"x" * 50)                  # fits only by evicting a pinned prefix
    assert cache.peek(GroupKey(99, 1)) is None and cache.peek(PrefixKey(1)) is not None
    assert gone[-1] == GroupKey(99, 1) and cache.nbytes <= 100
    pinned.clear()                                        # unpinned: ordinary entries again
    cache.put(GroupKey(100, 1), b"y" * 50)
    assert cache.peek(GroupKey(100, 1)) is not None and cache.nbytes <= 100


def test_pins_never_take_more_than_the_memory_cache_headroom():
    """The cache keeps pinned prefixes whatever else is read, so their bytes stay within 90 %
    of the memory cache, however many records would fit by the average prefix."""
    sizes = bounds(records=20)
    sizes[:2, 4] += 30 * MiB                              # records 0 and 1: 40 MiB prefixes, the rest 10
    from pcrfs.store.read.prefixpolicy import EpochGate

    gate = EpochGate(np.zeros(20, np.int64), min_images=1)
    gate.listed(0)
    p = RecordPrefixPolicy(sizes, memory_bytes=112 * MiB, gate=gate)
    assert p.mode(4) == (Mode.WINDOW, 7)                  # 7 average (13 MiB) prefixes fit
    held: dict[int, int] = {}
    for t in range(400):
        r = (t * 7) % 20
        plan = p.access(r, 4, held=held.get(r, 0))
        if plan is not None:
            held[r] = plan.groups
    pinned = [r for r in range(20) if p.is_pinned(r)]
    assert sum(int(sizes[r, 4] - sizes[r, 0]) for r in pinned) <= 0.9 * 112 * MiB
    assert 0 in pinned and 1 in pinned and len(pinned) < 7  # the byte cap, not the count, stopped them
