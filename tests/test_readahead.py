"""The readahead policy alone: sequential detection, window growth, no cost for random access."""
from __future__ import annotations

import random

from pcrfs.store.read.readahead import Readahead


def walk(ra: Readahead, order, k=3, limit=10_000, clip=None):
    """Feed accesses; return the windows asked for."""
    return [w for i in order if (w := ra.access(i, k, limit, clip)) is not None]


def test_sequential_walk_is_covered_by_growing_windows():
    ra = Readahead(initial=4, maximum=64)
    n = 1000
    windows = walk(ra, range(n), limit=n)
    covered = set()
    for a, b in windows:
        assert not covered & set(range(a, b))  # nothing asked for twice
        covered |= set(range(a, b))
    assert covered >= set(range(3, n))  # everything after the first accesses was asked for ahead
    sizes = [b - a for a, b in windows]
    assert sizes[0] <= 8 and max(sizes) >= 32  # the window grows
    assert max(b for _, b in windows) <= n  # never past the end
    assert len(windows) < n / 10  # few, large windows


def test_random_access_asks_for_nothing():
    ra = Readahead()
    order = list(range(20_000))
    random.Random(0).shuffle(order)
    windows = walk(ra, order, limit=len(order))
    assert sum(b - a for a, b in windows) < 0.005 * len(order)


def test_repeated_chunks_of_one_file_count_once():
    ra = Readahead(initial=4, growth=2)
    assert walk(ra, [0, 0, 0, 1, 1, 1]) == []
    assert walk(ra, [2]) == [(3, 7)]
    assert walk(ra, [2, 2]) == []


def test_interleaved_readers_each_look_sequential():
    # two DataLoader workers taking alternate batches of 32
    ra = Readahead(initial=4, maximum=64)
    order = []
    for b in range(0, 640, 64):
        for j in range(32):
            order += [b + j, b + 32 + j]
    windows = walk(ra, order, limit=640)
    covered = set().union(*(set(range(a, b)) for a, b in windows))
    assert len(covered) > 600


def test_fidelities_are_separate_streams():
    ra = Readahead(initial=4, growth=2)
    assert walk(ra, [0, 1], k=1) == []
    assert walk(ra, [2], k=5) == []  # not a continuation of the k=1 walk
    assert walk(ra, [2], k=1) == [(3, 7)]


def test_clip_shortens_windows_and_limit_stops_them():
    ra = Readahead(initial=8)
    assert walk(ra, [0, 1, 2], clip=lambda a, b, k: a + 2) == [(3, 5)]
    ra = Readahead(initial=8)
    assert walk(ra, [0, 1, 2], limit=6) == [(3, 6)]
    ra = Readahead(initial=4, growth=4, maximum=64)
    assert walk(ra, [0, 1, 2]) == [(3, 11)]  # a run of 2 asks for 4 x 2 images
    assert walk(ra, [3, 4, 5], limit=6) == []
